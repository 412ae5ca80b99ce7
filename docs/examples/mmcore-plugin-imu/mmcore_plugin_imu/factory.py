"""The IMU encoder and its factory: everything mmcore asks of an encoder goes through a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from mmcore.errors import ConfigError, DataFormatError
from mmcore.factory import EncoderFactory

PRESETS = {
    "tiny": {"channels": 6, "patch": 10, "width": 32, "layers": 1, "heads": 2},
    "base": {"channels": 6, "patch": 10, "width": 512, "layers": 8, "heads": 8},
}


class ImuEncoder(nn.Module):
    """``imu_values`` (batch, channels, samples) -> (batch, samples // patch, width)."""

    def __init__(self, channels: int, patch: int, width: int, layers: int, heads: int):
        super().__init__()
        self.embed = nn.Conv1d(channels, width, kernel_size=patch, stride=patch)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, imu_values: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(imu_values).transpose(1, 2)))


class ImuProcessor:
    """Raw clips, each a (samples, channels) array, -> ``imu_values`` padded or cut to the window."""

    def __init__(self, window: int, channels: int):
        self.window, self.channels = window, channels

    def __call__(self, items) -> dict[str, torch.Tensor]:
        out = torch.zeros(len(items), self.channels, self.window)
        for i, item in enumerate(items):
            clip = torch.as_tensor(item, dtype=torch.float32)
            if clip.dim() != 2 or clip.shape[1] != self.channels:
                raise ConfigError(f"imu item {i}: expected (samples, {self.channels}), got {tuple(clip.shape)}")
            clip = clip[: self.window]
            out[i, :, : clip.shape[0]] = clip.T
        return {"imu_values": out}


class ImuFactory(EncoderFactory):
    presets = {"tiny": "1 layer, width 32 (tests)", "base": "8 layers, width 512"}
    options = {"window": 200}  # samples per clip (2 s at 100 Hz)
    data_key = "imu"  # `mmcore train`: a record's "imu" paths are .npy clips (samples, channels)

    def load_item(self, path):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataFormatError(f"{path}: expected an .npy array of (samples, channels) ({exc})") from exc

    def make_recipe(self, checkpoint=None, preset=None, **options):
        options = self.check_options(options)
        if preset is not None:
            config = dict(PRESETS[self.check_preset(preset)])
        else:  # a local directory with config.json + model.safetensors
            config_file = Path(checkpoint) / "config.json"
            if not config_file.is_file():
                raise ConfigError(f"imu checkpoint {checkpoint!r}: expected a directory with config.json")
            config = json.loads(config_file.read_text())
        if options["window"] < config["patch"]:
            raise ConfigError(f"imu: window must be >= patch ({config['patch']}), got {options['window']}")
        return {"config": config, "window": options["window"]}

    def build_module(self, recipe, checkpoint=None):
        module = ImuEncoder(**recipe["config"])
        if checkpoint is not None:
            module.load_state_dict(load_file(Path(checkpoint) / "model.safetensors"))
        return module

    def output_width(self, recipe):
        return recipe["config"]["width"]

    def processor(self, recipe):
        return ImuProcessor(recipe["window"], recipe["config"]["channels"])

    def num_tokens(self, recipe, inputs):
        tokens = inputs["imu_values"].shape[-1] // recipe["config"]["patch"]
        return [tokens] * inputs["imu_values"].shape[0]

    def dummy_inputs(self, recipe, batch_size=1):
        return {"imu_values": torch.randn(batch_size, recipe["config"]["channels"], recipe["window"])}

    def dummy_items(self, recipe, n=1):
        # clips shorter and longer than the window: the processor pads or cuts them
        return [torch.randn(recipe["window"] // 2 + 150 * i, recipe["config"]["channels"]) for i in range(n)]
