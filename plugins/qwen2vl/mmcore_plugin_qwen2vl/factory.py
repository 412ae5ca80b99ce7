"""The Qwen2-VL / Qwen2.5-VL encoder factories: transformers' towers, processors and token counts.

Items: images (PIL images, ``(H, W, C)`` arrays or tensors) through transformers'
``Qwen2VLImageProcessor``; with the ``video`` option, videos (``(frames, H, W, C)`` arrays or lists of
frames) through ``Qwen2VLVideoProcessor``. Each item is resized to a multiple of 28 px (4 px in the
tiny presets) within the pixel budget (``min_pixels`` / ``max_pixels``) and cut into patches of
``temporal_patch_size`` frames (an image is repeated to two frames): its grid ``(t, h, w)``. All items
of a batch are one flat patch sequence, ``pixel_values`` ``(sum of t*h*w, C * 2 * 14 * 14)``, with
``image_grid_thw`` ``(items, 3)`` (``pixel_values_videos`` / ``video_grid_thw`` for videos); the tower
attends within each item (no padding compute).

Tokens per item: the tower gives ``t * h * w`` features (``num_tokens``), the patch merger (the
projector, ``qwen2_vl_merger`` / ``qwen2_5_vl_merger``) one token per 2x2 of them: ``t * h * w / 4``
in the language model's input, exact per image and per video.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from mmcore.errors import ConfigError, EncoderInputError
from mmcore.factory import EncoderFactory, load_checkpoint_part
from mmcore_plugin_qwen2vl.modules import (
    MERGE_SIZE,
    TOWER_PARTS,
    Qwen2VLCheckpointTower,
    Qwen2VLVisionTower,
    Qwen25VLCheckpointTower,
    Qwen25VLVisionTower,
)
from mmcore_plugin_qwen2vl.presets import PRESETS, RELEASED_PIXELS

#: the inputs of an image encoder and of a video one (call argument -> the tower's argument)
IMAGE_INPUTS = {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"}
VIDEO_INPUTS = {"pixel_values_videos": "pixel_values", "video_grid_thw": "image_grid_thw"}


class Qwen2VLFactory(EncoderFactory):
    """Factory of the ``qwen2_vl`` encoder. Recipe: ``family``, ``config`` (the vision config's
    fields), ``video`` (the encoder reads videos), ``min_pixels`` / ``max_pixels`` (the processor's
    pixel budget), ``normalize`` (the checkpoint's ``image_mean`` / ``image_std``; absent: the
    processor's defaults) and ``checkpoint`` (where the weights came from, for reference)."""

    family: ClassVar[str] = "qwen2_vl"
    config_class: ClassVar[type[PretrainedConfig]] = Qwen2VLVisionConfig
    tower_class: ClassVar[type] = Qwen2VLVisionTower
    checkpoint_class: ClassVar[type] = Qwen2VLCheckpointTower
    width_field: ClassVar[str] = "embed_dim"  # the tower's width (the merger's input)
    projector_type: ClassVar[str] = "qwen2vl:qwen2_vl_merger"
    video_processor_class: ClassVar[type] = Qwen2VLVideoProcessor
    preset_table = PRESETS["qwen2_vl"]
    options = {"video": False, "min_pixels": None, "max_pixels": None}
    data_key = "image"  # a training record's "image" paths (``"video"`` ones with the video option)

    # -- recipe --------------------------------------------------------------------------------------
    def make_recipe(
        self, checkpoint: str | None = None, preset: str | None = None, **options: Any
    ) -> dict[str, Any]:
        options = self.check_options(options)
        if preset is not None:
            entry = PRESETS[self.family][self.check_preset(preset)]
            config, processor = dict(entry["config"]), dict(entry["pixels"])
        else:
            config, processor = self._read_checkpoint(checkpoint)
        for key in ("min_pixels", "max_pixels"):
            if options[key] is not None:
                processor[key] = options[key]
        self._check_pixels(config, processor)
        return {
            "family": self.family,
            "config": config,
            "video": options["video"],
            **processor,
            "checkpoint": checkpoint,
        }

    def _read_checkpoint(self, checkpoint: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The vision config (of a whole Qwen2-VL model or of its tower) and the image processor's
        pixel budget and normalisation (the released defaults when the checkpoint has none)."""
        try:
            config = AutoConfig.from_pretrained(checkpoint)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.family}: cannot read a config from {checkpoint!r}: {exc}") from exc
        vision = getattr(config, "vision_config", config)
        if not isinstance(vision, self.config_class):
            raise ConfigError(
                f"{self.family}: {checkpoint!r} is a {config.model_type!r} checkpoint; expected {self.family} "
                f"(or its vision tower, {self.config_class.model_type})"
            )
        fields = PRESETS[self.family]["tiny"]["config"]
        recipe_config = {key: _jsonable(getattr(vision, key)) for key in fields}
        processor = dict(RELEASED_PIXELS)
        try:
            image_processor = Qwen2VLImageProcessor.from_pretrained(checkpoint)
        except (OSError, ValueError):
            return recipe_config, processor
        processor.update(
            min_pixels=image_processor.size["shortest_edge"], max_pixels=image_processor.size["longest_edge"],
            normalize={"image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std)},
        )  # fmt: skip
        return recipe_config, processor

    def _check_pixels(self, config: Mapping[str, Any], processor: Mapping[str, Any]) -> None:
        factor = config["patch_size"] * config["spatial_merge_size"]
        low, high = processor["min_pixels"], processor["max_pixels"]
        if (
            not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high))
            or not factor**2 <= low <= high
        ):
            raise ConfigError(
                f"{self.family}: min_pixels and max_pixels must be ints with {factor**2} <= min_pixels <= max_pixels "
                f"(one {factor}x{factor} px token at least), got min_pixels={low!r}, max_pixels={high!r}"
            )
        if config["spatial_merge_size"] != MERGE_SIZE:
            raise ConfigError(
                f"{self.family}: spatial_merge_size {config['spatial_merge_size']} is not supported (the patch "
                f"merger projectors merge {MERGE_SIZE}x{MERGE_SIZE}, as every released tower does)"
            )

    # -- module --------------------------------------------------------------------------------------
    def build_module(self, recipe: Mapping[str, Any], checkpoint: str | None = None) -> torch.nn.Module:
        """The tower (its merger is the projector, built apart). ``checkpoint``: a whole Qwen2-VL model
        (the weights under ``model.visual.``) or a tower saved alone, loaded into transformers' own tower
        class; its merger is kept aside for `checkpoint_projector`, the language model's weights are
        skipped."""
        config = self.config_class(**recipe["config"])
        if checkpoint is None:
            return self.tower_class._from_config(config)
        full = load_checkpoint_part(
            self.checkpoint_class,
            checkpoint,
            prefix="visual",
            family=self.family,
            part="tower",
            config=config,
        )
        with torch.device("meta"):  # a shell whose parts become the loaded tower's
            tower = self.tower_class._from_config(config)
        for part in TOWER_PARTS:
            setattr(tower, part, getattr(full, part))
        tower.__dict__["checkpoint_merger"] = full.merger  # not a submodule: the projector's, if it is taken
        return tower

    def checkpoint_projector(
        self, recipe: Mapping[str, Any], checkpoint: str, module: torch.nn.Module
    ) -> Any:
        """The checkpoint's own merger as the projector (``qwen2_vl_merger`` / ``qwen2_5_vl_merger``,
        its output the checkpoint's language-model width)."""
        merger = module.__dict__.pop("checkpoint_merger", None)
        if merger is None:
            return None
        return self.merger_projector(recipe, merger.mlp[-1].out_features, merger)

    def merger_projector(self, recipe: Mapping[str, Any], out_features: int, merger: Any = None) -> Any:
        """A ``qwen2_vl_merger`` / ``qwen2_5_vl_merger`` projector from the tower's width to
        ``out_features``: holding ``merger``'s norm and MLP (transformers' ``PatchMerger`` /
        ``Qwen2_5_VLPatchMerger``), or, with none, fresh (random weights)."""
        from mmcore.modeling.projector import MultimodalProjector, MultimodalProjectorConfig

        config = MultimodalProjectorConfig(
            projector_type=self.projector_type,
            in_features=self.output_width(recipe),
            out_features=out_features,
        )
        if merger is None:
            return MultimodalProjector(config)
        with torch.device("meta"):  # its norm and MLP are the merger's
            projector = MultimodalProjector(config)
        projector.projection.ln_q, projector.projection.mlp = merger.ln_q, merger.mlp
        return projector

    def output_width(self, recipe: Mapping[str, Any]) -> int:
        return recipe["config"][self.width_field]

    def input_names(self, recipe: Mapping[str, Any]) -> dict[str, str]:
        return dict(VIDEO_INPUTS if recipe.get("video") else IMAGE_INPUTS)

    def data_key_for(self, recipe: Mapping[str, Any]) -> str:
        return "video" if recipe.get("video") else "image"  # mmcore train: a record's videos, or its images

    def default_projector(self, recipe: Mapping[str, Any]) -> str:
        return self.projector_type

    def additional_args(self, recipe: Mapping[str, Any]) -> list[str]:
        """Qwen2.5-VL videos: ``second_per_grid_ts`` is routed to the encoder (the ``mrope`` callback
        reads it from the call), not to the language model."""
        return ["second_per_grid_ts"] if recipe.get("video") and self.family == "qwen2_5_vl" else []

    # -- data ----------------------------------------------------------------------------------------
    def processor(self, recipe: Mapping[str, Any]) -> Qwen2VLImageProcessor | Qwen2VLVideoProcessor:
        """transformers' ``Qwen2VLImageProcessor`` (or ``Qwen2VLVideoProcessor`` with ``video``) with the
        tower's patch sizes and the recipe's pixel budget."""
        config = recipe["config"]
        kwargs = dict(
            patch_size=config["patch_size"], temporal_patch_size=config["temporal_patch_size"],
            merge_size=config["spatial_merge_size"],
            size={"shortest_edge": recipe["min_pixels"], "longest_edge": recipe["max_pixels"]},
            **recipe.get("normalize", {}),
        )  # fmt: skip
        if recipe.get("video"):
            return self.video_processor_class(**kwargs, do_sample_frames=False)
        return Qwen2VLImageProcessor(**kwargs)

    def num_tokens(self, recipe: Mapping[str, Any], inputs: Mapping[str, Any]) -> list[int]:
        """Tower features per item, ``t * h * w`` of its grid (the merger then makes ``/ 4`` tokens)."""
        key = "video_grid_thw" if recipe.get("video") else "image_grid_thw"
        grid = inputs.get(key)
        if grid is None or getattr(grid, "dim", lambda: 0)() != 2 or grid.shape[-1] != 3:
            raise EncoderInputError(
                f"{self.family}: {key} must be (items, 3), the (t, h, w) patch grid of each item, got "
                f"{getattr(grid, 'shape', grid)!r}"
            )
        return [int(n) for n in torch.as_tensor(grid).prod(-1).tolist()]

    def dummy_inputs(self, recipe: Mapping[str, Any], batch_size: int = 1) -> dict[str, Any]:
        """Items of different grids (2x2 to 4x6 patches; videos two temporal patches); the grids on the
        host even in a meta-device dry run, so that token counts can be read."""
        config = recipe["config"]
        t = 2 if recipe.get("video") else 1
        grid = torch.tensor([[t, 2 * (1 + i % 2), 2 * (1 + i % 3)] for i in range(batch_size)], device="cpu")
        width = config["in_channels"] * config["temporal_patch_size"] * config["patch_size"] ** 2
        pixels = torch.randn(int(grid.prod(-1).sum()), width)
        if recipe.get("video"):
            return {"pixel_values_videos": pixels, "video_grid_thw": grid}
        return {"pixel_values": pixels, "image_grid_thw": grid}

    def dummy_items(self, recipe: Mapping[str, Any], n: int = 1) -> list[Any]:
        """Random uint8 images ``(H, W, 3)`` of different sizes (videos: ``(frames, H, W, 3)``)."""
        import numpy as np

        factor = recipe["config"]["patch_size"] * recipe["config"]["spatial_merge_size"]
        side = max(factor, math.isqrt(recipe["min_pixels"]))
        rng = np.random.default_rng(0)
        items = []
        for i in range(n):
            h, w = side + factor * (i % 2), side + factor * (i % 3)
            shape = (2 + 2 * (i % 2), h, w, 3) if recipe.get("video") else (h, w, 3)
            items.append(rng.integers(0, 256, shape, dtype=np.uint8))
        return items


class Qwen25VLVideoProcessor(Qwen2VLVideoProcessor):
    """``Qwen2VLVideoProcessor`` that also gives each video's ``second_per_grid_ts`` (seconds per
    temporal patch: ``temporal_patch_size / fps``, the video's sampled fps, 24 when unknown), as
    transformers' ``Qwen2_5_VLProcessor`` adds it; Qwen2.5-VL spaces a video's temporal positions by it."""

    def __call__(self, videos: Any, **kwargs: Any) -> Any:
        kwargs["return_metadata"] = True
        out = super().__call__(videos, **kwargs)
        seconds = [self.temporal_patch_size / metadata.sampled_fps for metadata in out.pop("video_metadata")]
        out["second_per_grid_ts"] = torch.tensor(seconds) if kwargs.get("return_tensors") == "pt" else seconds
        return out


class Qwen25VLFactory(Qwen2VLFactory):
    """Factory of the ``qwen2_5_vl`` encoder (the recipe as `Qwen2VLFactory`'s)."""

    family = "qwen2_5_vl"
    config_class = Qwen2_5_VLVisionConfig
    tower_class = Qwen25VLVisionTower
    checkpoint_class = Qwen25VLCheckpointTower
    width_field = "hidden_size"
    projector_type = "qwen2vl:qwen2_5_vl_merger"
    video_processor_class = Qwen25VLVideoProcessor
    preset_table = PRESETS["qwen2_5_vl"]


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def image_and_video_encoders(
    encoder: str = "qwen2_vl",
    checkpoint: str | None = None,
    *,
    preset: str | None = None,
    text_width: int | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``{"image": ..., "video": ...}``: two encoders over one tower and one merger, as Qwen2-VL reads
    images and videos (a model saves the shared parts once and shares them again at load).

    The merger is the checkpoint's own, or, for a preset (or with ``text_width`` given), a fresh
    ``qwen2_vl_merger`` / ``qwen2_5_vl_merger`` to the language model's width ``text_width``.

    >>> encoders = image_and_video_encoders("qwen2_vl", preset="tiny", text_width=64)  # doctest: +SKIP
    >>> model = MultimodalModel(encoders=encoders, language_model=llm)                 # doctest: +SKIP
    """
    import contextlib

    import mmcore
    from mmcore.factory import encoder_from_recipe

    image = mmcore.build_encoder(encoder, checkpoint, preset=preset, device=device, **options)
    factory, recipe = mmcore.get_factory(encoder), image.source["recipe"]
    if image.projector is None or text_width is not None:
        if text_width is None:
            raise ConfigError(
                f"{factory.family}: a preset's merger needs text_width (the language model's width)"
            )
        with torch.device(device) if device is not None else contextlib.nullcontext():
            image.projector = factory.merger_projector(recipe, text_width)
    # the image encoder's recipe for videos, built on the meta device: its tower is the image encoder's
    video = encoder_from_recipe(factory, {**recipe, "video": True}, projector=image.projector, device="meta")
    video.module = image.module
    return {"image": image, "video": video}
