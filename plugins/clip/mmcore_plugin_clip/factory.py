"""The ``clip`` encoder factory: a transformers ``CLIPVisionModel`` and its ``CLIPImageProcessor``.

A recipe holds the ``CLIPVisionConfig`` (as a dict), the image processor's config and the options;
from it everything rebuilds offline. Options:

- ``feature_layer`` (default ``-2``, LLaVA's penultimate layer): the hidden state the projector gets;
  a list of layers concatenates them along the feature axis; ``None`` uses the model's
  ``last_hidden_state``.
- ``drop_cls`` (default ``True``, as LLaVA): drop the CLS token, leaving one token per patch.

>>> import mmcore
>>> enc = mmcore.build_encoder("clip", preset="tiny", feature_layer=-1, drop_cls=False)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, PretrainedConfig

from mmcore.callbacks import DropPrefixTokens, SelectFeatureLayer
from mmcore.errors import ConfigError, EncoderInputError
from mmcore.factory import EncoderFactory
from mmcore_plugin_clip.presets import IMAGE_MEAN, IMAGE_STD, PRESETS

#: Bump when the recipe layout changes.
RECIPE_VERSION = 1


class ClipFactory(EncoderFactory):
    """Builds CLIP vision towers from a hub id, a local directory (a ``CLIPVisionModel`` or a whole
    ``CLIPModel`` checkpoint) or a preset."""

    presets = {name: preset["summary"] for name, preset in PRESETS.items()}
    options = {"feature_layer": -2, "drop_cls": True}

    # -- recipe ------------------------------------------------------------------------------------
    def make_recipe(
        self, checkpoint: str | None = None, preset: str | None = None, **options: Any
    ) -> dict[str, Any]:
        if (checkpoint is None) == (preset is None):
            raise ConfigError(f"encoder {self.name!r}: pass exactly one of checkpoint or preset")
        opts = self.check_options(options)
        if preset is not None:
            self.check_preset(preset)
            config = CLIPVisionConfig(**PRESETS[preset]["config"])
            processor = _default_processor_config(config.image_size)
        else:
            config = self._checkpoint_config(checkpoint)
            processor = self._checkpoint_processor_config(checkpoint, config.image_size)
        opts = self._check_option_values(opts, config)
        return {
            "version": RECIPE_VERSION,
            "preset": preset,
            "checkpoint": checkpoint,
            "config": _config_dict(config),
            "processor": processor,
            "options": opts,
        }

    def _checkpoint_config(self, checkpoint: str) -> CLIPVisionConfig:
        try:
            raw, _ = PretrainedConfig.get_config_dict(checkpoint)
        except OSError as exc:
            raise ConfigError(
                f"encoder {self.name!r}: cannot read the config of checkpoint {checkpoint!r} "
                f"(expected a hub id or a local directory with config.json): {exc}"
            ) from exc
        model_type = raw.get("model_type")
        if model_type == "clip":  # a whole CLIPModel: take its vision half
            raw = raw.get("vision_config") or {}
        elif model_type != "clip_vision_model":
            raise ConfigError(
                f"encoder {self.name!r}: checkpoint {checkpoint!r} is not a CLIP model: expected config.json "
                f"model_type 'clip' or 'clip_vision_model', got {model_type!r}"
            )
        return CLIPVisionConfig.from_dict(raw)

    def _checkpoint_processor_config(self, checkpoint: str, image_size: int) -> dict[str, Any]:
        try:
            return _processor_dict(CLIPImageProcessor.from_pretrained(checkpoint))
        except OSError as exc:
            # A vision tower saved alone has no preprocessor_config.json; OpenAI's preprocessing is
            # what every CLIP checkpoint uses, at the model's own resolution.
            warnings.warn(
                f"encoder {self.name!r}: checkpoint {checkpoint!r} has no readable image processor config "
                f"({' '.join(str(exc).split())[:200]}); using OpenAI CLIP preprocessing at {image_size} px",
                stacklevel=3,
            )
            return _default_processor_config(image_size)

    def _check_option_values(self, opts: dict[str, Any], config: CLIPVisionConfig) -> dict[str, Any]:
        layer = opts["feature_layer"]
        if isinstance(layer, tuple):
            layer = list(layer)
        layers = layer if isinstance(layer, list) else [layer]
        n = config.num_hidden_layers
        if layer is not None and (
            not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and -(n + 1) <= i <= n for i in layers)
        ):
            raise ConfigError(
                f"encoder {self.name!r}: feature_layer must be None, an int or a non-empty list of ints "
                f"indexing the {n + 1} hidden states (embeddings + {n} layers: {-(n + 1)}..{n}), "
                f"got {opts['feature_layer']!r}"
            )
        if not isinstance(opts["drop_cls"], bool):
            raise ConfigError(
                f"encoder {self.name!r}: drop_cls must be True or False, got {opts['drop_cls']!r}"
            )
        return {**opts, "feature_layer": layer}

    # -- module ------------------------------------------------------------------------------------
    def build_module(self, recipe: Mapping[str, Any], checkpoint: str | None = None) -> CLIPVisionModel:
        """``CLIPVisionModel.from_pretrained(checkpoint)`` (a whole CLIPModel checkpoint loads its vision
        half), or random weights without a checkpoint. Under ``torch.device("meta")`` nothing is read."""
        config = _config(recipe, self.name)
        if checkpoint is None or torch.get_default_device().type == "meta":
            return CLIPVisionModel._from_config(config)
        return CLIPVisionModel.from_pretrained(checkpoint, config=config, dtype=torch.get_default_dtype())

    def output_width(self, recipe: Mapping[str, Any]) -> int:
        layer = _options(recipe)["feature_layer"]
        return _config(recipe, self.name).hidden_size * (len(layer) if isinstance(layer, list) else 1)

    def input_names(self, recipe: Mapping[str, Any]) -> Sequence[str]:
        return ("pixel_values",)

    def default_callbacks(self, recipe: Mapping[str, Any]) -> dict[str, Any]:
        opts = _options(recipe)
        drop = 1 if opts["drop_cls"] else 0
        if opts["feature_layer"] is None:
            return {"postprocess_module": DropPrefixTokens(drop)} if drop else {}
        return {
            "postprocess_module": SelectFeatureLayer(layer=opts["feature_layer"], drop_prefix_tokens=drop)
        }

    # -- inputs ------------------------------------------------------------------------------------
    def processor(self, recipe: Mapping[str, Any]) -> ClipItemProcessor:
        return ClipItemProcessor(
            recipe.get("processor") or _default_processor_config(_config(recipe, self.name).image_size)
        )

    def num_tokens(self, recipe: Mapping[str, Any], inputs: Mapping[str, Any]) -> list[int]:
        """One token per patch of each item's ``pixel_values``, plus the CLS token unless dropped."""
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None or len(pixel_values.shape) != 4:
            got = "nothing" if pixel_values is None else f"shape {tuple(pixel_values.shape)}"
            raise EncoderInputError(
                f"encoder {self.name!r}: num_tokens needs pixel_values (batch, 3, H, W), got {got}"
            )
        patch = _config(recipe, self.name).patch_size
        height, width = pixel_values.shape[-2:]
        per_item = (height // patch) * (width // patch) + (0 if _options(recipe)["drop_cls"] else 1)
        return [per_item] * pixel_values.shape[0]

    def dummy_inputs(self, recipe: Mapping[str, Any], batch_size: int = 1) -> dict[str, Any]:
        config = _config(recipe, self.name)
        return {
            "pixel_values": torch.randn(batch_size, config.num_channels, config.image_size, config.image_size)
        }

    def dummy_items(self, recipe: Mapping[str, Any], n: int = 1) -> list[Image.Image]:
        """``n`` random RGB images of varied sizes and aspect ratios (the processor resizes them)."""
        rng = np.random.default_rng(0)
        sizes = [(37, 23), (20, 45), (64, 48), (17, 17)]
        return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in (sizes * n)[:n]]


class ClipItemProcessor:
    """``processor(items) -> {"pixel_values": Tensor (N, 3, H, W)}`` for PIL images or HWC ``uint8``
    numpy arrays (a single item is accepted too); wraps ``transformers.CLIPImageProcessor``."""

    def __init__(self, config: Mapping[str, Any]):
        #: the transformers processor (``save_pretrained`` it to ship it with a model).
        self.image_processor = CLIPImageProcessor.from_dict(dict(config))

    def __repr__(self) -> str:
        return f"ClipItemProcessor({self.image_processor.crop_size})"

    def __call__(self, items: Any) -> dict[str, torch.Tensor]:
        if isinstance(items, (Image.Image, np.ndarray)):
            items = [items]
        images = [_to_image(item, i) for i, item in enumerate(items)]
        if not images:
            raise EncoderInputError("clip processor: got no images")
        return {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}


def _to_image(item: Any, index: int) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if (
        isinstance(item, np.ndarray)
        and item.dtype == np.uint8
        and (item.ndim == 2 or (item.ndim == 3 and item.shape[-1] in (1, 3, 4)))
    ):
        # Through PIL, so a tiny image's channel axis is never guessed.
        return Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[-1] == 1 else item)
    what = (
        f"array of dtype {item.dtype} and shape {item.shape}"
        if isinstance(item, np.ndarray)
        else type(item).__name__
    )
    raise EncoderInputError(
        f"clip processor: item {index} must be a PIL image or an (H, W, 3) uint8 numpy array, got {what}"
    )


def _default_processor_config(image_size: int) -> dict[str, Any]:
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return _processor_dict(processor)


def _processor_dict(processor: CLIPImageProcessor) -> dict[str, Any]:
    # Through its JSON form (enums become ints, tuples lists): the recipe lives in config.json.
    return json.loads(processor.to_json_string())


def _config_dict(config: CLIPVisionConfig) -> dict[str, Any]:
    d = json.loads(config.to_json_string(use_diff=False))
    # The module's dtype follows torch's default (or from_pretrained's dtype=), not the checkpoint's.
    for key in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        d.pop(key, None)
    return d


def _config(recipe: Mapping[str, Any], name: str) -> CLIPVisionConfig:
    config = recipe.get("config")
    if not isinstance(config, Mapping):
        raise ConfigError(f"encoder {name!r}: the recipe has no 'config' mapping: {dict(recipe)!r}")
    return CLIPVisionConfig.from_dict(dict(config))


def _options(recipe: Mapping[str, Any]) -> dict[str, Any]:
    return {**ClipFactory.options, **(recipe.get("options") or {})}
