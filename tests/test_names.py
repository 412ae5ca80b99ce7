"""One wording for "did you mean" across mmcore's unknown-name errors."""

import pytest

from mmcore._names import did_you_mean
from mmcore.errors import ConfigError, UnknownNameError


def test_did_you_mean_lists_close_names_or_nothing():
    assert did_you_mean("lama", ["llama", "qwen2", "gpt2"]) == "; did you mean 'llama'?"
    assert did_you_mean("zzz", ["llama", "qwen2"]) == ""
    assert did_you_mean("tiy", ["tiny", "tiny2", "base"], n=1) == "; did you mean 'tiny'?"


def test_unknown_llm_preset_and_encoder_preset_share_the_wording():
    from mmcore.presets import get_llm_preset

    with pytest.raises(UnknownNameError, match=r"unknown LLM preset 'tiny-qwen'; did you mean 'tiny-qwen2'"):
        get_llm_preset("tiny-qwen")
    import mmcore

    with pytest.raises(ConfigError, match=r"unknown preset 'tiy'; did you mean 'tiny'"):
        mmcore.get_factory("clip").check_preset("tiy")
