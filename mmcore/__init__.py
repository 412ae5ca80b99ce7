"""mmcore: assemble multimodal LLMs from existing encoders, projectors and any HF causal LM.

Public names resolve lazily, so `import mmcore` costs no torch/transformers import; the first use
of e.g. `mmcore.MultimodalModel` imports what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "MultimodalModel": "mmcore.modeling.multimodal",
    "MultimodalProcessor": "mmcore.processing",
    "MultimodalConfig": "mmcore.modeling.configuration",
    "ModalEncoderModule": "mmcore.modeling.encoder",
    "MultimodalProjector": "mmcore.modeling.projector",
    "MultimodalProjectorConfig": "mmcore.modeling.projector",
    "add_modality_tokens": "mmcore.modeling.tokens",
    "merge_modality_features": "mmcore.modeling.merge",
    "expand_placeholders": "mmcore.modeling.merge",
    "callbacks": "mmcore.callbacks",
    "errors": "mmcore.errors",
    "hookimpl": "mmcore.hookspecs",
    "EncoderFactory": "mmcore.factory",
    "build_encoder": "mmcore.factory",
    "get_factory": "mmcore.factory",
    "PLUGIN_API_VERSION": "mmcore.hookspecs",
}

__all__ = [
    "PLUGIN_API_VERSION",
    "EncoderFactory",
    "ModalEncoderModule",
    "MultimodalConfig",
    "MultimodalModel",
    "MultimodalProcessor",
    "MultimodalProjector",
    "MultimodalProjectorConfig",
    "__version__",
    "add_modality_tokens",
    "build_encoder",
    "callbacks",
    "errors",
    "expand_placeholders",
    "get_factory",
    "hookimpl",
    "merge_modality_features",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'mmcore' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module.__name__.rsplit(".", 1)[-1] == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from mmcore import callbacks, errors
    from mmcore.factory import EncoderFactory, build_encoder, get_factory
    from mmcore.hookspecs import PLUGIN_API_VERSION, hookimpl
    from mmcore.modeling.configuration import MultimodalConfig
    from mmcore.modeling.encoder import ModalEncoderModule
    from mmcore.modeling.merge import expand_placeholders, merge_modality_features
    from mmcore.modeling.multimodal import MultimodalModel
    from mmcore.modeling.projector import MultimodalProjector, MultimodalProjectorConfig
    from mmcore.modeling.tokens import add_modality_tokens
    from mmcore.processing import MultimodalProcessor
