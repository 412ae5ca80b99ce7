"""Video as items of frames for image towers (CLIP, SigLIP): frames through the tower, then pooled.

A video is a sequence of frames; an image tower sees each frame as an image. LLaVA-Video and
LLaVA-OneVision then shrink each frame's patch grid (2x2 bilinear: a 27x27 grid becomes 14x14) and
lay the frames one after the other, optionally closing the video with a learnable newline vector:

- `VideoFrames` (``preprocess``): ``pixel_values`` ``(videos, frames, 3, H, W)`` (zero-padded past
  each video's ``num_frames``) become the real frames of every video, ``(sum of frames, 3, H, W)``,
  for the tower; ``num_frames`` is routed to the encoder for the callbacks (``additional_args``);
- the tower, feature selection (`SelectFeatureLayer`) and the projector run as for images;
- `VideoPool` (``postprocess_projector``): per video, each frame's ``side x side`` tokens pooled to
  ``ceil(side / stride)`` squared (``bilinear`` as transformers' ``LlavaOnevisionModel.apply_pooling``,
  or ``average``), the frames concatenated, then the ``newline`` vector (a parameter, saved with the
  model) when it has one. Result: one ``(tokens_i, hidden_size)`` tensor per video.

`VideoTokenCount` is the processor's count per video (exactly what `VideoPool` yields), and
`VideoItemProcessor` turns raw videos into those inputs: a video is one ``(frames, H, W, 3)`` uint8
array (or tensor) or a tuple of frames (PIL images or ``(H, W, 3)`` uint8 arrays; a tuple, since
`MultimodalProcessor` reads a Python list as a list of items). mmcore decodes no
video files: decode with decord, torchvision.io or PyAV first (see docs/video.md); `load_video` reads
a ``.npy`` array or a directory of frame images, which is what ``mmcore train`` takes for ``"video"``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from mmcore.builtin.anyres import (
    ModuleCallback,
    check_tokens_per_side,
    check_tower_rows,
    newline_parameter,
    positive,
)
from mmcore.builtin.callbacks import Callback
from mmcore.errors import ConfigError, DataFormatError, EncoderInputError
from mmcore.items import each_item

POOL_MODES = ("bilinear", "average")
#: frame images `load_video` reads from a directory, in name order
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


_positive = functools.partial(positive, where="video")


def _frames(inputs: dict, videos: int, max_frames: int, where: str) -> list[int]:
    """Frames per video: ``inputs["num_frames"]`` when given, else every video is ``max_frames`` long."""
    counts = inputs.get("num_frames")
    if counts is None:
        return [max_frames] * videos
    counts = [int(n) for n in torch.as_tensor(counts).reshape(-1).tolist()]
    if len(counts) != videos or any(n < 1 or n > max_frames for n in counts):
        raise EncoderInputError(
            f"{where}: num_frames {counts} does not fit {videos} video(s) of at most {max_frames} frames"
        )
    return counts


class VideoFrames(Callback):
    """``pixel_values`` ``(videos, frames, 3, H, W)`` -> the real frames of every video,
    ``(sum of frames, 3, H, W)``, and ``num_frames`` (one count per video) for `VideoPool`.

    ``input_name``: the call argument holding the frames (``pixel_values``; an encoder built with
    ``input_names={"pixel_values_videos": "pixel_values"}`` still sees ``pixel_values`` here).
    """

    name = "video_frames"
    slot = "preprocess"

    def __init__(self, input_name: str = "pixel_values"):
        if not isinstance(input_name, str) or not input_name:
            raise ConfigError(f"video_frames: input_name must be a non-empty string, got {input_name!r}")
        self.input_name = input_name

    def params(self) -> dict[str, Any]:
        return {"input_name": self.input_name}

    def __call__(self, inputs: dict) -> dict:
        pixels = inputs.get(self.input_name)
        if pixels is None or pixels.dim() != 5:
            got = "nothing" if pixels is None else f"shape {tuple(pixels.shape)}"
            raise EncoderInputError(
                f"video_frames: {self.input_name} must be (videos, frames, 3, H, W), got {got}"
            )
        counts = _frames(inputs, pixels.shape[0], pixels.shape[1], "video_frames")
        flat = torch.cat([video[:n] for video, n in zip(pixels, counts)], dim=0)
        return {**inputs, self.input_name: flat, "num_frames": torch.tensor(counts, dtype=torch.long)}


def pooled_side(side: int, stride: int) -> int:
    """Tokens per side of a pooled ``side x side`` frame (transformers: ``ceil(side / 2)``)."""
    return math.ceil(side / stride)


class FramePooling:
    """What `VideoPool` and its `VideoTokenCount` share: the tower's frame and patch size, the pooling
    stride and the newline switch."""

    #: what `params` records, in this order
    param_names: ClassVar[tuple[str, ...]] = ("image_size", "patch_size", "stride", "newline")

    def __init__(self, image_size: int, patch_size: int, stride: int = 2, newline: bool = False):
        self.image_size = _positive("image_size", image_size)
        self.patch_size = _positive("patch_size", patch_size)
        self.stride = _positive("stride", stride)
        # image_size // patch_size tokens per side, as the tower's strided patch embedding (27 for 384 / 14)
        self.newline = bool(newline)

    def params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.param_names}

    @property
    def side(self) -> int:
        """Tokens per side of a frame's patch grid."""
        return self.image_size // self.patch_size

    def tokens_per_frame(self) -> int:
        """Tokens of a frame once pooled."""
        return pooled_side(self.side, self.stride) ** 2


class VideoPool(FramePooling, ModuleCallback):
    """Per video: each frame's token grid pooled by ``stride``, the frames concatenated, and a learnable
    ``newline`` appended (LLaVA-OneVision's ``apply_pooling`` and video newline). Input ``output[0]``:
    ``(sum of frames, side * side, hidden)``; result ``[0]``: one ``(tokens_i, hidden)`` tensor per video.

    Args:
        image_size, patch_size: the tower's (``side = image_size // patch_size`` tokens per frame side).
        stride: pooling factor per side (2: LLaVA-Video / OneVision).
        mode: ``"bilinear"`` (OneVision: ``interpolate(..., mode="bilinear")`` to ``ceil(side / stride)``)
            or ``"average"`` (``avg_pool2d`` with ``ceil_mode``).
        newline: append a learnable vector of width ``hidden_size`` after each video.
        hidden_size: the language model's width (needed with ``newline``).
    """

    name = "video_pool"
    slot = "postprocess_projector"
    param_names = ("image_size", "patch_size", "stride", "mode", "newline", "hidden_size")

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        stride: int = 2,
        mode: str = "bilinear",
        newline: bool = False,
        hidden_size: int | None = None,
    ):
        nn.Module.__init__(self)
        FramePooling.__init__(self, image_size, patch_size, stride, newline)
        if mode not in POOL_MODES:
            raise ConfigError(f"video_pool: mode must be one of {POOL_MODES}, got {mode!r}")
        self.mode = mode
        if self.newline and hidden_size is None:
            raise ConfigError("video_pool: newline=True needs hidden_size (the language model's width)")
        self.hidden_size = None if hidden_size is None else _positive("hidden_size", hidden_size)
        self.image_newline = newline_parameter(self.hidden_size) if self.newline else None

    def token_count(self) -> VideoTokenCount:
        """The processor's count for this pool."""
        return VideoTokenCount(self.image_size, self.patch_size, self.stride, self.newline)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """``(frames, side * side, hidden)`` -> ``(frames, pooled * pooled, hidden)``."""
        side = self.side
        frames, tokens, hidden = features.shape
        check_tokens_per_side("video_pool", tokens, side, "frame")
        grid = features.view(frames, side, side, hidden).permute(0, 3, 1, 2).contiguous()
        target = pooled_side(side, self.stride)
        if self.mode == "bilinear":
            grid = nn.functional.interpolate(grid, size=[target, target], mode="bilinear")
        else:
            grid = nn.functional.avg_pool2d(grid, self.stride, self.stride, ceil_mode=True)
        return grid.permute(0, 2, 3, 1).reshape(frames, -1, hidden)

    def forward(self, inputs: dict, output: Any) -> BaseModelOutput:
        features = output[0]  # (sum of frames, side*side, hidden)
        counts = inputs.get("num_frames")
        counts = [features.shape[0]] if counts is None else [int(n) for n in torch.as_tensor(counts).tolist()]
        check_tower_rows("video_pool", f"num_frames {counts}", sum(counts), "frames", features.shape[0])
        pooled = self.pool(features)
        videos = []
        for video in torch.split(pooled, counts, dim=0):
            video = video.reshape(-1, video.shape[-1])
            if self.newline:
                video = torch.cat((video, self.image_newline[None].to(video)), dim=0)
            videos.append(video)
        return BaseModelOutput(last_hidden_state=videos)


class VideoTokenCount(FramePooling):
    """The processor's token count per video for `VideoFrames` + `VideoPool`: frames times the pooled
    frame's tokens, plus one for the newline. Frames per video: the processed ``num_frames``, else the
    frame axis of ``pixel_values`` / ``pixel_values_videos`` (``(videos, frames, 3, H, W)``)."""

    def count(self, frames: int) -> int:
        return frames * self.tokens_per_frame() + int(self.newline)

    def __call__(self, items: Sequence[Any], processed: dict) -> list[int]:
        pixels = processed.get("pixel_values_videos", processed.get("pixel_values"))
        if pixels is None or len(pixels.shape) != 5:
            got = "nothing" if pixels is None else f"shape {tuple(pixels.shape)}"
            raise EncoderInputError(
                f"video token count: needs pixel values (videos, frames, 3, H, W), got {got}"
            )
        return [
            self.count(n) for n in _frames(processed, pixels.shape[0], pixels.shape[1], "video token count")
        ]


class VideoItemProcessor:
    """``processor(videos) -> {"pixel_values": (videos, max_frames, 3, H, W), "num_frames": (videos,)}``:
    every frame through ``image_processor`` (a transformers image processor making fixed-size
    ``pixel_values``), videos shorter than the longest zero-padded. A video is a list of frames (PIL
    images or ``(H, W, 3)`` uint8 arrays) or one ``(frames, H, W, 3)`` uint8 array or tensor."""

    def __init__(self, image_processor: Any, name: str = "video"):
        #: the transformers image processor each frame goes through
        self.image_processor = image_processor
        self.name = name

    def __repr__(self) -> str:
        return f"VideoItemProcessor({self.name!r}, {type(self.image_processor).__name__})"

    def frames(self, video: Any, index: int) -> list[Any]:
        """One video's frames as PIL images."""
        import numpy as np
        from PIL import Image

        if isinstance(video, torch.Tensor):
            video = video.numpy()
        if isinstance(video, np.ndarray):
            if video.ndim != 4 or video.shape[-1] not in (1, 3) or video.dtype != np.uint8 or not len(video):
                raise EncoderInputError(
                    f"{self.name} processor: video {index} must be a (frames, H, W, 3) uint8 array, got dtype "
                    f"{video.dtype} and shape {video.shape}"
                )
            video = list(video)
        if not isinstance(video, (list, tuple)) or not video:
            raise EncoderInputError(
                f"{self.name} processor: video {index} must be a non-empty list of frames or a (frames, H, W, 3) "
                f"array, got {type(video).__name__}"
            )
        frames = []
        for number, frame in enumerate(video):
            if (
                isinstance(frame, np.ndarray)
                and frame.dtype == np.uint8
                and frame.ndim == 3
                and frame.shape[-1] in (1, 3)
            ):
                frame = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).convert("RGB")
            if not isinstance(frame, Image.Image):
                raise EncoderInputError(
                    f"{self.name} processor: video {index} frame {number} must be a PIL image or an (H, W, 3) uint8 "
                    f"array, got {type(frame).__name__}"
                )
            frames.append(frame)
        return frames

    def __call__(self, items: Any) -> dict[str, torch.Tensor]:
        import numpy as np

        videos = each_item(items, (np.ndarray, torch.Tensor), self.frames, f"{self.name} processor", "videos")
        pixels = [
            self.image_processor(images=frames, return_tensors="pt")["pixel_values"] for frames in videos
        ]
        counts = [p.shape[0] for p in pixels]
        longest = max(counts)
        out = torch.zeros(len(pixels), longest, *pixels[0].shape[1:], dtype=pixels[0].dtype)
        for row, p in zip(out, pixels):
            row[: p.shape[0]] = p
        return {"pixel_values": out, "num_frames": torch.tensor(counts, dtype=torch.long)}


def load_video(path: str | Path) -> Any:
    """One video for the processor, read without a video decoder: a ``.npy`` file holding a
    ``(frames, H, W, 3)`` uint8 array (``np.load`` with ``allow_pickle=False``), or a directory of
    frame images (``.png``, ``.jpg``, ... in name order). Decode ``.mp4`` files into either form first
    (decord, torchvision.io.read_video or PyAV). `DataFormatError` names the path otherwise."""
    import numpy as np

    path = Path(path)
    if path.is_dir():
        from mmcore.training.data import load_image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise DataFormatError(
                f"{path}: a video directory needs frame images ({', '.join(FRAME_SUFFIXES)})"
            )
        return tuple(load_image(p) for p in files)  # a tuple: one item (a list would read as items)
    if path.suffix.lower() != ".npy":
        raise DataFormatError(
            f"{path}: mmcore reads videos as a .npy (frames, H, W, 3) uint8 array or a directory of frames; "
            "decode other files first (decord, torchvision.io.read_video or PyAV)"
        )
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataFormatError(f"{path}: not a plain .npy array ({exc})") from exc
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or not len(array):
        raise DataFormatError(
            f"{path}: expected a (frames, H, W, 3) uint8 array, got dtype {array.dtype} and shape {array.shape}"
        )
    return array
