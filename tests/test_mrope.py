"""The Qwen2-VL towers assembled from the plugin's presets: with a Qwen2-VL text model and the mrope
callback they compute what transformers' Qwen2VLForConditionalGeneration / Qwen2_5_VL... computes from
the same parts (logits 1e-5, greedy generations, through mmcore's own processor: left padding, two image
sizes and a video in one batch); with a plain 1-D-position LLM (Llama, Qwen2) they need no callback.
Plus the callback's own contract: recorded and rebuilt, typed errors, its decode-step positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from plugin_marks import needs_plugins

pytestmark = needs_plugins("qwen2vl")

ATOL = 1e-5
PROMPTS = ["a <image> b c", "d <image> e <video> f"]


def items():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((16, 24, 3), (24, 16, 3))]
    return images, [rng.integers(0, 256, (4, 16, 8, 3), dtype=np.uint8)]


def text_lm(family: str, vocab_size: int):
    from transformers import AutoModelForCausalLM, Qwen2_5_VLTextConfig, Qwen2VLTextConfig

    import mmcore.builtin.mrope  # noqa: F401 - registers the causal LMs

    config_class = Qwen2VLTextConfig if family == "qwen2_vl" else Qwen2_5_VLTextConfig
    config = config_class(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def assembled(family: str):
    """``(model, processor)``: the plugin's tiny tower for ``image`` and, sharing it and its merger,
    ``video``; a Qwen2-VL text model; the mrope callback with the processor's placeholder ids."""
    from mmcore_plugin_qwen2vl.factory import image_and_video_encoders

    from mmcore import MultimodalModel
    from mmcore.builtin.mrope import MRope
    from mmcore.processing import MultimodalProcessor
    from mmcore.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    encoders = image_and_video_encoders(family, preset="tiny", text_width=64)  # one tower and merger
    model = MultimodalModel(encoders=encoders, language_model=text_lm(family, len(tokenizer)))
    processor = MultimodalProcessor.from_model(model, tokenizer)  # adds <image> and <video>
    ids = processor.token_ids
    model.preprocess_llm_callback = MRope(ids["image"], ids["video"], family=family, tokens_per_second=2)
    return model.eval(), processor


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def built(request):
    model, processor = assembled(request.param)
    images, videos = items()
    batch = processor(PROMPTS, image=images, video=videos, padding_side="left")
    return {"family": request.param, "model": model, "processor": processor, "batch": batch}


def token_types(batch, processor):
    ids = batch["input_ids"]
    return (ids == processor.token_ids["image"]).int() + 2 * (ids == processor.token_ids["video"]).int()


@torch.no_grad()
def test_assembled_from_presets_equals_transformers_class_of_the_same_parts(built):
    model, processor, batch = built["model"], built["processor"], built["batch"]
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6], [1, 6, 4]] and batch[
        "video_grid_thw"
    ].tolist() == [[2, 4, 2]]
    assert batch["attention_mask"][0, 0] == 0  # the first row is left-padded
    hf = model.to_hf().eval()
    assert type(hf).__name__ == (
        "Qwen2VLForConditionalGeneration"
        if built["family"] == "qwen2_vl"
        else "Qwen2_5_VLForConditionalGeneration"
    )
    hf_batch = {k: v for k, v in batch.items() if k != "second_per_grid_ts"}
    if built["family"] == "qwen2_5_vl":
        hf_batch["second_per_grid_ts"] = batch["second_per_grid_ts"]
    expected = hf(**hf_batch, mm_token_type_ids=token_types(batch, processor)).logits
    torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=ATOL)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    ours = model.generate(**batch, **kwargs)
    theirs = hf.generate(**hf_batch, mm_token_type_ids=token_types(batch, processor), **kwargs)
    assert ours.tolist() == theirs.tolist()


@torch.no_grad()
def test_saved_and_loaded_with_the_callback_and_shared_tower_bit_exact(built, tmp_path):
    from mmcore import MultimodalModel
    from mmcore.builtin.mrope import MRope

    model, batch = built["model"], built["batch"]
    model.save_pretrained(tmp_path)
    loaded = MultimodalModel.from_pretrained(tmp_path).eval()
    assert loaded.preprocess_llm_callback == model.preprocess_llm_callback
    assert isinstance(loaded.preprocess_llm_callback, MRope)
    assert loaded.encoders["video"].module is loaded.encoders["image"].module
    expected, got = model.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], v) for k, v in expected.items())
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)


@torch.no_grad()
def test_each_decode_step_continues_the_3d_positions_of_its_row(built):
    """One decode step with the cache gives the logits the whole sequence gives at its last position."""
    model, batch = built["model"], built["batch"]
    out = model(**batch, use_cache=True)
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(next_ids)], dim=1)
    step = model(input_ids=next_ids, attention_mask=mask, past_key_values=out.past_key_values).logits[:, -1]
    whole = model(
        **{**batch, "input_ids": torch.cat([batch["input_ids"], next_ids], 1), "attention_mask": mask}
    ).logits
    torch.testing.assert_close(step, whole[:, -1], rtol=0, atol=ATOL)


@pytest.mark.parametrize("llm_family", ["llama", "qwen2"])
@torch.no_grad()
def test_a_plain_1d_llm_takes_the_tower_without_the_callback(llm_family):
    import mmcore
    from mmcore import MultimodalModel
    from mmcore.processing import MultimodalProcessor
    from mmcore.testing import tiny_llm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = MultimodalModel(
        encoders={"image": mmcore.build_encoder("qwen2_5_vl", preset="tiny")},
        language_model=tiny_llm(llm_family, vocab_size=len(tokenizer) + 1),
    ).eval()
    processor = MultimodalProcessor.from_model(model, tokenizer)
    images, _ = items()
    prompts = ["a <image> b c", "d <image> <image> e"]
    batch = processor(prompts, image=[[images[0]], images], padding_side="left")
    assert (batch["input_ids"] == processor.token_ids["image"]).sum(-1).tolist() == [
        6,
        12,
    ]  # 6 tokens per image
    logits = model(**batch).logits
    for row, (prompt, row_images) in enumerate(
        zip(prompts, [[images[0]], images])
    ):  # padding changes nothing
        alone = processor([prompt], image=[row_images])
        n = alone["input_ids"].shape[1]
        torch.testing.assert_close(logits[row, -n:], model(**alone).logits[0], rtol=0, atol=ATOL)
    assert model.generate(**batch, max_new_tokens=3, do_sample=False).shape == (
        2,
        batch["input_ids"].shape[1] + 3,
    )


def test_the_callback_checks_its_arguments():
    from mmcore.builtin.mrope import MRope
    from mmcore.errors import ConfigError, EncoderInputError

    with pytest.raises(ConfigError, match="family must be one of qwen2_vl, qwen2_5_vl"):
        MRope(5, family="llama")
    with pytest.raises(ConfigError, match="needs the image_token_id or the video_token_id"):
        MRope()
    with pytest.raises(ConfigError, match="tokens_per_second"):
        MRope(5, family="qwen2_5_vl")
    with pytest.raises(EncoderInputError, match="need input_ids"):
        MRope(5)(inputs_embeds=torch.zeros(1, 3, 8), image_grid_thw=torch.tensor([[1, 2, 2]]))


def test_text_only_positions_are_the_1d_ones_on_every_axis():
    from mmcore.builtin.mrope import MRope

    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    positions = MRope(5)(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=mask)["position_ids"]
    assert positions.shape == (4, 2, 4)
    assert positions[:, 0].tolist() == [[0, 0, 1, 2]] * 4 and positions[:, 1].tolist() == [[0, 1, 2, 3]] * 4


def packing_samples():
    """Chats with images of three sizes, a video and none, of different lengths (the images apart:
    adjacent placeholders of one modality would be one run to transformers' get_rope_index)."""
    rng = np.random.default_rng(1)

    def image(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    def chat(question, answer, items=""):
        return [{"role": "user", "content": items + question}, {"role": "assistant", "content": answer}]

    return [
        {"messages": chat("what is this ?", "a red circle", "<image>\n"), "image": [image(16, 24)]},
        {"messages": chat("hello world , how are you ?", "one two three")},
        {"messages": chat("compare them", "a blue square", "<image> and <image>\n"), "image": [image(24, 16), image(16, 16)]},
        {"messages": chat("and this one ?", "a star", "<video>\n"), "video": [rng.integers(0, 256, (4, 16, 8, 3), dtype=np.uint8)]},
        {"messages": chat("the last one", "a tall green triangle", "<image>\n"), "image": [image(32, 8)]},
    ]  # fmt: skip


def mrope_positions(model, batch):
    """The ``(4, rows, seq)`` positions the mrope callback gives the language model for a batch."""
    grids = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in batch}
    keys = ("input_ids", "attention_mask", "position_ids")
    return model.preprocess_llm_callback(**{k: batch[k] for k in keys if k in batch}, **grids)["position_ids"]


@torch.no_grad()
def test_packed_samples_have_their_own_positions_and_the_losses_they_have_alone(built):
    """A packed batch (position ids from 0 at each sample, no attention mask): each sample's 3-D
    positions are the ones it has alone (from 0, its own grids), and Qwen2-VL's text model reads the
    packed text positions (the first of its four rows) as sample boundaries, so every token has the
    loss it has when its sample runs alone."""
    from test_packing import token_losses

    from mmcore.training import MultimodalCollator, plan_rows

    model, processor = built["model"], built["processor"]
    samples = packing_samples()
    packed = MultimodalCollator(processor, pack_to=80)(samples)
    rows = packed["input_ids"].shape[0]
    assert 1 < rows < len(samples) and "attention_mask" not in packed
    alone, alone_positions = {}, {}
    for sample in samples:
        batch = MultimodalCollator(processor)([sample])
        ((ids, losses),) = token_losses(model, batch)
        alone[tuple(ids)] = losses
        alone_positions[tuple(ids)] = mrope_positions(model, batch)[:, 0]  # (4, seq)
    positions = mrope_positions(model, packed)  # (4, rows, W)
    seen = 0
    width = packed["input_ids"].shape[1]
    for row in range(rows):
        starts = (packed["position_ids"][row] == 0).nonzero().flatten().tolist() + [width]
        for start, end in zip(starts[:-1], starts[1:]):
            ids = tuple(packed["input_ids"][row, start:end].tolist())
            if ids in alone_positions:
                assert torch.equal(positions[:, row, start:end], alone_positions[ids])
                seen += 1
    assert seen == len(samples)
    got = token_losses(model, packed)
    assert len(got) == len(samples) and {tuple(ids) for ids, _ in got} == set(alone)
    # rows filled first-fit decreasing: the flat patch sequences moved with their samples
    index = {ids: i for i, ids in enumerate(alone)}
    planned = [i for row in plan_rows([len(ids) for ids in alone], 80, even=True) for i in row]
    assert [index[tuple(ids)] for ids, _ in got] == planned != sorted(planned)
    for ids, losses in got:
        expected = alone[tuple(ids)]
        assert [(p, t) for p, t, _ in losses] == [(p, t) for p, t, _ in expected]
        torch.testing.assert_close(
            torch.tensor([v for *_, v in losses]), torch.tensor([v for *_, v in expected]), atol=ATOL, rtol=0
        )
    # the control: every row one causal sequence (no restart of the text positions) gives other
    # logits, so the equality above is the block-diagonal attention's doing
    crossing = {k: v for k, v in packed.items() if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")}  # fmt: skip
    assert not torch.allclose(model(**crossing).logits, model(**packed).logits, atol=1e-3)


def test_adjacent_items_of_one_kind_are_a_typed_error_and_a_token_between_separates_them():
    """transformers' get_rope_index reads a run of placeholders as one item: two images with nothing
    between them are an error that says what to do; with a token between, each image has its grid."""
    from mmcore.builtin.mrope import MRope
    from mmcore.errors import EncoderInputError

    grids = torch.tensor([[1, 2, 2], [1, 2, 4]])  # 1 and 2 tokens after the 2x2 merge
    callback = MRope(image_token_id=9)
    adjacent = torch.tensor([[1, 9, 9, 9, 4]])
    with pytest.raises(EncoderInputError, match="2 image.s. but 1 run.s. of image placeholders.*wrap"):
        callback(input_ids=adjacent, image_grid_thw=grids)
    apart = torch.tensor([[1, 9, 5, 9, 9, 4]])
    positions = callback(input_ids=apart, image_grid_thw=grids)["position_ids"]
    # t, h, w: the second image starts at 3, 1 x 2 tokens; the text after it at 3 + max(h, w) = 5
    assert positions[1:, 0].tolist() == [[0, 1, 2, 3, 3, 5], [0, 1, 2, 3, 3, 5], [0, 1, 2, 3, 4, 5]]
