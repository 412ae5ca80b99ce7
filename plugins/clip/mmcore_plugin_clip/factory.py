"""The ``clip`` encoder factory: a transformers ``CLIPVisionModel`` and its ``CLIPImageProcessor``.

A recipe holds the ``CLIPVisionConfig`` (as a dict), the image processor's config and the options;
from it everything rebuilds offline (see `mmcore.hf_vision`, which does the work). Options:

- ``feature_layer`` (default ``-2``, LLaVA's penultimate layer): the hidden state the projector gets;
  a list of layers concatenates them along the feature axis; ``None`` uses the model's
  ``last_hidden_state``.
- ``drop_cls`` (default ``True``, as LLaVA): drop the CLS token, leaving one token per patch.

>>> import mmcore
>>> enc = mmcore.build_encoder("clip", preset="tiny", feature_layer=-1, drop_cls=False)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from mmcore.hf_vision import TransformersVisionFactory
from mmcore_plugin_clip.presets import IMAGE_MEAN, IMAGE_STD, PRESETS


class ClipFactory(TransformersVisionFactory):
    """Builds CLIP vision towers from a hub id, a local directory (a ``CLIPVisionModel`` or a whole
    ``CLIPModel`` checkpoint) or a preset."""

    model_class = CLIPVisionModel
    config_class = CLIPVisionConfig
    image_processor_class = CLIPImageProcessor
    model_type = "clip_vision_model"
    whole_model_type = "clip"
    family = "CLIP"
    default_processing = "OpenAI CLIP preprocessing"
    preset_table = PRESETS
    options = {"feature_layer": -2, "drop_cls": True}

    def prefix_tokens(self, config: CLIPVisionConfig) -> int:
        return 1  # the CLS token

    def dropped_prefix_tokens(self, options: Mapping[str, Any]) -> int:
        return 1 if options["drop_cls"] else 0

    def default_processor(self, image_size: int) -> CLIPImageProcessor:
        """OpenAI's preprocessing, which every CLIP checkpoint uses: resize the shortest edge, crop the centre."""
        return CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=list(IMAGE_MEAN),
            image_std=list(IMAGE_STD),
        )
