"""Qwen2-VL's 3-D rotary positions (M-RoPE) as a ``preprocess_llm`` callback, and the language
models that read them.

Qwen2-VL and Qwen2.5-VL give each vision token a (temporal, height, width) position and each text
token the same position on all three axes, continuing after the largest position of the item before
it. transformers computes them in ``Qwen2VLModel.get_rope_index`` (Qwen2.5-VL:
``Qwen2_5_VLModel.get_rope_index``, with a video's temporal spacing): `MRope` calls that very method,
on a small stand-in for the model (it reads only the vision config's ``spatial_merge_size`` and
``tokens_per_second``, and ``get_vision_position_ids``, which uses nothing of the model), so no
Qwen2-VL model is built.

- Prefill (no cache yet, or a training forward): positions from ``input_ids`` (the placeholders of the
  image and video modalities), ``image_grid_thw`` / ``video_grid_thw`` and the ``attention_mask``
  (left padding: pads get position 0, each row counts from its first real token), as transformers
  does; the rope delta of each row (its largest position + 1 - its length) is kept.
- Each decode step: the text position of the new tokens plus that row's delta.
- A packed batch (`mmcore.training.packing`: no attention mask, ``position_ids`` from 0 at every
  sample): each sample's positions are the ones it has alone, from 0 with its own grids.

The language model receives ``position_ids`` ``(4, batch, seq)``: the text positions, then the three
M-RoPE axes, the form transformers' generation gives ``Qwen2VLTextModel``. It builds its attention mask
from the text positions, so a packed batch's restarts keep attention within each sample (transformers'
packed-sequence detection; flash-attention takes the batch's ``cu_seq_lens`` as they are).

`Qwen2VLTextForCausalLM` / `Qwen2_5_VLTextForCausalLM`: transformers' ``Qwen2VLTextModel`` /
``Qwen2_5_VLTextModel`` with an ``lm_head`` (transformers has the text model but no causal LM of it),
registered with ``AutoModelForCausalLM`` for ``qwen2_vl_text`` / ``qwen2_5_vl_text`` configs, so a
saved mmcore model rebuilds its language model from config.json.
"""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLTextModel,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VLModel,
    Qwen2VLPreTrainedModel,
    Qwen2VLTextModel,
)

from mmcore.builtin import TEXT_LM_MODULES
from mmcore.builtin.callbacks import Callback
from mmcore.errors import ConfigError, EncoderInputError

#: family -> the transformers model whose get_rope_index computes its positions
ROPE_INDEX = {"qwen2_vl": Qwen2VLModel, "qwen2_5_vl": Qwen2_5_VLModel}


class MRope(Callback):
    """``preprocess_llm``: 3-D rotary positions for a Qwen2-VL-family language model.

    Args:
        image_token_id / video_token_id: the placeholder ids of the image and video modalities (None:
            that modality is absent).
        family: ``qwen2_vl`` or ``qwen2_5_vl`` (whose videos are spaced in time by
            ``tokens_per_second * second_per_grid_ts``).
        spatial_merge_size: patches merged per token along each side (2).
        tokens_per_second: Qwen2.5-VL's temporal positions per second of video.

    Reads the call's ``image_grid_thw`` / ``video_grid_thw`` (and Qwen2.5-VL's ``second_per_grid_ts``),
    as the processor gives them. Holds the rope deltas of the last prefill for the decode steps after
    it (transformers keeps them on the model, ``Qwen2VLModel.rope_deltas``).
    """

    name = "mrope"
    slot = "preprocess_llm"

    def __init__(
        self,
        image_token_id: int | None = None,
        video_token_id: int | None = None,
        family: str = "qwen2_vl",
        spatial_merge_size: int = 2,
        tokens_per_second: int | float | None = None,
    ):
        if family not in ROPE_INDEX:
            raise ConfigError(f"mrope: family must be one of {', '.join(ROPE_INDEX)}, got {family!r}")
        if image_token_id is None and video_token_id is None:
            raise ConfigError("mrope: needs the image_token_id or the video_token_id (or both)")
        if family == "qwen2_5_vl" and tokens_per_second is None:
            raise ConfigError("mrope: qwen2_5_vl needs tokens_per_second (its vision config's)")
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.family = family
        self.spatial_merge_size = spatial_merge_size
        self.tokens_per_second = tokens_per_second
        self.rope_deltas: torch.Tensor | None = None  # (batch, 1), from the last prefill
        vision = SimpleNamespace(spatial_merge_size=spatial_merge_size, tokens_per_second=tokens_per_second)
        model = ROPE_INDEX[family]
        # What get_rope_index reads of the model: its vision config and get_vision_position_ids.
        self._stand_in = SimpleNamespace(
            config=SimpleNamespace(vision_config=vision),
            get_vision_position_ids=functools.partial(model.get_vision_position_ids, None),
        )

    def params(self) -> dict[str, Any]:
        return {"image_token_id": self.image_token_id, "video_token_id": self.video_token_id, "family": self.family,
                "spatial_merge_size": self.spatial_merge_size, "tokens_per_second": self.tokens_per_second}  # fmt: skip

    def __call__(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        cache: Any = None,  # the KV cache's name in transformers 5.24+
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: Any = None,
        encoder_inputs: Any = None,
        **_: Any,
    ) -> dict[str, torch.Tensor] | None:
        if position_ids is not None and position_ids.dim() == 3:
            return None  # the caller gave 3-D positions already
        image_grid_thw, video_grid_thw, second_per_grid_ts = _grids(
            encoder_inputs, image_grid_thw, video_grid_thw, second_per_grid_ts
        )
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            return None
        batch, seq = reference.shape[:2]
        kv_cache = cache if cache is not None else past_key_values
        past = kv_cache.get_seq_length() if kv_cache is not None else 0
        text = _text_positions(
            position_ids, attention_mask, batch, seq, past, reference.device
        )  # (batch, seq)
        has_vision = image_grid_thw is not None or video_grid_thw is not None
        if past == 0:  # prefill, or a forward without a cache
            samples = _packed_samples(text) if attention_mask is None and position_ids is not None else None
            if has_vision:
                if input_ids is None:
                    raise EncoderInputError(
                        "mrope: images or videos need input_ids (to find their placeholders)"
                    )
                grids = (image_grid_thw, video_grid_thw, second_per_grid_ts)
                if samples is None:
                    mrope, deltas = self._rope_index(input_ids, attention_mask, *grids)
                else:  # a packed batch: each sample's positions as if it ran alone
                    mrope = self._packed_rope_index(input_ids, samples, *grids)
                    deltas = None  # training: no decode step follows
            else:  # text only: every axis the text position
                mrope = text[None].expand(3, -1, -1)
                deltas = torch.zeros(batch, 1, dtype=torch.long, device=reference.device)
            self.rope_deltas = deltas
        else:
            deltas = self.rope_deltas
            if deltas is None:
                deltas = torch.zeros(batch, 1, dtype=torch.long, device=reference.device)
            elif deltas.shape[0] != batch:  # beams / several sequences per prompt
                deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0)
            mrope = (text + deltas.to(text.device))[None].expand(3, -1, -1)  # (3, batch, seq)
        return {"position_ids": torch.cat([text[None], mrope.to(text.dtype)], dim=0)}  # (4, batch, seq)

    def _packed_rope_index(self, input_ids, samples, image_grid_thw, video_grid_thw, second_per_grid_ts):
        """``(3, R, W)`` positions of a packed batch: its samples (``samples``: the lengths of each
        row's samples) as the rows of one right-padded batch through `_rope_index`, so each counts from
        0 with its own grids (consumed in text order, the order of the samples here), put back in place."""
        pieces = [piece for row, lengths in zip(input_ids, samples) for piece in row.split(lengths)]
        width = max(len(piece) for piece in pieces)
        # (N, width): the samples as rows, right-padded
        ids = torch.stack([nn.functional.pad(piece, (0, width - len(piece))) for piece in pieces])
        lengths = torch.tensor([len(piece) for piece in pieces], device=ids.device)
        mask = (torch.arange(width, device=ids.device) < lengths[:, None]).long()  # (N, width)
        positions, _ = self._rope_index(ids, mask, image_grid_thw, video_grid_thw, second_per_grid_ts)
        flat = torch.cat([positions[:, n, : len(piece)] for n, piece in enumerate(pieces)], dim=1)
        return flat.view(3, *input_ids.shape)  # (3, R, W)

    def _rope_index(self, input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts):
        types = torch.zeros_like(input_ids, dtype=torch.int32)  # text 0, image 1, video 2 (mm_token_type_ids)
        kinds = (
            (1, "image", self.image_token_id, image_grid_thw),
            (2, "video", self.video_token_id, video_grid_thw),
        )
        for kind, name, token_id, grids in kinds:
            if token_id is None:
                continue
            here = input_ids == token_id  # (batch, seq)
            types = types.masked_fill(here, kind)
            if grids is not None:
                _check_one_run_per_item(here, name, grids)
        kwargs = {"second_per_grid_ts": second_per_grid_ts} if self.family == "qwen2_5_vl" else {}
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        return ROPE_INDEX[self.family].get_rope_index(
            self._stand_in, input_ids, types, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            attention_mask=mask, **kwargs,
        )  # fmt: skip


def mrope_encoders(model: Any) -> dict[str, Any] | None:
    """What the ``mrope`` callback of ``model`` reads: its Qwen2-VL-family image and video encoders
    (``{"image": name | None, "video": name | None, "family", "spatial_merge_size", "tokens_per_second"}``,
    from the recipes the qwen2vl plugin writes), or None when its language model reads 1-D positions
    (it is no Qwen2-VL text model) or no encoder is a Qwen2-VL tower. `ConfigError` for two image (or
    two video) towers: one placeholder id per kind is what the positions know."""
    llm = model.get_base_language_model()
    if getattr(llm.config, "model_type", None) not in TEXT_MODEL_TYPES:
        return None
    found: dict[str, Any] = {"image": None, "video": None}
    recipes = {}
    for name, encoder in model.encoders.items():
        recipe = (getattr(encoder, "source", None) or {}).get("recipe") or {}
        if recipe.get("family") not in ROPE_INDEX or "spatial_merge_size" not in (recipe.get("config") or {}):
            continue
        kind = "video" if recipe.get("video") else "image"
        if found[kind] is not None:
            raise ConfigError(
                f"mrope: two Qwen2-VL {kind} encoders ({found[kind]!r}, {name!r}); the 3-D positions take one "
                f"{kind} placeholder"
            )
        found[kind], recipes[kind] = name, recipe
    if not recipes:
        return None
    recipe = recipes.get("video") or recipes["image"]  # only videos are spaced in time differently
    return {**found, "family": recipe["family"], "spatial_merge_size": recipe["config"]["spatial_merge_size"],
            "tokens_per_second": recipe["config"].get("tokens_per_second")}  # fmt: skip


def mrope_for(model: Any) -> MRope | None:
    """The ``mrope`` callback ``model`` needs (see `mrope_encoders`), with its placeholder ids; None
    when it needs none."""
    found = mrope_encoders(model)
    if found is None:
        return None
    ids = model.modality_token_ids
    return MRope(
        ids.get(found["image"]), ids.get(found["video"]), family=found["family"],
        spatial_merge_size=found["spatial_merge_size"], tokens_per_second=found["tokens_per_second"],
    )  # fmt: skip


def _grids(encoder_inputs: Any, image: Any, video: Any, seconds: Any) -> tuple[Any, Any, Any]:
    """The grids from the call's arguments, or from ``encoder_inputs={modality: {...}}``."""
    for inputs in (encoder_inputs or {}).values():
        image = image if image is not None else inputs.get("image_grid_thw")
        video = video if video is not None else inputs.get("video_grid_thw")
        seconds = seconds if seconds is not None else inputs.get("second_per_grid_ts")
    return image, video, seconds


def _check_one_run_per_item(here: torch.Tensor, name: str, grids: Any) -> None:
    """get_rope_index takes each run of one kind's placeholders (``here``: ``(batch, seq)``, where they
    are) for one item (Qwen2-VL's processor puts ``<|vision_start|>`` / ``<|vision_end|>`` around each):
    `EncoderInputError` when the runs and the items do not pair up, e.g. two images with nothing between
    their placeholders."""
    runs = int((here & ~nn.functional.pad(here[:, :-1], (1, 0))).sum())
    if runs != len(grids):
        raise EncoderInputError(
            f"mrope: {len(grids)} {name}(s) but {runs} run(s) of {name} placeholders; the 3-D positions "
            f"take one run per {name}: put text or wrap tokens between adjacent {name}s (mmcore assemble "
            "--set model.wrap=true, or add_modality_tokens(..., wrap=True))"
        )


def _packed_samples(positions: torch.Tensor) -> list[list[int]] | None:
    """The lengths of the samples in each row of a packed batch (positions restart at each; transformers'
    ``find_packed_sequence_indices``, the test its attention masks take), or None when nothing is packed."""
    indices = find_packed_sequence_indices(positions)  # (R, W): the sample of each token in its row
    if indices is None:
        return None
    return [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in indices]


def _text_positions(position_ids, attention_mask, batch: int, seq: int, past: int, device) -> torch.Tensor:
    """``(batch, seq)`` 1-D positions of this call's tokens: as given, else from the attention mask
    (left padding: pads 0, each row from its first real token), else counting from the cache length."""
    if position_ids is not None:
        return position_ids.expand(batch, -1) if position_ids.shape[0] == 1 else position_ids
    if attention_mask is not None and attention_mask.dim() == 2:
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.masked_fill(attention_mask == 0, 0)[:, -seq:].to(device)
    return torch.arange(past, past + seq, device=device).expand(batch, -1)


class _TextForCausalLM:
    """What both families' causal LMs are: the family's text model (``text_model_class``) and an
    ``lm_head`` tied to its embeddings."""

    input_modalities = ("text",)
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    text_model_class: type

    def __init__(self, config):
        super().__init__(config)
        self.model = self.text_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # the KV cache's name in the text model's forward: cache from transformers 5.24, past_key_values before
        declared = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in declared else "past_key_values"
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_token_type_ids: Any = None,  # what transformers' Qwen2-VL processors give; the positions come from MRope
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The text model, then the head (on the last ``logits_to_keep`` positions), as the VLM does. The
        KV cache comes by either name and goes on by the one the text model declares, so no call warns."""
        kv_cache = cache if cache is not None else past_key_values
        named = {self._cache_arg: kv_cache} if kv_cache is not None else {}
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **named, **kwargs,
        )  # fmt: skip
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )  # fmt: skip


class Qwen2VLTextForCausalLM(_TextForCausalLM, Qwen2VLPreTrainedModel, GenerationMixin):
    """transformers' ``Qwen2VLTextModel`` + ``lm_head``: Qwen2-VL's language model (3-D positions)."""

    config_class = Qwen2VLTextConfig
    config: Qwen2VLTextConfig
    text_model_class = Qwen2VLTextModel


class Qwen2_5_VLTextForCausalLM(_TextForCausalLM, Qwen2_5_VLPreTrainedModel, GenerationMixin):
    """transformers' ``Qwen2_5_VLTextModel`` + ``lm_head``: Qwen2.5-VL's language model."""

    config_class = Qwen2_5_VLTextConfig
    config: Qwen2_5_VLTextConfig
    text_model_class = Qwen2_5_VLTextModel


AutoModelForCausalLM.register(Qwen2VLTextConfig, Qwen2VLTextForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(Qwen2_5_VLTextConfig, Qwen2_5_VLTextForCausalLM, exist_ok=True)

#: text config model_type -> this module registers a causal LM for it (see `mmcore.modeling.multimodal`)
TEXT_MODEL_TYPES = tuple(t for t, module in TEXT_LM_MODULES.items() if module == __name__)
