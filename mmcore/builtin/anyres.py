"""LLaVA-NeXT any-resolution tiling ("anyres") as two built-in callbacks and a token count.

An image is resized to the best of a list of grid resolutions (``grid_pinpoints``), cut into tiles of
the tower's input size, and the tower sees the tiles plus a downscaled copy of the whole image (the
"base"). transformers' ``LlavaNextImageProcessor`` does that part and gives ``pixel_values`` of shape
``(images, max_tiles + 1, 3, size, size)`` (zero-padded) and ``image_sizes`` ``(images, 2)``. Then:

- `AnyResFlatten` (``preprocess``): the padded ``(images, tiles, 3, H, W)`` becomes the real tiles of
  every image, ``(sum of tiles, 3, H, W)``, for the tower;
- the tower, feature selection (`SelectFeatureLayer`: LLaVA-NeXT's ``vision_feature_layer`` and the
  ``default`` strategy's dropped CLS) and the projector run as for any image;
- `AnyResPack` (``postprocess_projector``): per image, the base tile's tokens, then the tiles' tokens
  laid out as the image's grid, the padding rows/columns the resize added removed ("unpad"), and a
  learnable ``image_newline`` after each row. It is a module: ``image_newline`` is a parameter of the
  encoder's projector side, saved and loaded with the model.

The encoder needs ``image_sizes`` routed to it but not passed to the tower:
``ModalEncoderModule(tower, ..., additional_args=["image_sizes"])`` (`anyres_encoder` does all of it).
`AnyResTokenCount` is the processor's per-image token count (``num_feature_calculation_funcs``).

LLaVA-OneVision tiles the same way and then, per image, downscales an unpadded grid holding more than
``N`` tiles' worth of tokens (``vision_aspect_ratio="anyres_max_N"``) before the newlines: the
``max_patches=N`` option of `AnyResPack` and `AnyResTokenCount` (unset: LLaVA-NeXT, and absent from
the saved record).

The layout follows transformers' ``LlavaNextModel.pack_image_features`` and reuses its grid helpers
(``get_anyres_image_grid_shape``, ``image_size_to_num_patches``, ``unpad_image``), so the result is
what ``LlavaNextForConditionalGeneration`` computes from the same parts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from mmcore.builtin.callbacks import Callback
from mmcore.errors import ConfigError, EncoderInputError


def _pinpoints(grid_pinpoints: Any) -> list[list[int]]:
    ok = isinstance(grid_pinpoints, (list, tuple)) and grid_pinpoints and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and x > 0 for x in p)
        for p in grid_pinpoints
    )
    if not ok:
        raise ConfigError(f"anyres: grid_pinpoints must be a list of [height, width] pairs, got {grid_pinpoints!r}")
    return [[int(h), int(w)] for h, w in grid_pinpoints]


def positive(name: str, value: Any, where: str = "anyres") -> int:
    """``value`` when it is a positive int, else `ConfigError` from ``where`` (the callbacks' check)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: {name} must be a positive int, got {value!r}")
    return value


def newline_parameter(hidden_size: int) -> nn.Parameter:
    """A learned ``image_newline`` vector of ``hidden_size`` (the language model's width), initialised
    as LLaVA-NeXT does: N(0, 1 / hidden_size). `AnyResPack`'s and `mmcore.builtin.video.VideoPool`'s."""
    return nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))


def check_tokens_per_side(where: str, tokens: int, side: int, unit: str) -> None:
    """`EncoderInputError` unless the tower gave ``side * side`` tokens per ``unit`` (tile, frame): its
    patch grid with no CLS token. `AnyResPack`'s and `mmcore.builtin.video.VideoPool`'s check."""
    if tokens != side * side:
        raise EncoderInputError(
            f"{where}: expected {side}x{side}={side * side} tokens per {unit} (image_size / patch_size), got "
            f"{tokens}; drop the CLS token first (select_feature_layer drop_prefix_tokens=1)"
        )


def check_tower_rows(where: str, given: str, made: int, units: str, rows: int) -> None:
    """`EncoderInputError` unless the ``made`` tiles or frames (``units``) that ``given`` (the inputs
    that count them) say are the ``rows`` the tower gave features for."""
    if made != rows:
        raise EncoderInputError(f"{where}: {given} make {made} {units} but the tower gave features for {rows}")


def _sizes(inputs: dict, where: str) -> list[tuple[int, int]]:
    sizes = inputs.get("image_sizes")
    if sizes is None:
        raise EncoderInputError(
            f"{where}: needs image_sizes (the processor's, one (height, width) per image) routed to the encoder: "
            "ModalEncoderModule(..., additional_args=['image_sizes'])"
        )
    return [(int(h), int(w)) for h, w in torch.as_tensor(sizes).tolist()]


def _max_patches(max_patches: int | None) -> dict[str, Any]:
    # recorded only when set, so LLaVA-NeXT's saved records stay as they were
    return {} if max_patches is None else {"max_patches": max_patches}


def _downscaled(height: int, width: int, side: int, max_patches: int | None) -> tuple[int, int] | None:
    """OneVision's ``anyres_max_<N>``: the (height, width) an unpadded ``height x width`` token grid is
    downscaled to, None when it stays (transformers' ``pack_image_features``: ratio over 1.1)."""
    if max_patches is None:
        return None
    ratio = math.sqrt(height * width / (max_patches * side**2))
    if ratio <= 1.1:
        return None
    return int(height // ratio), int(width // ratio)


def parse_vision_aspect_ratio(value: str) -> int:
    """``"anyres_max_9"`` -> 9 (LLaVA-OneVision's ``vision_aspect_ratio``); `ConfigError` otherwise."""
    import re

    match = re.fullmatch(r"anyres_max_(\d+)", str(value))
    if not match or int(match[1]) < 1:
        raise ConfigError(f"vision_aspect_ratio must be 'anyres_max_<N>' (N >= 1), got {value!r}")
    return int(match[1])


def _tiles(inputs: dict, sizes: list[tuple[int, int]], grid_pinpoints: list, image_size: int) -> list[int]:
    """Tiles per image (base included). With ``batch_num_images`` routed to the encoder (LLaVA-OneVision's
    processor gives it), an image in a sample of several images is its base tile alone, as
    transformers' ``LlavaOnevisionModel.get_image_features`` does."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tiles = [image_size_to_num_patches(s, grid_pinpoints, image_size) for s in sizes]
    per_sample = inputs.get("batch_num_images")
    if per_sample is None:
        return tiles
    per_sample = [int(n) for n in torch.as_tensor(per_sample).reshape(-1).tolist()]
    if sum(per_sample) != len(sizes):
        raise EncoderInputError(f"anyres: batch_num_images {per_sample} does not add up to {len(sizes)} images")
    tiled = [n == 1 for n in per_sample for _ in range(n)]
    return [n if keep else 1 for n, keep in zip(tiles, tiled)]


class AnyResFlatten(Callback):
    """``pixel_values`` ``(images, tiles, 3, H, W)`` (zero-padded per image) -> the real tiles of every
    image, ``(sum of tiles, 3, H, W)``; 4-D input passes through (already flat)."""

    name = "anyres_flatten"
    slot = "preprocess"

    def __init__(self, grid_pinpoints: Sequence[Sequence[int]], image_size: int):
        self.grid_pinpoints = _pinpoints(grid_pinpoints)
        self.image_size = positive("image_size", image_size)

    def params(self) -> dict[str, Any]:
        return {"grid_pinpoints": self.grid_pinpoints, "image_size": self.image_size}

    def __call__(self, inputs: dict) -> dict:
        pixel_values = inputs["pixel_values"]
        if pixel_values.dim() == 4:
            return inputs
        if pixel_values.dim() != 5:
            raise EncoderInputError(
                f"anyres_flatten: pixel_values must be (images, tiles, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        sizes = _sizes(inputs, "anyres_flatten")
        if len(sizes) != pixel_values.shape[0]:
            raise EncoderInputError(
                f"anyres_flatten: {pixel_values.shape[0]} images in pixel_values but {len(sizes)} image_sizes"
            )
        # (sum of tiles, 3, H, W)
        tiles = _tiles(inputs, sizes, self.grid_pinpoints, self.image_size)
        flat = torch.cat([images[:n] for images, n in zip(pixel_values, tiles)], dim=0)
        return {**inputs, "pixel_values": flat}


class ModuleCallback(Callback, nn.Module):
    """A callback that is an ``nn.Module`` too, because it holds a learned parameter (``image_newline``:
    `AnyResPack`, `mmcore.builtin.video.VideoPool`): identity semantics (hashable, as ``nn.Module``
    needs), not `Callback`'s equality by parameters, and `Callback`'s repr. Subclasses start their
    ``__init__`` with ``nn.Module.__init__(self)``."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return Callback.__repr__(self)


class AnyResGrid:
    """The tiling `AnyResPack` and its `AnyResTokenCount` share: the grid resolutions, the tile
    (the tower's input) and patch size, the ``image_newline`` switch and OneVision's ``max_patches``."""

    #: what `params` records, in this order (then ``max_patches`` when set)
    param_names: ClassVar[tuple[str, ...]] = ("grid_pinpoints", "image_size", "patch_size", "newline")

    def __init__(
        self,
        grid_pinpoints: Sequence[Sequence[int]],
        image_size: int,
        patch_size: int,
        newline: bool = True,
        max_patches: int | None = None,
    ):
        self.grid_pinpoints = _pinpoints(grid_pinpoints)
        self.image_size = positive("image_size", image_size)
        self.patch_size = positive("patch_size", patch_size)
        # image_size // patch_size tokens per side, as the tower's strided patch embedding (SigLIP at 384 px
        # with patch 14: 27), so the size need not be a multiple of the patch
        self.newline = bool(newline)
        self.max_patches = None if max_patches is None else positive("max_patches", max_patches)

    def params(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in self.param_names}, **_max_patches(self.max_patches)}


class AnyResPack(AnyResGrid, ModuleCallback):
    """Per image: base-tile tokens, then the tile grid unpadded to the image's aspect ratio with a
    learnable ``image_newline`` closing each row (LLaVA-NeXT's ``spatial_unpad``). Input ``output[0]``:
    ``(sum of tiles, tokens_per_tile, hidden_size)``; result ``[0]``: one ``(tokens_i, hidden_size)``
    tensor per image.

    Args:
        grid_pinpoints, image_size: as the image processor's (the tower's input size).
        patch_size: the tower's patch size (``image_size // patch_size`` tokens per tile side).
        hidden_size: the language model's width (the newline vector's).
        newline: learn and insert ``image_newline`` (LLaVA-NeXT: yes).
        max_patches: LLaVA-OneVision's ``anyres_max_<N>`` (``vision_aspect_ratio``): an unpadded grid
            larger than ``N`` tiles' worth of tokens (by more than 1.1x per side) is downscaled
            (bilinear) to fit, before the newlines. None (LLaVA-NeXT): never downscaled.
    """

    name = "anyres_pack"
    slot = "postprocess_projector"
    param_names = ("grid_pinpoints", "image_size", "patch_size", "hidden_size", "newline")

    def __init__(
        self,
        grid_pinpoints: Sequence[Sequence[int]],
        image_size: int,
        patch_size: int,
        hidden_size: int,
        newline: bool = True,
        max_patches: int | None = None,
    ):
        nn.Module.__init__(self)
        AnyResGrid.__init__(self, grid_pinpoints, image_size, patch_size, newline, max_patches)
        self.hidden_size = positive("hidden_size", hidden_size)
        self.image_newline = newline_parameter(self.hidden_size) if self.newline else None

    def token_count(self) -> AnyResTokenCount:
        """The processor's count for this pack (`AnyResTokenCount` with the same grid and options)."""
        return AnyResTokenCount(self.grid_pinpoints, self.image_size, self.patch_size, self.newline, self.max_patches)

    def forward(self, inputs: dict, output: Any) -> BaseModelOutput:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        features = output[0]  # (sum of tiles, tokens_per_tile, hidden)
        sizes = _sizes(inputs, "anyres_pack")
        tiles = _tiles(inputs, sizes, self.grid_pinpoints, self.image_size)
        check_tower_rows("anyres_pack", f"image_sizes {sizes}", sum(tiles), "tiles", features.shape[0])
        side = self.image_size // self.patch_size
        check_tokens_per_side("anyres_pack", features.shape[1], side, "tile")
        packed = []
        for image, size in zip(torch.split(features, tiles, dim=0), sizes):
            base = image[0]  # (side*side, hidden)
            if image.shape[0] == 1:  # no grid tiles: base only (and one newline), as LLaVA-NeXT
                rows = [base] + ([self.image_newline[None].to(base)] if self.newline else [])
                packed.append(torch.cat(rows, dim=0))
                continue
            grid_h, grid_w = get_anyres_image_grid_shape(size, self.grid_pinpoints, self.image_size)
            grid = image[1:].view(grid_h, grid_w, side, side, -1)
            grid = grid.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # (hidden, H, W)
            grid = unpad_image(grid, torch.tensor(size))
            scaled = _downscaled(grid.shape[1], grid.shape[2], side, self.max_patches)
            if scaled is not None:  # OneVision: unpad, then downscale (transformers' pack_image_features)
                grid = nn.functional.interpolate(grid[None], list(scaled), mode="bilinear")[0]
            if self.newline:
                newline = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid)
                grid = torch.cat((grid, newline), dim=-1)
            packed.append(torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0))
        return BaseModelOutput(last_hidden_state=packed)


class AnyResTokenCount(AnyResGrid):
    """The processor's token count per image for `AnyResFlatten` + `AnyResPack`: exactly the rows the
    pack yields (``num_feature_calculation_funcs={"vision": AnyResTokenCount(...)}``). Reads
    ``image_sizes`` from the image processor's output."""

    def count(self, size: tuple[int, int]) -> int:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
            unpad_image,
        )

        side = self.image_size // self.patch_size
        if image_size_to_num_patches(size, self.grid_pinpoints, self.image_size) == 1:
            return side * side + int(self.newline)
        grid_h, grid_w = get_anyres_image_grid_shape(size, self.grid_pinpoints, self.image_size)
        # the unpadded grid's shape, by transformers' own unpad on an empty tensor of the grid's size
        height, width = unpad_image(torch.empty(0, grid_h * side, grid_w * side), torch.tensor(size)).shape[1:]
        height, width = _downscaled(height, width, side, self.max_patches) or (height, width)
        return side * side + height * (width + int(self.newline))

    def __call__(self, items: Sequence[Any], processed: dict) -> list[int]:
        sizes = _sizes(processed, "anyres token count")
        side = self.image_size // self.patch_size
        base_only = side * side + int(self.newline)
        tiles = _tiles(processed, sizes, self.grid_pinpoints, self.image_size)
        return [self.count(s) if n > 1 else base_only for s, n in zip(sizes, tiles)]


def anyres_encoder(
    tower: nn.Module,
    projector: nn.Module | None,
    *,
    grid_pinpoints: Sequence[Sequence[int]],
    hidden_size: int,
    feature_layer: int | list[int] = -2,
    strategy: str = "default",
    newline: bool = True,
    max_patches: int | None = None,
):
    """A `ModalEncoderModule` for a CLIP / SigLIP ``tower`` with LLaVA-NeXT's anyres tiling: its
    ``image_size`` and ``patch_size`` are read from ``tower.config``; ``strategy`` is LLaVA-NeXT's
    ``vision_feature_select_strategy`` (``default`` drops the first token, ``full`` keeps all);
    ``hidden_size`` is the language model's width; ``max_patches``: LLaVA-OneVision's ``anyres_max_<N>``
    downscaling (`AnyResPack`)."""
    from mmcore.builtin.callbacks import SelectFeatureLayer
    from mmcore.modeling.encoder import ModalEncoderModule

    if strategy not in ("default", "full"):
        raise ConfigError(f"anyres: strategy must be 'default' or 'full', got {strategy!r}")
    image_size, patch_size = tower.config.image_size, tower.config.patch_size
    return ModalEncoderModule(
        tower,
        projector,
        AnyResFlatten(grid_pinpoints, image_size),
        SelectFeatureLayer(feature_layer, drop_prefix_tokens=1 if strategy == "default" else 0),
        AnyResPack(grid_pinpoints, image_size, patch_size, hidden_size, newline, max_patches),
        additional_args=["image_sizes"],
    )
