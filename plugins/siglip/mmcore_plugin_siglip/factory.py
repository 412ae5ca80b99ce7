"""The ``siglip`` encoder factory: a transformers ``SiglipVisionModel`` and its ``SiglipImageProcessor``.

A recipe holds the ``SiglipVisionConfig`` (as a dict), the image processor's config and the options;
from it everything rebuilds offline (see `mmcore.hf_vision`, which does the work). SigLIP has no CLS
token: every token is a patch. Options:

- ``feature_layer`` (default ``-1``, the last encoder layer before the final layer norm, as
  LLaVA-OneVision uses SigLIP): the hidden state the projector gets; a list of layers concatenates
  them along the feature axis; ``None`` uses the model's ``last_hidden_state`` (after the final
  layer norm, as PaliGemma does).
- ``keep_head`` (default ``False``, as LLaVA-OneVision): build the attention-pooling head. Its
  output is never used for token features, so by default it is left out (a checkpoint's head
  weights are then skipped): 15.2 M fewer parameters for So400m.

>>> import mmcore
>>> enc = mmcore.build_encoder("siglip", preset="tiny", feature_layer=-2)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from mmcore.hf_vision import TransformersVisionFactory
from mmcore_plugin_siglip.presets import IMAGE_MEAN, IMAGE_STD, PRESETS


class SiglipFactory(TransformersVisionFactory):
    """Builds SigLIP vision towers from a hub id, a local directory (a ``SiglipVisionModel`` or a whole
    ``SiglipModel`` checkpoint) or a preset."""

    model_class = SiglipVisionModel
    config_class = SiglipVisionConfig
    image_processor_class = SiglipImageProcessor
    model_type = "siglip_vision_model"
    whole_model_type = "siglip"
    family = "SigLIP"
    preset_table = PRESETS
    options = {"feature_layer": -1, "keep_head": False}

    def configure(self, config: SiglipVisionConfig, options: Mapping[str, Any]) -> None:
        config.vision_use_head = options["keep_head"]

    def default_processor(self, image_size: int) -> SiglipImageProcessor:
        """SigLIP's preprocessing: a square resize and [-1, 1] scaling, at the model's own resolution."""
        return SiglipImageProcessor(
            size={"height": image_size, "width": image_size},
            image_mean=list(IMAGE_MEAN),
            image_std=list(IMAGE_STD),
        )
