"""mmcore's built-in plugin parts (projectors, callbacks) and the causal LMs it adds to transformers.

This module imports no torch: `register_text_lm` imports the module that registers a causal LM only
when a config needs it.
"""

from __future__ import annotations

import importlib

#: text config ``model_type`` -> the mmcore module that registers a causal LM for it with
#: ``AutoModelForCausalLM`` (transformers has these text models but no causal LM class around them)
TEXT_LM_MODULES: dict[str, str] = {
    "qwen2_vl_text": "mmcore.builtin.mrope",
    "qwen2_5_vl_text": "mmcore.builtin.mrope",
}


def register_text_lm(model_type: str | None) -> None:
    """Make ``AutoModelForCausalLM`` know ``model_type`` when mmcore provides its causal LM (a no-op
    for every other model type)."""
    module = TEXT_LM_MODULES.get(model_type or "")
    if module is not None:
        importlib.import_module(module)
