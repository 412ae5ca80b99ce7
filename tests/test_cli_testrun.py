"""`mmcore test-run`'s generation batch and its tokens/item column."""

from __future__ import annotations

import warnings

import torch

from mmcore.cli.testrun import _generate, _Timer, left_padded, tokens_cell
from mmcore.testing import tiny_multimodal_model


def test_left_padded_moves_each_rows_padding_to_the_left():
    ids = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    new_ids, new_mask = left_padded(ids, mask, pad_id=0)
    assert new_ids.tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 9]]
    assert new_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_generation_runs_from_a_left_padded_batch_without_padding_warnings():
    mllm, tokenizer = tiny_multimodal_model()
    token = mllm.config.modality_token_ids["vision"]
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # a right-padded training batch: the second sample is two tokens shorter
    rows = [[bos] + [token] * 4 + [11, 12, 13], [bos] + [token] * 4 + [11]]
    width = max(map(len, rows))
    batch = {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
    }
    inputs = {"vision": {"pixel_values": torch.randn(2, 3, 28, 28)}}
    seen = {}
    original = mllm.generate

    def generate(**kwargs):
        seen.setdefault("attention_mask", kwargs["attention_mask"].clone())
        return original(**kwargs)

    mllm.generate = generate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = _generate(mllm, batch, inputs, tokenizer, 3, _Timer(torch.device("cpu")))
    assert seen["attention_mask"].tolist() == [[1] * width, [0, 0] + [1] * (width - 2)]
    assert report["output_shape"] == [2, width + 3]
    assert not [w for w in caught if "padding" in str(w.message).lower()]


def test_tokens_column_shows_every_item_when_counts_differ():
    assert tokens_cell([4, 4]) == "4"
    assert tokens_cell([150, 300, 75]) == "150, 300, 75"
    assert tokens_cell([150, 300], [150, 299]) == "150, 300 (plugin says 150, 299)"
    assert tokens_cell(None) is None
