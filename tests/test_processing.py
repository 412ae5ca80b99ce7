"""`MultimodalProcessor`: placeholder tokens, expansion by each item's real token count, batching,
chat templates, padding, wrap tokens, errors naming the sample, save/load.

Most tests use two small encoder factories registered here as a plugin (over the tiny CLIP vision
tower and Whisper encoder of `mmcore.testing`), so the plugin path (processor and counts from the
recipe) runs without the real plugins; the last test uses the real clip and whisper plugins.
"""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
import torch
from plugin_helpers import registered_encoders, tiny_spec

import mmcore
from mmcore.callbacks import SelectFeatureLayer
from mmcore.errors import (
    ConfigError,
    EncoderInputError,
    PlaceholderMismatchError,
    SerializationError,
    TokenIdError,
)
from mmcore.factory import EncoderFactory
from mmcore.modeling.multimodal import MultimodalModel
from mmcore.processing import MultimodalProcessor
from mmcore.testing import (
    tiny_clip_vision,
    tiny_llm,
    tiny_multimodal_model,
    tiny_tokenizer,
    tiny_whisper_encoder,
)

IMAGE_TOKENS = 4  # 28 px / patch 14 = 2x2 patches, CLS dropped
AUDIO_TOKENS = 10  # Whisper max_source_positions


# -- a test plugin: two factories over the tiny parts of mmcore.testing -------------------------------------
class ToyImageProcessor:
    """(3, h, w) float images -> ``pixel_values`` resized to the recipe's size."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, items):
        images = [torch.as_tensor(np.asarray(item), dtype=torch.float32) for item in items]
        resized = [
            torch.nn.functional.interpolate(im[None], size=(self.size, self.size), mode="bilinear")[0]
            for im in images
        ]
        return {"pixel_values": torch.stack(resized)}


class ToyAudioProcessor:
    """1-D waveforms -> ``input_features`` (mel bins x 2 * positions), cut or zero-padded."""

    def __init__(self, bins: int, frames: int):
        self.bins, self.frames = bins, frames

    def __call__(self, items):
        out = torch.zeros(len(items), self.bins * self.frames)
        for i, wave in enumerate(items):
            if isinstance(wave, tuple):  # (waveform, sampling_rate), as the whisper plugin accepts
                wave = wave[0]
            wave = torch.as_tensor(np.asarray(wave), dtype=torch.float32)[: out.shape[1]]
            out[i, : wave.shape[0]] = wave
        return {"input_features": out.view(len(items), self.bins, self.frames)}


class ToyFactory(EncoderFactory):
    """One recipe, ``{"config": config}``, built by ``build(**config)``; ``config[width_key]`` wide."""

    config: ClassVar[dict[str, int]]
    build: ClassVar[staticmethod]
    width_key: ClassVar[str]

    def make_recipe(self, checkpoint=None, preset=None, **options):
        return {"config": dict(self.config)}

    def build_module(self, recipe, checkpoint=None):
        return self.build(**recipe["config"])

    def output_width(self, recipe):
        return recipe["config"][self.width_key]


class ToyClipFactory(ToyFactory):
    presets: ClassVar[dict[str, str]] = {"tiny": "2 layers, 28 px"}
    config = {"hidden_size": 24, "image_size": 28, "patch_size": 14}
    build, width_key = staticmethod(tiny_clip_vision), "hidden_size"

    def default_callbacks(self, recipe):
        return {"postprocess_module": SelectFeatureLayer(-2, drop_prefix_tokens=1)}

    def processor(self, recipe):
        return ToyImageProcessor(recipe["config"]["image_size"])

    def num_tokens(self, recipe, inputs):
        side = inputs["pixel_values"].shape[-1] // recipe["config"]["patch_size"]
        return [side * side] * inputs["pixel_values"].shape[0]

    def dummy_inputs(self, recipe, batch_size=1):
        size = recipe["config"]["image_size"]
        return {"pixel_values": torch.randn(batch_size, 3, size, size)}


class ToyWhisperFactory(ToyFactory):
    presets: ClassVar[dict[str, str]] = {"tiny": "1 layer"}
    config = {"d_model": 16, "num_mel_bins": 8, "max_source_positions": 10}
    build, width_key = staticmethod(tiny_whisper_encoder), "d_model"

    def processor(self, recipe):
        config = recipe["config"]
        return ToyAudioProcessor(config["num_mel_bins"], 2 * config["max_source_positions"])

    def num_tokens(self, recipe, inputs):
        return [recipe["config"]["max_source_positions"]] * inputs["input_features"].shape[0]

    def dummy_inputs(self, recipe, batch_size=1):
        config = recipe["config"]
        return {
            "input_features": torch.randn(
                batch_size, config["num_mel_bins"], 2 * config["max_source_positions"]
            )
        }


@pytest.fixture(scope="module", autouse=True)
def toy_plugin():
    clip = tiny_spec(__name__, "toyclip", "vision", "toy CLIP", "ToyClipFactory")
    whisper = tiny_spec(__name__, "toywhisper", "audio", "toy Whisper", "ToyWhisperFactory")
    with registered_encoders("ptest", clip, whisper) as registry:
        yield registry


def _model(projector: str = "mlp2x_gelu", seed: int = 0, **encoders_kw):
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    encoders = {
        "vision": mmcore.build_encoder("ptest:toyclip", preset="tiny"),
        "audio": mmcore.build_encoder("ptest:toywhisper", preset="tiny"),
        **encoders_kw,
    }
    model = MultimodalModel(
        encoders, tiny_llm(vocab_size=len(tokenizer), seed=seed), init_projector_type=projector
    )
    return model.eval(), tokenizer


def _image(value: float, size: int = 32) -> np.ndarray:
    return np.full((3, size, size), value, dtype=np.float32)


def _wave(value: float, n: int = 200) -> np.ndarray:
    return np.full(n, value, dtype=np.float32)


def _runs(ids: list[int], token_id: int) -> list[int]:
    """Lengths of the runs of ``token_id`` in ``ids``, in order."""
    runs, current = [], 0
    for t in [*ids, None]:
        if t == token_id:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


def _labels(batch) -> torch.Tensor:
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


# -- tokens ---------------------------------------------------------------------------------------------------
def test_placeholder_tokens_are_added_to_tokenizer_and_model_once():
    model, tokenizer = _model()
    before = len(tokenizer)
    processor = MultimodalProcessor.from_model(model, tokenizer)
    assert len(tokenizer) == before + 2
    assert processor.tokens == {"vision": "<vision>", "audio": "<audio>"}
    assert model.config.modality_token_ids == processor.token_ids
    assert (
        tokenizer("a<vision>b", add_special_tokens=False).input_ids.count(processor.token_ids["vision"]) == 1
    )
    rows = model.get_input_embeddings().weight.shape[0]
    again = MultimodalProcessor.from_model(model, tokenizer)
    assert len(tokenizer) == before + 2 and model.get_input_embeddings().weight.shape[0] == rows
    assert again.token_ids == processor.token_ids


def test_processor_without_model_needs_the_tokens_in_the_tokenizer():
    with pytest.raises(TokenIdError, match="<vision>"):
        MultimodalProcessor(
            {"vision": ToyImageProcessor(28)},
            tiny_tokenizer(),
            num_feature_calculation_funcs={"vision": lambda i, o: [4] * len(i)},
        )


# -- expansion ------------------------------------------------------------------------------------------------
def test_expansion_counts_equal_the_models_feature_counts_and_the_forward_runs():
    model, tokenizer = _model()
    processor = MultimodalProcessor.from_model(model, tokenizer)
    batch = processor(
        ["<vision> and <vision> differ", "hear <audio> see <vision>"],
        vision=[[_image(0.1), _image(0.2)], [_image(0.3)]],
        audio=[[], [_wave(0.5)]],
    )
    with torch.no_grad():
        vision_features = model.encoders["vision"](pixel_values=batch["pixel_values"])
        audio_features = model.encoders["audio"](input_features=batch["input_features"])
    ids = processor.token_ids
    assert batch["pixel_values"].shape == (3, 3, 28, 28) and batch["input_features"].shape == (1, 8, 20)
    assert (
        _runs(batch["input_ids"][0].tolist(), ids["vision"])
        == [vision_features.shape[1]] * 2
        == [IMAGE_TOKENS] * 2
    )
    assert _runs(batch["input_ids"][1].tolist(), ids["vision"]) == [IMAGE_TOKENS]
    assert _runs(batch["input_ids"][1].tolist(), ids["audio"]) == [audio_features.shape[1]] == [AUDIO_TOKENS]
    with torch.no_grad():
        out = model(**batch, labels=_labels(batch))  # the merge checks placeholder and feature counts
    assert torch.isfinite(out.loss)


def test_items_keep_text_order_and_flat_lists_equal_per_sample_lists():
    model, tokenizer = _model()
    processor = MultimodalProcessor.from_model(model, tokenizer)
    texts = ["<vision> then <vision>", "none here", "last <vision>"]
    images = [_image(1.0), _image(2.0), _image(3.0)]
    per_sample = processor(texts, vision=[images[:2], [], images[2:]])
    flat = processor(texts, vision=images)
    # pixel_values rows follow the placeholders: sample by sample, left to right
    assert per_sample["pixel_values"].mean(dim=(1, 2, 3)).tolist() == pytest.approx([1.0, 2.0, 3.0])
    assert torch.equal(per_sample["input_ids"], flat["input_ids"])
    assert torch.equal(per_sample["pixel_values"], flat["pixel_values"])


def test_tuples_and_non_lists_are_items_not_groups():
    model, tokenizer = _model()
    processor = MultimodalProcessor.from_model(model, tokenizer)
    clips = [(_wave(1.0), 16000), (_wave(2.0), 16000)]  # two samples, one tuple item each
    batch = processor(["<audio> a", "b <audio>"], audio=clips)
    assert batch["input_features"].shape == (2, 8, 20)
    assert batch["input_features"][:, 0, 0].tolist() == [1.0, 2.0]
    single = processor("<vision>", vision=_image(3.0))  # not a list: one item
    assert single["pixel_values"].shape == (1, 3, 28, 28)


def test_projector_that_changes_the_token_count_is_accounted_for():
    model, tokenizer = _model(projector="resampler")
    for encoder in model.encoders.values():
        assert encoder.projector.config.projector_type == "resampler"
    queries = model.encoders["vision"].projector.config.num_queries
    processor = MultimodalProcessor.from_model(model, tokenizer)
    batch = processor("<vision> <audio>", vision=[_image(0.0)], audio=[_wave(1.0)])
    assert _runs(batch["input_ids"][0].tolist(), processor.token_ids["vision"]) == [queries]
    assert _runs(batch["input_ids"][0].tolist(), processor.token_ids["audio"]) == [queries]
    with torch.no_grad():
        assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)


def test_user_counting_function_for_an_encoder_no_plugin_built():
    model, tokenizer = tiny_multimodal_model()  # CLIP/Whisper given as modules, not through a plugin
    with pytest.raises(ConfigError, match="encoder 'vision' was not built by a plugin"):
        MultimodalProcessor.from_model(model, tokenizer)
    calls = []

    def count_images(items, processed):
        calls.append((len(items), tuple(processed["pixel_values"].shape)))
        return [IMAGE_TOKENS] * len(items)

    processor = MultimodalProcessor(
        {"vision": ToyImageProcessor(28)}, tokenizer, model, {"vision": count_images}
    )
    batch = processor("<vision>x<vision>", vision=[_image(0.0), _image(1.0)])
    assert calls == [(2, (2, 3, 28, 28))]
    assert _runs(batch["input_ids"][0].tolist(), processor.token_ids["vision"]) == [IMAGE_TOKENS] * 2
    with torch.no_grad():
        assert torch.isfinite(model.eval()(**batch, labels=batch["input_ids"]).loss)
    wrong = MultimodalProcessor(
        {"vision": ToyImageProcessor(28)}, tokenizer, model, {"vision": lambda i, o: [4]}
    )
    with pytest.raises(PlaceholderMismatchError, match="returned 1 counts for 2 items"):
        wrong("<vision><vision>", vision=[_image(0.0), _image(1.0)])


def test_a_counting_function_is_required_without_a_plugin():
    model, tokenizer = tiny_multimodal_model()
    with pytest.raises(ConfigError, match="num_tokens=\\{'vision'"):
        MultimodalProcessor({"vision": ToyImageProcessor(28)}, tokenizer, model)


# -- chat template ---------------------------------------------------------------------------------------------
def test_chat_template_with_placeholders_inside_messages():
    model, tokenizer = _model()
    processor = MultimodalProcessor.from_model(model, tokenizer)
    as_string = [{"role": "user", "content": "<vision> what is this ?"}]
    as_parts = [
        {"role": "user", "content": [{"type": "vision"}, {"type": "text", "text": " what is this ?"}]}
    ]
    rendered = tokenizer.apply_chat_template(as_string, tokenize=False, add_generation_prompt=True)
    assert rendered == "user: <vision> what is this ?\nassistant:"
    from_string = processor(messages=as_string, vision=[_image(0.5)], add_generation_prompt=True)
    from_parts = processor(messages=[as_parts], vision=[[_image(0.5)]], add_generation_prompt=True)
    from_text = processor(rendered, vision=[_image(0.5)], add_special_tokens=False)
    assert torch.equal(from_string["input_ids"], from_parts["input_ids"])
    assert torch.equal(from_string["input_ids"], from_text["input_ids"])
    assert _runs(from_string["input_ids"][0].tolist(), processor.token_ids["vision"]) == [IMAGE_TOKENS]
    assert processor.decode(from_string["input_ids"][0]).endswith("assistant:")
    with pytest.raises(ConfigError, match="unknown message part"):
        processor(messages=[{"role": "user", "content": [{"type": "video"}]}])
    # the building block a collator uses: parts -> one string with the modality's token
    assert processor.flatten_message(as_parts[0]) == {"role": "user", "content": "<vision> what is this ?"}
    assert processor.flatten_message(as_string[0]) == as_string[0]
    with pytest.raises(ConfigError, match="sample 3: each message must be a mapping"):
        processor.flatten_message("hello", sample=3)


# -- padding ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side(side):
    model, tokenizer = _model()
    processor = MultimodalProcessor.from_model(model, tokenizer)
    texts = ["one two three four five six <vision>", "<vision> red"]
    batch = processor(texts, vision=[_image(0.0), _image(1.0)], padding_side=side)
    alone = [processor(t, vision=[_image(float(i))])["input_ids"][0] for i, t in enumerate(texts)]
    short = min(range(2), key=lambda i: len(alone[i]))
    n_pad = batch["input_ids"].shape[1] - len(alone[short])
    assert n_pad > 0
    mask = batch["attention_mask"][short]
    if side == "left":
        assert mask[:n_pad].sum() == 0 and mask[n_pad:].all()
        assert torch.equal(batch["input_ids"][short, n_pad:], alone[short])
    else:
        assert mask[-n_pad:].sum() == 0 and mask[:-n_pad].all()
        assert torch.equal(batch["input_ids"][short, :-n_pad], alone[short])
    assert (batch["input_ids"][short][mask == 0] == tokenizer.pad_token_id).all()
    with torch.no_grad():
        assert torch.isfinite(model(**batch, labels=_labels(batch)).loss)


def test_processor_padding_side_is_the_default():
    model, tokenizer = _model()
    processor = MultimodalProcessor.from_model(model, tokenizer, padding_side="left")
    batch = processor(["a b c d e f", "a"])
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1


def test_unpadded_lists_and_pad_with_labels_for_collators():
    model, tokenizer = _model()
    processor = MultimodalProcessor.from_model(model, tokenizer)
    lists = processor(["<vision> a", "b"], vision=[[_image(0.0)], []], padding=False, return_tensors=None)
    assert [len(ids) for ids in lists["input_ids"]] == [IMAGE_TOKENS + len(tokenizer(" a").input_ids), 1]
    assert lists["pixel_values"].shape == (1, 3, 28, 28)
    padded = processor.pad(lists["input_ids"], labels=lists["input_ids"], padding_side="left")
    assert padded["input_ids"].shape == padded["labels"].shape == (2, len(lists["input_ids"][0]))
    assert (padded["labels"][1, :-1] == -100).all() and padded["labels"][1, -1] == lists["input_ids"][1][0]
    with pytest.raises(ConfigError, match="different lengths"):
        processor(["<vision> a", "b"], vision=[[_image(0.0)], []], padding=False)


def test_expand_is_the_per_sample_building_block():
    model, tokenizer = _model()
    processor = MultimodalProcessor.from_model(model, tokenizer)
    v = processor.token_ids["vision"]
    assert processor.expand([5, v, 6], {"vision": [3]}) == [5, v, v, v, 6]
    with pytest.raises(PlaceholderMismatchError, match="sample 7: 1 <vision> placeholder"):
        processor.expand([5, v, 6], {"vision": []}, sample=7)


# -- wrap -------------------------------------------------------------------------------------------------------
def test_wrap_tokens_around_each_run():
    model, tokenizer = _model()
    processor = MultimodalProcessor.from_model(model, tokenizer, wrap=True)
    start, end = processor.wrap_token_ids["vision"]
    assert model.config.modality_wrap_token_ids["vision"] == [start, end]
    assert tokenizer.convert_ids_to_tokens([start, end]) == ["<vision_start>", "<vision_end>"]
    batch = processor("<vision><audio>", vision=[_image(0.0)], audio=[_wave(0.0)])
    ids = batch["input_ids"][0].tolist()
    v, a = processor.token_ids["vision"], processor.token_ids["audio"]
    a_start, a_end = processor.wrap_token_ids["audio"]
    assert ids == [start, *[v] * IMAGE_TOKENS, end, a_start, *[a] * AUDIO_TOKENS, a_end]
    with torch.no_grad():
        assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)
    # a later processor on the same model wraps as the model says
    assert MultimodalProcessor.from_model(model, tokenizer).wrap is True


# -- errors -----------------------------------------------------------------------------------------------------
def test_mismatch_errors_name_the_sample():
    model, tokenizer = _model()
    processor = MultimodalProcessor.from_model(model, tokenizer)
    texts = ["<vision>", "<vision><vision>"]
    with pytest.raises(
        PlaceholderMismatchError, match=r"sample 1: 2 <vision> placeholder\(s\) in the text but 1 vision item"
    ):
        processor(texts, vision=[[_image(0.0)], [_image(1.0)]])
    with pytest.raises(PlaceholderMismatchError, match="sample 1: a <vision> placeholder has no vision item"):
        processor(texts, vision=[_image(0.0), _image(1.0)])
    with pytest.raises(PlaceholderMismatchError, match="sample 1: 1 vision item.* left over"):
        processor(texts, vision=[_image(0.0)] * 4)
    with pytest.raises(PlaceholderMismatchError, match="sample 0: 1 <audio> placeholder.*no audio items"):
        processor(["<audio>", "x"])
    with pytest.raises(EncoderInputError, match=r"\['video'\].*\['vision', 'audio'\]"):
        processor("<vision>", vision=[_image(0.0)], video=[1])
    with pytest.raises(ConfigError, match="exactly one"):
        processor()


# -- two encoders whose inputs share a name ----------------------------------------------------------------------
def test_inputs_with_the_same_name_go_through_encoder_inputs():
    model, tokenizer = _model(vision2=mmcore.build_encoder("ptest:toyclip", preset="tiny"))
    processor = MultimodalProcessor.from_model(model, tokenizer)
    batch = processor(
        "<vision> <vision2> <audio>", vision=[_image(0.0)], vision2=[_image(1.0)], audio=[_wave(0.0)]
    )
    assert "pixel_values" not in batch
    assert batch["encoder_inputs"]["vision2"]["pixel_values"].mean() == pytest.approx(1.0)
    # model_kwargs is the routing on its own: a name two encoders take goes under encoder_inputs
    pixels, features = torch.zeros(1, 3, 32, 32), torch.zeros(1, 8, 20)
    routed = processor.model_kwargs({"vision": {"pixel_values": pixels}, "audio": {"input_features": features}})
    # vision2 also takes pixel_values, so vision's go nested even when vision2 has no items here
    assert routed["encoder_inputs"]["vision"]["pixel_values"] is pixels and routed["input_features"] is features
    with torch.no_grad():
        model.eval()(**processor("<vision> <audio>", vision=[_image(0.0)], audio=[_wave(0.0)]))
    routed = processor.model_kwargs({"vision": {"pixel_values": pixels}, "vision2": {"pixel_values": pixels}})
    assert set(routed) == {"encoder_inputs"} and set(routed["encoder_inputs"]) == {"vision", "vision2"}
    assert batch["input_features"].shape == (1, 8, 20)  # audio's name is its own: stays top-level
    batch = batch.to(torch.float64)
    assert batch["encoder_inputs"]["vision"]["pixel_values"].dtype == torch.float64
    batch = batch.to(torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)


# -- save / load -------------------------------------------------------------------------------------------------
def test_save_load_round_trip_in_the_model_directory(tmp_path):
    model, tokenizer = _model(projector="resampler")
    processor = MultimodalProcessor.from_model(model, tokenizer, wrap=True, padding_side="left")
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "processor_config.json").read_text())
    assert saved["modalities"]["vision"]["processor"] == {"kind": "plugin", "encoder": "ptest:toyclip"}
    assert saved["wrap"] is True and saved["padding_side"] == "left"
    assert not [p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]  # no staging left over

    loaded = MultimodalProcessor.from_pretrained(tmp_path / "m")  # no model object needed
    assert isinstance(loaded.encoder_processors["vision"], ToyImageProcessor)
    assert loaded.token_ids == processor.token_ids and loaded.wrap_token_ids == processor.wrap_token_ids
    args = (["<vision> a <audio>", "<vision><vision> b"],)
    items = {"vision": [[_image(0.0)], [_image(1.0), _image(2.0)]], "audio": [[_wave(1.0)], []]}
    before, after = processor(*args, **items), loaded(*args, **items)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    reloaded = MultimodalModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(model(**before).logits, reloaded(**after).logits)
    assert MultimodalProcessor.from_pretrained(tmp_path / "m", reloaded).token_ids == processor.token_ids


def test_saved_hf_processor_and_functions_passed_again(tmp_path):
    from transformers import CLIPImageProcessor

    model, tokenizer = tiny_multimodal_model()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    count = {"vision": lambda items, processed: [IMAGE_TOKENS] * len(items)}
    processor = MultimodalProcessor({"vision": image_processor}, tokenizer, model, count)
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    batch = processor("<vision> hi", vision=[image])
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    processor.save_pretrained(tmp_path / "p")
    with pytest.raises(SerializationError, match="num_tokens=\\{'vision'"):
        MultimodalProcessor.from_pretrained(tmp_path / "p")
    loaded = MultimodalProcessor.from_pretrained(tmp_path / "p", num_feature_calculation_funcs=count)
    assert type(loaded.encoder_processors["vision"]) is type(image_processor)
    again = loaded("<vision> hi", vision=[image])
    assert torch.equal(batch["input_ids"], again["input_ids"])
    assert torch.allclose(batch["pixel_values"], again["pixel_values"])
    # num_tokens= is mmcore's name for Cornstarch's num_feature_calculation_funcs=; one of them, never both
    by_mmcore_name = MultimodalProcessor.from_pretrained(tmp_path / "p", num_tokens=count)
    assert torch.equal(by_mmcore_name("<vision> hi", vision=[image])["input_ids"], batch["input_ids"])
    assert torch.equal(
        MultimodalProcessor({"vision": image_processor}, tokenizer, model, num_tokens=count)("<vision> hi", vision=[image])["input_ids"],
        batch["input_ids"],
    )
    with pytest.raises(ConfigError, match="not both"):
        MultimodalProcessor.from_pretrained(tmp_path / "p", num_tokens=count, num_feature_calculation_funcs=count)


def test_saving_twice_replaces_the_files(tmp_path):
    model, tokenizer = _model()
    MultimodalProcessor.from_model(model, tokenizer).save_pretrained(tmp_path)
    MultimodalProcessor.from_model(model, tokenizer, padding_side="left").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["padding_side"] == "left"
    assert MultimodalProcessor.from_pretrained(tmp_path, model).padding_side == "left"


# -- the core test from the issue: real CLIP + Whisper plugins ----------------------------------------------------
def _raw_items(factory, recipe, n: int, fallback):
    items = list(factory.dummy_items(recipe, n))
    return items[:n] if len(items) >= n else [fallback(i) for i in range(n)]


def test_clip_whisper_model_processes_a_mixed_batch_and_generates():
    pytest.importorskip("mmcore_plugin_clip")
    pytest.importorskip("mmcore_plugin_whisper")
    from PIL import Image

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = MultimodalModel(
        {
            "vision": mmcore.build_encoder("clip", preset="tiny"),
            "audio": mmcore.build_encoder("whisper", preset="tiny"),
        },
        tiny_llm(vocab_size=len(tokenizer)),
    ).eval()
    processor = MultimodalProcessor.from_model(model, tokenizer, padding_side="left")
    vision, audio = model.encoders["vision"], model.encoders["audio"]
    images = _raw_items(
        mmcore.get_factory("clip"), vision.source["recipe"], 2,
        lambda i: Image.fromarray((np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)),
    )  # fmt: skip
    clips = _raw_items(
        mmcore.get_factory("whisper"), audio.source["recipe"], 1,
        lambda i: np.random.default_rng(i).standard_normal(16000).astype(np.float32),
    )  # fmt: skip
    batch = processor(
        ["<vision> and <vision>: which is brighter ?", "listen : <audio> what is it ?"],
        vision=[images, []],
        audio=[[], clips],
    )
    with torch.no_grad():
        vision_tokens = model.encoders["vision"](**vision.select_inputs(batch)).shape[1]
        # per clip: a (tokens, width) tensor each (whisper's trim_padding gives each clip its own count)
        audio_tokens = [f.shape[0] for f in model.encoders["audio"](**audio.select_inputs(batch))]
        out = model(**batch, labels=_labels(batch))
    assert _runs(batch["input_ids"][0].tolist(), processor.token_ids["vision"]) == [vision_tokens] * 2
    assert _runs(batch["input_ids"][1].tolist(), processor.token_ids["audio"]) == audio_tokens
    assert torch.isfinite(out.loss)
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    prompt = batch["input_ids"].shape[1]
    assert generated.shape[0] == 2 and prompt < generated.shape[1] <= prompt + 3
    assert torch.equal(generated[:, :prompt], batch["input_ids"])
