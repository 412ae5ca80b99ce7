"""The EVA02 encoder factory: a timm ViT cut at a feature layer, as OmniLMM uses EVA02.

The module is ``timm.create_model(name, num_classes=0, dynamic_img_size=True, ...)`` with the blocks
after ``feature_layer`` removed by timm's ``prune_intermediate_layers`` (OmniLMM replaces the last
block with an identity). Its output is therefore the penultimate block's tokens after the final norm,
which is what OmniLMM's ``forward_features`` returns; the default ``postprocess_module`` callback,
the built-in `~mmcore.callbacks.DropPrefixTokens`, removes the class (and register) tokens, and the
default projector is a resampler. Pruning, not a callback, picks the layer: the unused last block is
never stored, computed, or left without gradients.

Where the weights come from (``checkpoint``):

- a timm name with a pretrained tag, ``eva02_large_patch14_clip_224.merged2b`` (timm downloads it);
- ``hf-hub:timm/...`` or an ``org/name`` hub id, and a local directory in timm's hub layout
  (``config.json`` + ``model.safetensors``, as ``timm.models.save_for_hf`` writes);
- a local weights file (``.safetensors``, or a ``.pth``/``.bin`` read with ``weights_only=True``)
  for the architecture named by the ``model_name`` option.

Any timm ViT-style model (``patch_embed``, ``blocks``, ``num_prefix_tokens``) works, e.g.
``build_encoder("eva02", "vit_base_patch16_224.augreg_in21k")``.
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_model_data_config
from torch import nn

from mmcore.callbacks import DropPrefixTokens
from mmcore.errors import ConfigError
from mmcore.factory import EncoderFactory
from mmcore_plugin_eva02.presets import PRESETS

#: create_model arguments every module is built with (the recipe cannot change them).
FIXED_KWARGS = {"num_classes": 0, "dynamic_img_size": True}
_SOURCES = ("hf-hub:", "local-dir:")
#: timm data-config entries the ``data_config`` option may change.
DATA_CONFIG_KEYS = ("interpolation", "mean", "std", "crop_pct", "crop_mode")


def weights_source(checkpoint: str) -> tuple[str, str]:
    """Classify ``checkpoint``: ``("file", path)`` or ``("timm", name)``, where ``name`` is a timm
    registry name (``arch`` or ``arch.tag``) or an ``hf-hub:``/``local-dir:`` source timm resolves."""
    if checkpoint.startswith(_SOURCES):
        return "timm", checkpoint
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return "timm", f"local-dir:{path.resolve()}"
    if path.is_file():
        return "file", str(path.resolve())
    if "/" in checkpoint or "\\" in checkpoint:
        if checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") != 1:
            raise ConfigError(
                f"eva02: checkpoint {checkpoint!r} is neither an existing file or directory nor a hub id"
            )
        return "timm", f"hf-hub:{checkpoint}"
    arch = checkpoint.partition(".")[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ConfigError(
            f"eva02: checkpoint {checkpoint!r} is not a timm model name, a hub id or an existing path{hint}"
        )
    return "timm", checkpoint


def _create(name: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError, FileNotFoundError, AssertionError) as exc:
        given = {k: v for k, v in kwargs.items() if k not in FIXED_KWARGS and k != "pretrained"}
        call = ", ".join([repr(name), *(f"{k}={v!r}" for k, v in given.items())])
        raise ConfigError(f"eva02: timm.create_model({call}) failed: {type(exc).__name__}: {exc}") from exc


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"eva02: {what} must be JSON-able (it is stored in config.json), got {value!r}"
        ) from exc


def load_weights_file(model: nn.Module, path: str, model_name: str) -> None:
    """Load a weights file into the (pruned) ``model``: safetensors, or a pickle read with
    ``weights_only=True``; original EVA / OpenCLIP layouts go through the architecture's timm
    ``checkpoint_filter_fn``. Weights the pruned model has no place for (later blocks, a classifier
    head) are skipped; a weight the model needs but the file lacks is a `ConfigError`."""
    try:
        state_dict = timm.models.load_state_dict(path, weights_only=True)
    except Exception as exc:
        raise ConfigError(f"eva02: cannot read weights file {path!r}: {type(exc).__name__}: {exc}") from exc
    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"eva02: weights file {path!r} does not fit {model_name}: {exc}") from exc
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:5]) + (", ..." if len(result.missing_keys) > 5 else "")
        raise ConfigError(
            f"eva02: weights file {path!r} lacks {len(result.missing_keys)} weights of {model_name}: {shown}"
        )


class TimmImageProcessor:
    """Images -> ``{"pixel_values": (items, 3, H, W)}`` with timm's evaluation transforms
    (``timm.data.create_transform(**data_config, is_training=False)``: resize, center crop, normalize).

    Items are PIL images or ``(H, W[, C])`` uint8 arrays; any mode is converted to RGB.
    """

    def __init__(self, data_config: Mapping[str, Any]):
        self.data_config = dict(data_config)
        self.transform = create_transform(**self.data_config, is_training=False)

    def __repr__(self) -> str:
        return f"TimmImageProcessor({self.data_config})"

    def __call__(self, items: Any) -> dict[str, torch.Tensor]:
        from PIL import Image

        if isinstance(items, Image.Image):
            items = [items]
        images = []
        for i, item in enumerate(items):
            if not isinstance(item, Image.Image):
                try:
                    import numpy as np

                    item = Image.fromarray(np.asarray(item))
                except (TypeError, ValueError) as exc:
                    raise ConfigError(
                        f"eva02 processor: item {i} must be a PIL image or an (H, W[, C]) uint8 array, "
                        f"got {type(item).__name__}"
                    ) from exc
            images.append(self.transform(item.convert("RGB")))
        if not images:
            raise ConfigError("eva02 processor: no images given")
        return {"pixel_values": torch.stack(images)}


class Eva02Factory(EncoderFactory):
    """Factory of the ``eva02`` encoder. Recipe fields: ``model_name`` and ``model_kwargs`` (what
    ``timm.create_model`` gets besides ``num_classes=0, dynamic_img_size=True``), ``feature_layer``,
    ``final_norm``, ``data_config`` (timm's, for the processor), and facts read off the architecture:
    ``patch_size``, ``num_prefix_tokens``, ``width``, ``depth``, ``dynamic_img_pad``."""

    preset_table = PRESETS
    options = {
        "model_name": None,  # timm architecture: needed with a weights file; with preset "tiny", a tiny one
        "feature_layer": -2,  # block whose output is used (OmniLMM: the penultimate)
        "final_norm": True,  # apply the model's final norm to it (OmniLMM's forward_features does)
        "img_size": None,  # input resolution (int or [H, W]); timm resamples the position embedding
        "dynamic_img_pad": False,  # pad images to a multiple of the patch size (OmniLMM: True)
        "model_kwargs": None,  # further timm.create_model arguments, e.g. {"drop_path_rate": 0.1}
        "data_config": None,  # changes to timm's data config, e.g. {"crop_mode": "squash"}: resize, no crop
    }

    data_key = "image"  # a training record's "image" paths are this encoder's items (read by load_item)

    # -- recipe --------------------------------------------------------------------------------------

    def make_recipe(
        self, checkpoint: str | None = None, preset: str | None = None, **options: Any
    ) -> dict[str, Any]:
        opts = self.check_options(options)
        user_kwargs = dict(opts["model_kwargs"] or {})
        fixed = sorted(set(user_kwargs) & set(FIXED_KWARGS))
        if fixed:
            raise ConfigError(f"eva02: model_kwargs may not set {', '.join(fixed)} (always {FIXED_KWARGS})")
        if opts["img_size"] is not None:
            user_kwargs["img_size"] = opts["img_size"]
        if opts["dynamic_img_pad"]:
            user_kwargs["dynamic_img_pad"] = True
        if preset is not None:
            entry = PRESETS[self.check_preset(preset)]
            model_name = entry["model_name"]
            if opts["model_name"] is not None:
                if not entry.get("overrides"):
                    raise ConfigError(
                        f"eva02: preset {preset!r} fixes the architecture ({model_name}); "
                        "model_name= goes with "
                        "preset 'tiny' (a tiny model of that architecture) or with a checkpoint file"
                    )
                model_name = opts["model_name"]
            kwargs = {**entry.get("overrides", {}), **user_kwargs}
        else:
            source_kind, model_name = weights_source(checkpoint)
            if source_kind == "file":
                if opts["model_name"] is None:
                    raise ConfigError(
                        f"eva02: checkpoint file {checkpoint!r} needs model_name=<timm architecture>, "
                        "e.g. model_name='eva02_enormous_patch14_clip_224'"
                    )
                model_name = weights_source(opts["model_name"])[1]
            elif opts["model_name"] is not None:
                raise ConfigError(
                    f"eva02: checkpoint {checkpoint!r} names its architecture; "
                    "model_name= is for checkpoint files"
                )
            kwargs = user_kwargs
        kwargs = _jsonable(kwargs, "model_kwargs")
        with torch.device("meta"):  # read the architecture, allocate nothing
            model = _create(model_name, pretrained=False, **kwargs, **FIXED_KWARGS)
        needed = ("patch_embed", "blocks", "num_prefix_tokens", "prune_intermediate_layers")
        missing = [attr for attr in needed if not hasattr(model, attr)]
        if missing:
            raise ConfigError(
                f"eva02: {model_name!r} ({type(model).__name__}) is not a ViT-style timm model; "
                f"it lacks {', '.join(missing)}"
            )
        if model_name.startswith(_SOURCES):
            # hub / directory sources: record the architecture and the arguments its config.json gave,
            # so the module rebuilds offline from the recipe alone.
            model_name = model.pretrained_cfg["architecture"]
            kwargs = _jsonable(
                {k: v for k, v in getattr(model, "_model_args", {}).items() if k not in FIXED_KWARGS},
                "model_kwargs",
            )
        depth = len(model.blocks)
        layer = opts["feature_layer"]
        if not isinstance(layer, int) or isinstance(layer, bool) or not -depth <= layer < depth:
            raise ConfigError(
                f"eva02: feature_layer must be an int in [{-depth}, {depth - 1}] for {model_name}, "
                f"got {layer!r}"
            )
        img_size, patch_size = model.patch_embed.img_size, model.patch_embed.patch_size
        padded = bool(getattr(model.patch_embed, "dynamic_img_pad", False))
        if not padded and any(side % patch for side, patch in zip(img_size, patch_size)):
            raise ConfigError(
                f"eva02: img_size {list(img_size)} is not a multiple of the patch size {list(patch_size)}; "
                "choose another or pass dynamic_img_pad=True"
            )
        data_config = resolve_model_data_config(model)
        data_config["input_size"] = (data_config["input_size"][0], *img_size)
        changes = dict(opts["data_config"] or {})
        unknown = sorted(set(changes) - set(DATA_CONFIG_KEYS))
        if unknown:
            raise ConfigError(
                f"eva02: data_config cannot set {', '.join(unknown)} (it sets {', '.join(DATA_CONFIG_KEYS)}; "
                "the size follows img_size)"
            )
        data_config.update(changes)
        return {
            "model_name": model_name,
            "model_kwargs": kwargs,
            "feature_layer": layer,
            "final_norm": bool(opts["final_norm"]),
            "data_config": _jsonable(data_config, "data_config"),
            "patch_size": list(patch_size),
            "num_prefix_tokens": int(model.num_prefix_tokens),
            "width": int(model.num_features),
            "depth": depth,
            "dynamic_img_pad": padded,
        }

    # -- module --------------------------------------------------------------------------------------
    def build_module(self, recipe: Mapping[str, Any], checkpoint: str | None = None) -> nn.Module:
        """The timm model, weights from ``checkpoint`` (see the module docstring) or random, pruned
        after ``feature_layer``. Inside ``with torch.device("meta")`` nothing is allocated."""
        kwargs = {**recipe["model_kwargs"], **FIXED_KWARGS}
        kind, source = weights_source(checkpoint) if checkpoint is not None else ("random", "")
        if kind == "timm":
            model = _create(source, pretrained=True, **kwargs)
        else:
            model = _create(recipe["model_name"], pretrained=False, **kwargs)
        model.prune_intermediate_layers(
            indices=[recipe["feature_layer"]], prune_norm=not recipe["final_norm"], prune_head=True
        )
        if kind == "file":
            load_weights_file(model, source, recipe["model_name"])
        return model

    def output_width(self, recipe: Mapping[str, Any]) -> int:
        return recipe["width"]

    def input_names(self, recipe: Mapping[str, Any]) -> dict[str, str]:
        return {"pixel_values": "x"}  # timm models take x

    def default_callbacks(self, recipe: Mapping[str, Any]) -> dict[str, Any]:
        n = recipe["num_prefix_tokens"]
        return {"postprocess_module": DropPrefixTokens(n)} if n else {}

    def default_projector(self, recipe: Mapping[str, Any]) -> str:
        return "resampler"  # as OmniLMM: a fixed number of tokens per image

    # -- data ----------------------------------------------------------------------------------------
    def processor(self, recipe: Mapping[str, Any]) -> TimmImageProcessor:
        return TimmImageProcessor(recipe["data_config"])

    def num_tokens(self, recipe: Mapping[str, Any], inputs: Mapping[str, Any]) -> list[int]:
        """Patch tokens per image (prefix tokens dropped by the default callback), *before* the
        projector: the resampler then makes ``num_queries`` of them
        (``MultimodalProjector.num_output_tokens``)."""
        pixel_values = inputs["pixel_values"]
        if getattr(pixel_values, "dim", lambda: 0)() != 4:
            shape = getattr(pixel_values, "shape", pixel_values)
            raise ConfigError(f"eva02: pixel_values must be (items, 3, H, W), got {shape!r}")
        height, width = pixel_values.shape[-2:]
        ph, pw = recipe["patch_size"]
        if not recipe["dynamic_img_pad"] and (height % ph or width % pw):
            raise ConfigError(
                f"eva02: images of {height}x{width} px are not a whole number of {ph}x{pw} patches; "
                "resize them (the processor does) or build with dynamic_img_pad=True"
            )
        return [math.ceil(height / ph) * math.ceil(width / pw)] * pixel_values.shape[0]

    def dummy_inputs(self, recipe: Mapping[str, Any], batch_size: int = 1) -> dict[str, Any]:
        channels, height, width = recipe["data_config"]["input_size"]
        return {"pixel_values": torch.randn(batch_size, channels, height, width)}

    def dummy_items(self, recipe: Mapping[str, Any], n: int = 1) -> list[Any]:
        """Random-noise RGB images of different sizes and aspect ratios."""
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        sizes = [(30 + 9 * i, 40 + 13 * i, 3) for i in range(n)]
        return [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for size in sizes]
