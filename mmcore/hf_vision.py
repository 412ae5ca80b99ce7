"""A base encoder factory for transformers ViT-style vision towers (CLIP, SigLIP; DINOv2, AIMv2, ...).

`TransformersVisionFactory` holds everything such a factory does: recipes from a preset or a
checkpoint (a vision-only model, or the vision half of a whole image-text model), the module (from
the checkpoint, random, or on the meta device), the ``feature_layer`` option and its callback, an
image processor, token counts and dummy inputs. A subclass names the transformers classes and model
types, its presets and options, and overrides a few small hooks for what its family does differently
(a CLS token, a pooling head, its default preprocessing). The ``clip`` and ``siglip`` plugins are two
such subclasses.

What it supports: a ``model_class`` whose ``forward(pixel_values=...)`` returns ``last_hidden_state``
and, with ``output_hidden_states=True``, ``hidden_states`` (embeddings + one per layer); one token per
``patch_size`` x ``patch_size`` patch after a fixed number of prefix tokens (CLS, registers); a
config with ``hidden_size``, ``num_hidden_layers``, ``image_size``, ``patch_size`` (an int) and
``num_channels``; an image processor that makes ``pixel_values`` from PIL images. Towers that
change the token count per image (any-resolution tiling, pooling, merging patches) need their own
`num_tokens` and callbacks.

A third tower is a few lines (the ``dinov2`` model type has no whole-model variant)::

    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    class Dinov2Factory(TransformersVisionFactory):
        model_class, config_class, image_processor_class = Dinov2Model, Dinov2Config, BitImageProcessor
        model_type, family = "dinov2", "DINOv2"
        presets = {"tiny": "2 layers, width 32, 28 px"}
        preset_configs = {"tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       patch_size=14, image_size=28)}

        def prefix_tokens(self, config):
            return 1  # the CLS token

        def default_processor(self, image_size):
            return BitImageProcessor(size={"shortest_edge": image_size},
                                     crop_size={"height": image_size, "width": image_size})

Video: the option ``video=True`` makes the same tower an encoder of videos (LLaVA-Video /
OneVision style): its items are videos (a list of frames, or a ``(frames, H, W, 3)`` array), each
frame goes through the tower, and the built-in ``video_frames`` / ``video_pool`` callbacks pool each
frame's patch grid by ``video_stride`` (default 2, bilinear) and lay the frames one after the other;
the token count per video is exact (`mmcore.builtin.video`). The CLS token must be dropped (CLIP's
``drop_cls=True``, the default).

Unlike `mmcore.factory`, this module imports torch, transformers and Pillow (which transformers'
image processors need anyway; a plugin built on it lists ``pillow`` in its dependencies, as the
``clip`` and ``siglip`` plugins do): import it from a plugin's factory module (loaded lazily), never
from its entry module.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import PretrainedConfig, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor

from mmcore.callbacks import DropPrefixTokens, SelectFeatureLayer
from mmcore.errors import ConfigError, EncoderInputError
from mmcore.factory import EncoderFactory
from mmcore.items import each_item

#: Bump when the recipe layout changes (saved models store it in their config.json).
RECIPE_VERSION = 1
#: Options every transformers vision factory takes for video (recorded only when ``video=True``).
VIDEO_OPTIONS: dict[str, Any] = {"video": False, "video_stride": 2}


class TransformersVisionFactory(EncoderFactory):
    """Builds a transformers vision tower from a hub id, a local directory (a vision-only model, or a
    whole model whose ``config.json`` holds the vision half under ``vision_config``) or a preset.

    A recipe is ``{"version", "preset", "checkpoint", "config", "processor", "options"}``: the vision
    config and the image processor config as JSON dicts, and the options; from it everything
    rebuilds offline.

    Class attributes a subclass sets:
        model_class, config_class, image_processor_class: the transformers classes.
        model_type: the vision-only ``config.json`` ``model_type`` (``"clip_vision_model"``).
        whole_model_type: the whole model's ``model_type`` (``"clip"``), or None if there is none.
        family: the display name in messages (``"CLIP"``); lower-cased, it prefixes processor errors.
        preset_table: name -> ``{"summary": one line, "config": config_class keyword arguments}``
            (other keys, such as the ``"checkpoint"`` an architecture copies, are ignored); it sets
            ``presets`` (name -> summary, as in every `EncoderFactory`) and ``preset_configs`` (name ->
            config). A subclass may set those two directly instead.
        options: name -> default; must include ``feature_layer``. Every option whose default is a
            bool only accepts True or False.
        default_processing: how the default processor preprocesses, for the warning when a
            checkpoint has no processor config (default: ``"<family> preprocessing"``).

    Hooks a subclass overrides: `default_processor` (required), `prefix_tokens`,
    `dropped_prefix_tokens`, `configure`.
    """

    data_key = "image"  # a training record's "image" paths are this encoder's items (read by load_item)

    model_class: ClassVar[type[PreTrainedModel]]
    config_class: ClassVar[type[PretrainedConfig]]
    image_processor_class: ClassVar[type[BaseImageProcessor]]
    model_type: ClassVar[str]
    whole_model_type: ClassVar[str | None] = None
    family: ClassVar[str]
    preset_configs: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    options: ClassVar[Mapping[str, Any]] = {"feature_layer": -1}
    default_processing: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)  # presets, from the table
        table = cls.__dict__.get("preset_table")
        if table is not None and "preset_configs" not in cls.__dict__:  # what the subclass sets wins
            cls.preset_configs = {name: entry["config"] for name, entry in table.items()}

    # -- hooks -------------------------------------------------------------------------------------
    def default_processor(self, image_size: int) -> BaseImageProcessor:
        """*Required.* The family's image processor at ``image_size`` px, used for presets and for a
        checkpoint without ``preprocessor_config.json``."""
        raise NotImplementedError(f"{type(self).__name__} must implement default_processor(image_size)")

    def image_size(self, config: PretrainedConfig) -> int:
        """The image size (px) the family's processor makes for ``config``, used for presets, checkpoints
        without a processor config, and dummy inputs. Default ``config.image_size``; override it where
        that is the size of a position table rather than of the images (DINOv2: a 518 px table, 224 px
        crops)."""
        return config.image_size

    def prefix_tokens(self, config: PretrainedConfig) -> int:
        """How many tokens the model outputs before its patch tokens (CLIP: 1, the CLS token)."""
        return 0

    def dropped_prefix_tokens(self, options: Mapping[str, Any]) -> int:
        """How many of the prefix tokens the default callbacks drop, given the recipe's options."""
        return 0

    def configure(self, config: PretrainedConfig, options: Mapping[str, Any]) -> None:
        """Apply the (checked) options to the config before it goes into the recipe (in place)."""

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The family's options, plus `VIDEO_OPTIONS` when ``video=True`` (an image encoder's recipe
        stays as it was)."""
        options = dict(options)
        video = {k: options.pop(k) for k in list(options) if k in VIDEO_OPTIONS}
        opts = super().check_options(options)
        if not isinstance(video.get("video", False), bool):
            raise ConfigError(f"encoder {self.name!r}: video must be True or False, got {video['video']!r}")
        if video.get("video"):
            stride = video.get("video_stride", VIDEO_OPTIONS["video_stride"])
            if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
                raise ConfigError(f"encoder {self.name!r}: video_stride must be a positive int, got {stride!r}")
            opts.update(video=True, video_stride=stride)
        elif "video_stride" in video:
            raise ConfigError(f"encoder {self.name!r}: video_stride needs video=True")
        return opts

    def is_video(self, recipe: Mapping[str, Any]) -> bool:
        """Whether the recipe's items are videos (``video=True``)."""
        return bool(self._options(recipe).get("video"))

    def data_key_for(self, recipe: Mapping[str, Any]) -> str | None:
        """``"video"`` for a ``video=True`` recipe (its items are videos), else ``"image"``."""
        return "video" if self.is_video(recipe) else self.data_key

    # -- recipe ------------------------------------------------------------------------------------
    def make_recipe(
        self, checkpoint: str | None = None, preset: str | None = None, **options: Any
    ) -> dict[str, Any]:
        if (checkpoint is None) == (preset is None):
            raise ConfigError(f"encoder {self.name!r}: pass exactly one of checkpoint or preset")
        opts = self.check_options(options)
        if preset is not None:
            self.check_preset(preset)
            config = self.config_class(**self.preset_configs[preset])
            processor = self._default_processor_config(self.image_size(config))
        else:
            config = self._checkpoint_config(checkpoint)
            processor = self._checkpoint_processor_config(checkpoint, self.image_size(config))
        opts = self._check_option_values(opts, config)
        if opts.get("video") and self.prefix_tokens(config) - self.dropped_prefix_tokens(opts):
            raise ConfigError(
                f"encoder {self.name!r}: video pools each frame's patch grid, so the prefix (CLS) token must be "
                "dropped (clip: drop_cls=True)"
            )
        self.configure(config, opts)
        return {
            "version": RECIPE_VERSION,
            "preset": preset,
            "checkpoint": checkpoint,
            "config": _config_dict(config),
            "processor": processor,
            "options": opts,
        }

    def _checkpoint_config(self, checkpoint: str) -> PretrainedConfig:
        try:
            raw, _ = PretrainedConfig.get_config_dict(checkpoint)
        except OSError as exc:
            raise ConfigError(
                f"encoder {self.name!r}: cannot read the config of checkpoint {checkpoint!r} "
                f"(expected a hub id or a local directory with config.json): {exc}"
            ) from exc
        model_type = raw.get("model_type")
        if self.whole_model_type is not None and model_type == self.whole_model_type:
            raw = raw.get("vision_config") or {}  # a whole model: take its vision half
        elif model_type != self.model_type:
            expected = " or ".join(repr(t) for t in (self.whole_model_type, self.model_type) if t is not None)
            raise ConfigError(
                f"encoder {self.name!r}: checkpoint {checkpoint!r} is not a {self.family} model: expected "
                f"config.json model_type {expected}, got {model_type!r}"
            )
        return self.config_class.from_dict(raw)

    def _checkpoint_processor_config(self, checkpoint: str, image_size: int) -> dict[str, Any]:
        try:
            return _processor_dict(self.image_processor_class.from_pretrained(checkpoint, trust_remote_code=False))
        except OSError as exc:
            # A vision tower saved alone has no preprocessor_config.json; the family's preprocessing
            # is what its checkpoints use, at the model's own resolution.
            processing = self.default_processing or f"{self.family} preprocessing"
            warnings.warn(
                f"encoder {self.name!r}: checkpoint {checkpoint!r} has no readable image processor config "
                f"({' '.join(str(exc).split())[:200]}); using {processing} at {image_size} px",
                stacklevel=3,
            )
            return self._default_processor_config(image_size)

    def _default_processor_config(self, image_size: int) -> dict[str, Any]:
        return _processor_dict(self.default_processor(image_size))

    def _check_option_values(self, opts: dict[str, Any], config: PretrainedConfig) -> dict[str, Any]:
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
        return {**opts, "feature_layer": layer}

    # -- module ------------------------------------------------------------------------------------
    def build_module(self, recipe: Mapping[str, Any], checkpoint: str | None = None) -> PreTrainedModel:
        """``model_class.from_pretrained(checkpoint)`` with the recipe's config (a whole-model checkpoint
        loads its vision half where the transformers class can), or random weights without a
        checkpoint. Under ``torch.device("meta")`` nothing is read."""
        config = self._config(recipe)
        if checkpoint is None or torch.get_default_device().type == "meta":
            return self.model_class._from_config(config)
        return self.model_class.from_pretrained(
            checkpoint, config=config, dtype=torch.get_default_dtype(), trust_remote_code=False
        )

    def output_width(self, recipe: Mapping[str, Any]) -> int:
        layer = self._options(recipe)["feature_layer"]
        return self._config(recipe).hidden_size * (len(layer) if isinstance(layer, list) else 1)

    def input_names(self, recipe: Mapping[str, Any]) -> Sequence[str]:
        return ("pixel_values",)

    def default_callbacks(self, recipe: Mapping[str, Any]) -> dict[str, Any]:
        opts = self._options(recipe)
        drop = self.dropped_prefix_tokens(opts)
        if opts["feature_layer"] is None:
            callbacks = {"postprocess_module": DropPrefixTokens(drop)} if drop else {}
        else:
            callbacks = {
                "postprocess_module": SelectFeatureLayer(layer=opts["feature_layer"], drop_prefix_tokens=drop)
            }
        if self.is_video(recipe):
            from mmcore.builtin.video import VideoFrames

            callbacks["preprocess"] = VideoFrames()
            callbacks["postprocess_projector"] = self._video_pool(recipe)
        return callbacks

    def additional_args(self, recipe: Mapping[str, Any]) -> Sequence[str]:
        return ("num_frames",) if self.is_video(recipe) else ()

    # -- inputs ------------------------------------------------------------------------------------
    def processor(self, recipe: Mapping[str, Any]) -> Any:
        config = recipe.get("processor") or self._default_processor_config(self.image_size(self._config(recipe)))
        images = ImageItemProcessor(self.image_processor_class, config, self.family.lower())
        if self.is_video(recipe):
            from mmcore.builtin.video import VideoItemProcessor

            return VideoItemProcessor(images.image_processor, f"{self.family.lower()} video")
        return images

    def num_tokens(self, recipe: Mapping[str, Any], inputs: Mapping[str, Any]) -> list[int]:
        """One token per patch of each item's ``pixel_values``, plus the prefix tokens not dropped; for
        video, each frame's pooled grid times the video's frames."""
        if self.is_video(recipe):
            return self._video_pool(recipe).token_count()(None, inputs)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None or len(pixel_values.shape) != 4:
            got = "nothing" if pixel_values is None else f"shape {tuple(pixel_values.shape)}"
            raise EncoderInputError(
                f"encoder {self.name!r}: num_tokens needs pixel_values (batch, 3, H, W), got {got}"
            )
        config = self._config(recipe)
        height, width = pixel_values.shape[-2:]
        prefix = self.prefix_tokens(config) - self.dropped_prefix_tokens(self._options(recipe))
        per_item = (height // config.patch_size) * (width // config.patch_size) + prefix
        return [per_item] * pixel_values.shape[0]

    def _video_pool(self, recipe: Mapping[str, Any]) -> Any:
        """The `VideoPool` of a ``video=True`` recipe: the processed frame's grid, pooled by ``video_stride``."""
        from mmcore.builtin.video import VideoPool

        config = self._config(recipe)
        height, _ = self._processed_size(recipe, config)
        return VideoPool(height, config.patch_size, self._options(recipe)["video_stride"])

    def dummy_inputs(self, recipe: Mapping[str, Any], batch_size: int = 1) -> dict[str, Any]:
        config = self._config(recipe)
        height, width = self._processed_size(recipe, config)
        if self.is_video(recipe):
            frames = 2
            return {
                "pixel_values": torch.randn(batch_size, frames, config.num_channels, height, width),
                "num_frames": torch.full((batch_size,), frames, dtype=torch.long),
            }
        return {"pixel_values": torch.randn(batch_size, config.num_channels, height, width)}

    def dummy_items(self, recipe: Mapping[str, Any], n: int = 1) -> list[Any]:
        """``n`` random RGB images of varied sizes and aspect ratios (the processor resizes them); for
        video, ``n`` random ``(frames, H, W, 3)`` videos of 1 to 3 frames."""
        rng = np.random.default_rng(0)
        sizes = [(37, 23), (20, 45), (64, 48), (17, 17)]
        if self.is_video(recipe):
            return [rng.integers(0, 256, (1 + i % 3, h, w, 3), dtype=np.uint8) for i, (h, w) in enumerate((sizes * n)[:n])]
        return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in (sizes * n)[:n]]

    # -- helpers -----------------------------------------------------------------------------------
    def _config(self, recipe: Mapping[str, Any]) -> PretrainedConfig:
        config = recipe.get("config")
        if not isinstance(config, Mapping):
            raise ConfigError(f"encoder {self.name!r}: the recipe has no 'config' mapping: {dict(recipe)!r}")
        return self.config_class.from_dict(dict(config))

    def _processed_size(self, recipe: Mapping[str, Any], config: PretrainedConfig) -> tuple[int, int]:
        """(height, width) of what the recipe's processor makes: its crop, else its fixed size, else
        the family's `image_size`."""
        processor = recipe.get("processor") or {}
        crop = processor.get("crop_size") if processor.get("do_center_crop") else None
        size = processor.get("size") if processor.get("do_resize", True) else None
        for box in (crop, size):
            if isinstance(box, Mapping) and "height" in box and "width" in box:
                return int(box["height"]), int(box["width"])
        side = self.image_size(config)
        return side, side

    def _options(self, recipe: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.options, **(recipe.get("options") or {})}


class ImageItemProcessor:
    """``processor(items) -> {"pixel_values": Tensor (N, 3, H, W)}`` for PIL images or HWC ``uint8``
    numpy arrays (a single item is accepted too); wraps a transformers image processor built from
    ``config`` by ``image_processor_class``. ``name`` prefixes its error messages."""

    def __init__(self, image_processor_class: type[BaseImageProcessor], config: Mapping[str, Any], name: str):
        #: the transformers processor (``save_pretrained`` it to ship it with a model).
        self.image_processor = image_processor_class.from_dict(dict(config))
        self.name = name

    def __repr__(self) -> str:
        return f"ImageItemProcessor({self.name!r}, {type(self.image_processor).__name__})"

    def __call__(self, items: Any) -> dict[str, torch.Tensor]:
        images = each_item(items, (Image.Image, np.ndarray), self._to_image, f"{self.name} processor", "images")
        return {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}

    def _to_image(self, item: Any, index: int) -> Image.Image:
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
            f"{self.name} processor: item {index} must be a PIL image or an (H, W, 3) uint8 numpy array, got {what}"
        )


def _processor_dict(processor: BaseImageProcessor) -> dict[str, Any]:
    # Through its JSON form (enums become ints, tuples lists): the recipe lives in config.json.
    return json.loads(processor.to_json_string())


def _config_dict(config: PretrainedConfig) -> dict[str, Any]:
    d = json.loads(config.to_json_string(use_diff=False))
    # The module's dtype follows torch's default (or from_pretrained's dtype=), not the checkpoint's.
    for key in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        d.pop(key, None)
    return d
