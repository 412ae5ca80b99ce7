"""save_pretrained / from_pretrained: one directory, bit-exact, recipes in config.json, atomic."""

import json
import os

import pytest
import torch
from plugin_helpers import IntParamCallback
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from mmcore import ModalEncoderModule, MultimodalModel
from mmcore.callbacks import DropPrefixTokens, SelectFeatureLayer
from mmcore.errors import SerializationError, UnrecordableCallbackError
from mmcore.testing import tiny_clip_vision, tiny_llm, tiny_multimodal_model

IMG = (2, 3, 28, 28)
AUD = (1, 8, 20)


def inputs_for(model):
    v, a = model.config.modality_token_ids["vision"], model.config.modality_token_ids["audio"]
    ids = torch.tensor([[5] + [v] * 4 + [6] + [a] * 10 + [7], [8] * 7 + [v] * 4 + [9] * 6])
    return dict(input_ids=ids, pixel_values=torch.randn(IMG), input_features=torch.randn(AUD))


def assert_same(model, loaded):
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for key in sd:
        assert torch.equal(sd[key], sd2[key]), key
    model.eval(), loaded.eval()
    inputs = inputs_for(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def custom_callback(inputs, output):  # module-level: recordable by import path
    return (output[0][:, 1:],)


def test_round_trip_is_bit_exact_and_rebuilds_without_modules(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path / "m")
    files = sorted(os.listdir(tmp_path / "m"))
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    loaded = MultimodalModel.from_pretrained(tmp_path / "m")
    assert_same(model, loaded)
    assert loaded.config.modality_token_ids == model.config.modality_token_ids
    assert loaded.encoders["vision"].postprocess_module_callback == model.encoders["vision"].postprocess_module_callback


def test_config_records_how_to_rebuild_every_part(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mmcore"
    vision, audio = config["encoders"]["vision"], config["encoders"]["audio"]
    assert vision["source"]["kind"] == "transformers" and vision["source"]["class"] == "CLIPVisionModel"
    assert vision["source"]["config"]["hidden_size"] == 24
    assert audio["source"]["class"].endswith("WhisperEncoder")
    assert vision["projector"]["projector_type"] == "mlp2x_gelu"
    assert vision["callbacks"]["postprocess_module"] == {
        "name": "builtin:select_feature_layer",
        "params": {"layer": -2, "drop_prefix_tokens": 1},
    }
    assert config["text_config"]["model_type"] == "llama"
    assert set(config["modality_token_ids"]) == {"vision", "audio"}


def test_auto_model_for_causal_lm_loads_the_directory(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, MultimodalModel)
    assert_same(model, loaded)


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_from_pretrained_dtype_and_device_map(tiny, tmp_path, key):
    model, _ = tiny
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalModel.from_pretrained(tmp_path / "m", device_map="cpu", **{key: torch.bfloat16})
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.device.type == "cpu"
    out = loaded(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs_for(model).items()})
    assert torch.isfinite(out.logits).all()


def test_sharded_save_loads_back(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path / "m", max_shard_size="50KB")
    shards = [f for f in os.listdir(tmp_path / "m") if f.endswith(".safetensors")]
    assert len(shards) > 1 and (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert_same(model, MultimodalModel.from_pretrained(tmp_path / "m"))


def test_tied_embeddings_stay_tied_after_load(tmp_path):
    model, _ = tiny_multimodal_model(family="gpt2")
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalModel.from_pretrained(tmp_path / "m")
    llm = loaded.language_model
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    assert_same(model, loaded)


def test_recordable_callbacks_named_and_by_import_path(tmp_path):
    model = MultimodalModel(
        encoders={
            "vision": ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=custom_callback),
            "other": ModalEncoderModule(tiny_clip_vision(seed=1), postprocess_module_callback=DropPrefixTokens(1)),
        },
        language_model=tiny_llm(),
    )
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["encoders"]["vision"]["callbacks"]["postprocess_module"] == {"import": f"{__name__}:custom_callback"}
    loaded = MultimodalModel.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert loaded.encoders["vision"].postprocess_module_callback is custom_callback
    assert loaded.encoders["other"].postprocess_module_callback == DropPrefixTokens(1)


def lambda_model():
    model = MultimodalModel(
        encoders={"vision": ModalEncoderModule(tiny_clip_vision(), preprocess_callback=lambda inputs: inputs)},
        language_model=tiny_llm(),
    )
    model.set_modality_token_ids({"vision": 7})
    return model


def test_lambda_callback_is_a_clear_error_at_save_and_leaves_nothing(tmp_path):
    model = lambda_model()
    with pytest.raises(UnrecordableCallbackError, match="encoder 'vision' preprocess callback: lambda_model.<locals>.<lambda> cannot be recorded"):
        model.save_pretrained(tmp_path / "m")
    assert not os.listdir(tmp_path)


def test_unrecorded_callback_must_be_passed_again_at_load(tmp_path):
    model = lambda_model()
    model.save_pretrained(tmp_path / "m", allow_unrecorded_callbacks=True)
    with pytest.raises(SerializationError, match="callbacks=\\{'vision': \\{'preprocess': fn\\}\\}"):
        MultimodalModel.from_pretrained(tmp_path / "m")
    seen = []
    loaded = MultimodalModel.from_pretrained(
        tmp_path / "m", callbacks={"vision": {"preprocess": lambda inputs: seen.append(1) or inputs}}
    )
    loaded(input_ids=torch.tensor([[1] + [7] * 5]), pixel_values=torch.randn(1, 3, 28, 28))
    assert seen == [1]


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 24, 3)

    def forward(self, signal):
        return self.conv(signal).transpose(1, 2)


def test_non_hf_encoder_is_passed_again_at_load(tmp_path):
    model = MultimodalModel(
        encoders={"signal": ModalEncoderModule(Conv(), output_width=24)}, language_model=tiny_llm()
    )
    model.set_modality_token_ids({"signal": 9})
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(SerializationError, match="encoder_modules=\\{'signal': module\\}"):
        MultimodalModel.from_pretrained(tmp_path / "m")
    loaded = MultimodalModel.from_pretrained(tmp_path / "m", encoder_modules={"signal": Conv()})
    ids, sig = torch.tensor([[1] + [9] * 6 + [2]]), torch.randn(1, 4, 8)
    model.eval(), loaded.eval()
    assert torch.equal(model(input_ids=ids, signal=sig).logits, loaded(input_ids=ids, signal=sig).logits)


def test_failed_save_leaves_no_half_written_directory(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    real = PreTrainedModel.save_pretrained

    def crash(self, directory, **kwargs):
        real(self, directory, **kwargs)  # everything is written ...
        raise OSError("disk full")  # ... and then the save fails

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "m")
    assert os.listdir(tmp_path) == []


def test_saving_over_an_existing_directory_replaces_it_atomically(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "stale.txt").write_text("old")
    before = sorted(os.listdir(tmp_path / "m"))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, d, **kw: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == before  # the old directory is untouched
    monkeypatch.undo()
    (tmp_path / "m" / "model-00002-of-00002.safetensors").write_text("stale shard")
    model.save_pretrained(tmp_path / "m")
    # Model files are replaced (a stale shard goes); other files (tokenizer, processor) stay.
    assert "model-00002-of-00002.safetensors" not in os.listdir(tmp_path / "m")
    assert (tmp_path / "m" / "stale.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["m"]


def test_peft_wrapped_llm_round_trips_with_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = tiny_multimodal_model()
    llm = peft.get_peft_model(tiny_llm(vocab_size=len(tok) + 4), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in llm.named_parameters():
            if "lora_B" in name:
                param.normal_()  # non-zero adapters, so a lost adapter changes the logits
    wrapped = MultimodalModel(encoders=dict(model.encoders), language_model=llm)
    wrapped.set_modality_token_ids(model.config.modality_token_ids)
    wrapped.save_pretrained(tmp_path / "m")
    loaded = MultimodalModel.from_pretrained(tmp_path / "m")
    assert type(loaded.language_model).__name__ == type(llm).__name__
    assert_same(wrapped, loaded)


def test_callback_from_a_plugin_rebuilds_by_name(tmp_path):
    from mmcore import hookimpl
    from mmcore.callbacks import Callback
    from mmcore.registry import CallbackSpec
    from mmcore.testing import registered_plugin

    class Plugin:
        @hookimpl
        def register_callbacks(self, register):
            register(CallbackSpec(name="keep_first", slots=("postprocess_module",), summary="keep the first N tokens",
                                  factory=f"{__name__}:KeepFirst"))

    model = MultimodalModel(
        encoders={"vision": ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=KeepFirst(2))},
        language_model=tiny_llm(),
    )
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["encoders"]["vision"]["callbacks"] == {
        "postprocess_module": {"name": "keep_first", "params": {"n": 2}}
    }
    with pytest.raises(Exception, match="keep_first"):
        MultimodalModel.from_pretrained(tmp_path / "m")  # no plugin provides it
    with registered_plugin(Plugin(), name="extra"):
        loaded = MultimodalModel.from_pretrained(tmp_path / "m")
    assert loaded.encoders["vision"].postprocess_module_callback == KeepFirst(2)
    assert isinstance(KeepFirst(1), Callback)


class KeepFirst(IntParamCallback):
    name = "keep_first"
    slot = "postprocess_module"

    def __call__(self, inputs, output):
        return (output[0][:, : self.n],)


class PairPool(torch.nn.Module):
    """A plugin projector that halves the token count: mean of each pair of tokens, then a Linear."""

    def __init__(self, config):
        super().__init__()
        self.linear = torch.nn.Linear(config.in_features, config.out_features)

    def forward(self, features):
        b, n, d = features.shape
        return self.linear(features[:, : n - n % 2].reshape(b, n // 2, 2, d).mean(2))

    def num_output_tokens(self, n):
        return n // 2


def test_projector_from_a_plugin_builds_by_name_and_rebuilds_at_load(tmp_path):
    from mmcore import hookimpl
    from mmcore.errors import ConfigError
    from mmcore.registry import ProjectorSpec
    from mmcore.testing import registered_plugin

    class Plugin:
        @hookimpl
        def register_projectors(self, register):
            register(ProjectorSpec(name="pairpool", summary="pairs", factory=f"{__name__}:PairPool"))

    llm = tiny_llm()
    with registered_plugin(Plugin(), "pools"):
        model = MultimodalModel(
            {"vision": ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=SelectFeatureLayer(-2, 1))},
            llm,
            init_projector_type="pools:pairpool",
        )
        model.set_modality_token_ids({"vision": 300})
        projector = model.encoders["vision"].projector
        assert isinstance(projector.projection, PairPool) and projector.num_output_tokens(4) == 2
        ids = torch.tensor([[1, 300, 300, 5]])  # 4 CLIP tokens become 2
        pixels = torch.randn(1, 3, 28, 28)
        logits = model(input_ids=ids, pixel_values=pixels).logits
        model.save_pretrained(tmp_path / "m")
        loaded = MultimodalModel.from_pretrained(tmp_path / "m")
        torch.testing.assert_close(loaded(input_ids=ids, pixel_values=pixels).logits, logits, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="unknown projector type 'pools:pairpool'.*mmcore list-projectors"):
        MultimodalModel.from_pretrained(tmp_path / "m")


@pytest.mark.filterwarnings("ignore:mmcore plugins clash")
def test_a_plugin_projector_is_recorded_qualified_and_a_later_namesake_does_not_break_it(tmp_path):
    import shutil

    from mmcore import hookimpl
    from mmcore.registry import ProjectorSpec
    from mmcore.testing import registered_plugin

    class Pools:
        @hookimpl
        def register_projectors(self, register):
            register(ProjectorSpec(name="pairpool", summary="pairs", factory=f"{__name__}:PairPool"))

    class Namesake:
        @hookimpl
        def register_projectors(self, register):
            register(ProjectorSpec(name="pairpool", summary="another", factory="nowhere:Nothing"))

    with registered_plugin(Pools(), "pools"):
        model = MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision())}, tiny_llm(),
                                init_projector_type="pairpool")  # fmt: skip
        model.save_pretrained(tmp_path / "m")
        saved = json.loads((tmp_path / "m" / "config.json").read_text())
        assert saved["encoders"]["vision"]["projector"]["projector_type"] == "pools:pairpool"
        # a directory saved before names were qualified (the bare name) still loads
        shutil.copytree(tmp_path / "m", tmp_path / "legacy")
        saved["encoders"]["vision"]["projector"]["projector_type"] = "pairpool"
        (tmp_path / "legacy" / "config.json").write_text(json.dumps(saved))
        legacy = MultimodalModel.from_pretrained(tmp_path / "legacy")
        assert isinstance(legacy.encoders["vision"].projector.projection, PairPool)
        with registered_plugin(Namesake(), "rival"):
            loaded = MultimodalModel.from_pretrained(tmp_path / "m")  # a new plugin, same bare name
    assert isinstance(loaded.encoders["vision"].projector.projection, PairPool)
