"""Tiny random-weight parts and an offline tokenizer, for tests, docs and the demo, and the tools a
plugin author's tests use. Everything works with no network.

- `mmcore.testing.fixtures`: `tiny_tokenizer`, `tiny_llm`, `tiny_clip_vision`, `tiny_siglip_vision`,
  `tiny_whisper_encoder`, `tiny_multimodal_model`, `tiny_assembled_model`;
- `mmcore.testing.plugins`: `registered_plugin`, `check_encoder_plugin` (`ContractReport`, `ContractError`);
- `mmcore.testing.sync`: `count_host_syncs`, `HOST_SYNC_OPS`;
- `mmcore.testing.reference`: `mmcore_twin_of_llava`;
- `mmcore.testing.suite`: the pytest suite every encoder plugin runs (`EncoderSuite`,
  `TransformersVisionSuite`, `encoder_cases`); it imports pytest, so it is not imported here.
"""

import sys

if "pytest" in sys.modules:  # under pytest: the suite's plain asserts report their values
    sys.modules["pytest"].register_assert_rewrite("mmcore.testing.suite")

from mmcore.testing.fixtures import (
    tiny_assembled_model,
    tiny_clip_vision,
    tiny_llm,
    tiny_multimodal_model,
    tiny_siglip_vision,
    tiny_tokenizer,
    tiny_whisper_encoder,
)
from mmcore.testing.plugins import ContractError, ContractReport, check_encoder_plugin, registered_plugin
from mmcore.testing.reference import mmcore_twin_of_llava
from mmcore.testing.sync import HOST_SYNC_OPS, count_host_syncs

__all__ = [
    "HOST_SYNC_OPS",
    "ContractError",
    "ContractReport",
    "check_encoder_plugin",
    "count_host_syncs",
    "mmcore_twin_of_llava",
    "registered_plugin",
    "tiny_assembled_model",
    "tiny_clip_vision",
    "tiny_llm",
    "tiny_multimodal_model",
    "tiny_siglip_vision",
    "tiny_tokenizer",
    "tiny_whisper_encoder",
]
