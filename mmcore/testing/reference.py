"""`mmcore_twin_of_llava`: the mmcore model sharing every weight of a transformers LLaVA, for
reference tests and benchmarks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def mmcore_twin_of_llava(llava: Any) -> Any:
    """An mmcore `MultimodalModel` sharing every weight of a transformers ``LlavaForConditionalGeneration``:
    its vision tower, its projector (as a custom projector), its decoder and its lm_head, with LLaVA's
    feature selection as a `SelectFeatureLayer` callback. For reference tests and benchmarks.

    Supports ``vision_feature_select_strategy="default"`` (CLS dropped) and ``"full"``, and an int
    ``vision_feature_layer``. The placeholder id is LLaVA's ``image_token_index``.
    """
    from transformers import AutoModelForCausalLM

    from mmcore.callbacks import SelectFeatureLayer
    from mmcore.modeling.encoder import ModalEncoderModule
    from mmcore.modeling.multimodal import MultimodalModel
    from mmcore.modeling.projector import MultimodalProjector, MultimodalProjectorConfig

    config = llava.config
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer must be an int, got {config.vision_feature_layer!r}")
    text_config = config.text_config
    with _meta_init():  # the twin's decoder and head are LLaVA's own; build only the shell
        language_model = AutoModelForCausalLM.from_config(text_config)
    language_model.model = llava.model.language_model
    language_model.lm_head = llava.lm_head
    vision_width = config.vision_config.hidden_size
    projector = MultimodalProjector(
        MultimodalProjectorConfig(projector_type="custom", in_features=vision_width, out_features=text_config.hidden_size),
        projection=llava.model.multi_modal_projector,
    )
    drop = 1 if config.vision_feature_select_strategy == "default" else 0
    encoder = ModalEncoderModule(
        llava.model.vision_tower,
        projector=projector,
        postprocess_module_callback=SelectFeatureLayer(layer=config.vision_feature_layer, drop_prefix_tokens=drop),
    )
    twin = MultimodalModel(encoders={"vision": encoder}, language_model=language_model)
    twin.set_modality_token_ids({"vision": config.image_token_index})
    return twin.to(llava.dtype)


@contextmanager
def _meta_init() -> Iterator[None]:
    import torch

    with torch.device("meta"):
        yield
