import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny():
    """A fresh (model, tokenizer) pair: tiny CLIP + Whisper + Llama with modality tokens."""
    from mmcore.testing import tiny_multimodal_model

    model, tokenizer = tiny_multimodal_model()
    return model, tokenizer

