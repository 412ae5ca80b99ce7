"""`MultimodalConfig`: everything needed to rebuild a `MultimodalModel` from its directory.

``config.json`` holds the LLM's config (``text_config``), one record per encoder, the modality token
ids and optional start/end ids. An encoder record looks like::

    {
      "source": {"kind": "transformers", "class": "CLIPVisionModel", "config": {...}},
      "input_names": {"pixel_values": "pixel_values"},
      "output_width": null,
      "projector": {... MultimodalProjectorConfig.to_dict() ...},
      "callbacks": {"postprocess_module": {"name": "builtin:select_feature_layer", "params": {"layer": -2}}}
    }

``source.kind`` is ``transformers`` (an HF ``PreTrainedModel`` class and its config) or ``plugin``
(a registered encoder and its arguments, filled in by plugins); ``external`` marks a module that must
be passed again to ``from_pretrained(encoder_modules=...)``.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from mmcore.errors import ConfigError
from mmcore.modeling.merge import MERGE_CHECKS


class MultimodalConfig(PreTrainedConfig):
    """Config of a `MultimodalModel` (``model_type = "mmcore"``).

    Args:
        text_config: the language model's config (dict or ``PreTrainedConfig``).
        encoders: encoder name -> record (see module docstring); written by `MultimodalModel`.
        modality_token_ids: modality -> placeholder token id.
        modality_wrap_token_ids: modality -> ``[start_id, end_id]`` wrapped around each item's run.
        peft_config: the LLM's PEFT adapter config when it was wrapped by ``peft.get_peft_model``.
        merge_check: placeholder/feature count check (see `merge_modality_features`).
        concurrent_encoders: run the encoders of one call on separate device streams, so that on a GPU
            towers too small to fill it overlap (see `MultimodalModel.encode`). Off by default.
    """

    model_type = "mmcore"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    encoders: dict | None = None
    modality_token_ids: dict | None = None
    modality_wrap_token_ids: dict | None = None
    peft_config: dict | None = None
    merge_check: str = "auto"
    concurrent_encoders: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # HF's base __post_init__ pushes this config's attention implementation (None unless asked
        # for) down into sub-configs; a live LLM's config must keep the implementation it runs with.
        text_attn = getattr(self.text_config, "_attn_implementation_internal", None)
        super().__post_init__(**kwargs)
        if text_attn is not None and kwargs.get("attn_implementation") is None:
            self.text_config._attn_implementation_internal = text_attn
        self.encoders = dict(self.encoders or {})
        self.modality_token_ids = {str(k): int(v) for k, v in (self.modality_token_ids or {}).items()}
        self.modality_wrap_token_ids = {
            str(k): [int(x) for x in v] for k, v in (self.modality_wrap_token_ids or {}).items()
        }
        if self.merge_check not in MERGE_CHECKS:
            raise ConfigError(f"merge_check must be one of {MERGE_CHECKS}, got {self.merge_check!r}")
        if getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
