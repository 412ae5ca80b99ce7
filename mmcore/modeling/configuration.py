"""`MultimodalConfig`: everything needed to rebuild a `MultimodalModel` from its directory.

``config.json`` holds the LLM's config (``text_config``), one record per encoder, the modality token
ids and optional start/end ids. An encoder record looks like::

    {
      "source": {"kind": "transformers", "class": "CLIPVisionModel", "config": {...}},
      "input_names": {"pixel_values": "pixel_values"},
      "output_width": null,
      "projector": {... MultimodalProjectorConfig.to_dict() ...},
      "callbacks": {"postprocess_module": {"name": "builtin:select_feature_layer", "params": {"layer": -2}}}
    }

``source.kind`` is ``transformers`` (an HF ``PreTrainedModel`` class and its config) or ``plugin``
(a registered encoder and its arguments, filled in by plugins); ``external`` marks a module that must
be passed again to ``from_pretrained(encoder_modules=...)``.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from mmcore.errors import ConfigError
from mmcore.modeling.merge import MERGE_CHECKS


class MultimodalConfig(PreTrainedConfig):
    """Config of a `MultimodalModel` (``model_type = "mmcore"``).

    Args:
        text_config: the language model's config (dict or ``PreTrainedConfig``).
        encoders: encoder name -> record (see module docstring); written by `MultimodalModel`.
        modality_token_ids: modality -> placeholder token id.
        modality_wrap_token_ids: modality -> ``[start_id, end_id]`` wrapped around each item's run.
        peft_config: the LLM's PEFT adapter config when it was wrapped by ``peft.get_peft_model``.
        preprocess_llm_callback: record of the model's ``preprocess_llm`` callback (as an encoder's).
        merge_check: placeholder/feature count check (see `merge_modality_features`).
        shared_modules: module path -> module path it is (``{"encoders.video.module":
            "encoders.image.module"}``): encoders that share a part (LLaVA-OneVision's image and video
            encoders share the tower, projector and newline). Saved once, shared again at load;
            written by `MultimodalModel`.
        concurrent_encoders: run the encoders of one call on separate device streams, so that on a GPU
            towers too small to fill it overlap (see `MultimodalModel.encode`). Off by default.
        agree_on_modalities: in data-parallel training, ranks agree at each step which encoders run,
            and a rank without inputs for one runs it on a stand-in item with zero contribution (see
            `MultimodalModel._agree_on_modalities`). On by default.
    """

    model_type = "mmcore"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    encoders: dict | None = None
    modality_token_ids: dict | None = None
    modality_wrap_token_ids: dict | None = None
    peft_config: dict | None = None
    preprocess_llm_callback: dict | str | None = None
    shared_modules: dict | None = None
    merge_check: str = "auto"
    concurrent_encoders: bool = False
    agree_on_modalities: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # HF's base __post_init__ pushes this config's attention implementation (None unless asked
        # for) down into sub-configs; a live LLM's config must keep the implementation it runs with.
        # The same holds for every config nested in the LLM's (a Qwen2-VL text model's sub-configs) and
        # for the experts implementation.
        kept = _implementations(self.text_config)
        super().__post_init__(**kwargs)
        if kwargs.get("attn_implementation") is None:
            for config, (attn, experts) in kept:
                if attn is not None:
                    config._attn_implementation_internal = attn
                if experts is not None and kwargs.get("experts_implementation") is None:
                    config._experts_implementation_internal = experts
        self.encoders = dict(self.encoders or {})
        self.shared_modules = {str(k): str(v) for k, v in (self.shared_modules or {}).items()}
        self.modality_token_ids = {str(k): int(v) for k, v in (self.modality_token_ids or {}).items()}
        self.modality_wrap_token_ids = {
            str(k): [int(x) for x in v] for k, v in (self.modality_wrap_token_ids or {}).items()
        }
        if self.merge_check not in MERGE_CHECKS:
            raise ConfigError(f"merge_check must be one of {MERGE_CHECKS}, got {self.merge_check!r}")
        if getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True


def _implementations(config) -> list[tuple[PreTrainedConfig, tuple[str | None, str | None]]]:
    """``(config, (attention, experts implementation))`` for ``config`` and every config nested in it."""
    found, stack, seen = [], [config], set()
    while stack:
        current = stack.pop()
        if not isinstance(current, PreTrainedConfig) or id(current) in seen:
            continue
        seen.add(id(current))
        found.append(
            (
                current,
                (
                    current.__dict__.get("_attn_implementation_internal"),
                    current.__dict__.get("_experts_implementation_internal"),
                ),
            )
        )
        stack.extend(getattr(current, key, None) for key in type(current).sub_configs)
    return found
