"""Cornstarch's "Creating a Multimodal LLM" API, as its users write it, on mmcore (import line changed:
``cornstarch.models.multimodal_language_model`` -> ``mmcore``): ``model=``, ``<key>_encoder``,
the ``linear`` default, the callbacks' argument forms, the projector config's own form,
``train(encoders_mode=..., llm_mode=...)``, ``preprocess_llm_callback`` and
``set_modality_token_ids(token_ids, new_num_tokens)``.
"""

from __future__ import annotations

import json

import pytest
import torch
from plugin_helpers import IntParamCallback
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from mmcore import ModalEncoderModule, MultimodalModel
from mmcore.errors import ConfigError, TrainableSpecError, UnrecordableCallbackError
from mmcore.modeling.projector import MultimodalProjector, MultimodalProjectorConfig
from mmcore.testing import tiny_clip_vision, tiny_llm, tiny_siglip_vision, tiny_whisper_encoder

IMG = (1, 3, 28, 28)  # tiny CLIP: 2x2 patches + CLS = 5 tokens


def _vlm(**encoder_kwargs):
    vision_encoder = tiny_clip_vision()
    llm = tiny_llm()
    mllm = MultimodalModel(
        encoders={"vision": ModalEncoderModule(model=vision_encoder, **encoder_kwargs)}, language_model=llm
    )
    mllm.set_modality_token_ids({"vision": 7})
    return mllm, vision_encoder, llm


# -- ModalEncoderModule(model=...) ---------------------------------------------------------------------------
def test_model_is_an_alias_of_module_and_both_at_once_is_an_error():
    clip = tiny_clip_vision()
    assert ModalEncoderModule(model=clip).module is clip
    assert ModalEncoderModule(clip).module is clip
    with pytest.raises(ConfigError, match="module= or as model="):
        ModalEncoderModule(clip, model=clip)
    with pytest.raises(ConfigError, match="needs the encoder"):
        ModalEncoderModule()


# -- mllm.<key>_encoder --------------------------------------------------------------------------------------
def test_key_encoder_attributes_alias_the_encoders_dict_without_changing_state_dict_keys(tmp_path):
    vision = ModalEncoderModule(tiny_clip_vision())
    audio = ModalEncoderModule(tiny_whisper_encoder())
    mllm = MultimodalModel(encoders={"vision": vision, "audio": audio}, language_model=tiny_llm())
    assert mllm.vision_encoder is mllm.encoders["vision"] is vision
    assert mllm.audio_encoder is audio
    assert isinstance(mllm.language_model, nn.Module)
    keys = list(mllm.state_dict())
    assert not [k for k in keys if k.startswith(("vision_encoder.", "audio_encoder."))]
    assert sum(p.numel() for p in mllm.parameters()) == sum(p.numel() for p in {id(p): p for p in mllm.parameters()}.values())
    with pytest.raises(AttributeError):
        mllm.video_encoder  # noqa: B018
    mllm.save_pretrained(tmp_path)
    assert MultimodalModel.from_pretrained(tmp_path).vision_encoder.module.config.hidden_size == 24


# -- defaults ------------------------------------------------------------------------------------------------
def test_default_projector_is_linear_with_gelu_as_the_document_states():
    mllm, clip, llm = _vlm()
    projector = mllm.vision_encoder.projector
    assert projector.config.projector_type == "linear" and projector.config.activation == "gelu"
    assert isinstance(projector.projection, nn.Linear)
    assert (projector.config.in_features, projector.config.out_features) == (24, 32)


def test_cornstarchs_positional_order_with_a_preprocess_llm_callback():
    seen = []

    def preprocess_llm(inputs_embeds):
        seen.append(inputs_embeds.shape)

    mllm = MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision())}, tiny_llm(), preprocess_llm, "mlp")
    assert mllm.preprocess_llm_callback is preprocess_llm
    assert mllm.vision_encoder.projector.config.projector_type == "mlp"
    mllm.set_modality_token_ids({"vision": 7})
    mllm(input_ids=torch.tensor([[1, 7, 7, 7, 7, 7, 2]]), pixel_values=torch.randn(IMG))
    assert seen == [torch.Size([1, 7, 32])]


# -- the callbacks' argument forms ---------------------------------------------------------------------------
def test_callbacks_get_model_outputs_and_output_zero_is_the_projected_features():
    events = []

    def preprocess_callback(inputs):
        events.append(("pre", sorted(inputs)))
        return inputs

    def postprocess_module_callback(inputs, output):
        events.append(("module", type(output).__name__, tuple(output[0].shape)))
        output.last_hidden_state = output.last_hidden_state[:, 1:]  # Cornstarch's LLaVA callback: drop CLS
        return output

    def postprocess_projector_callback(inputs, output):
        events.append(("projector", type(output).__name__, tuple(output[0].shape)))
        return output

    mllm, _, _ = _vlm(
        preprocess_callback=preprocess_callback,
        postprocess_module_callback=postprocess_module_callback,
        postprocess_projector_callback=postprocess_projector_callback,
    )
    ids = torch.tensor([[1, 7, 7, 7, 7, 2]])  # CLS dropped: 4 tokens
    out = mllm(input_ids=ids, pixel_values=torch.randn(IMG), labels=ids)
    assert torch.isfinite(out.loss)
    assert events == [
        ("pre", ["pixel_values"]),
        ("module", "BaseModelOutputWithPooling", (1, 5, 24)),
        ("projector", "BaseModelOutput", (1, 4, 32)),
    ]


def test_a_projector_callback_may_return_per_item_tensors_or_a_tuple():
    def keep_first_tokens(inputs, output):  # items of their own length: a list of (tokens_i, width)
        features = output[0]
        return BaseModelOutput(last_hidden_state=[features[0, :1], features[1, :3]])

    mllm, _, _ = _vlm(postprocess_projector_callback=keep_first_tokens)
    ids = torch.tensor([[1, 7, 2, 2], [7, 7, 7, 2]])
    logits = mllm(input_ids=ids, pixel_values=torch.randn(2, 3, 28, 28)).logits
    assert logits.shape == (2, 4, 384)

    mllm2, _, _ = _vlm(postprocess_projector_callback=lambda inputs, output: (output[0][:, :2],))
    assert mllm2(input_ids=torch.tensor([[1, 7, 7, 2]]), pixel_values=torch.randn(IMG)).logits.shape == (1, 4, 384)


def test_a_timm_like_encoders_bare_tensor_reaches_the_callback_as_a_model_output():
    class Bare(nn.Module):
        hidden = 24

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 24)

        def forward(self, x):
            return self.lin(x)

    seen = []

    def post(inputs, output):
        seen.append(type(output).__name__)
        return output

    mllm = MultimodalModel(
        {"signal": ModalEncoderModule(model=Bare(), postprocess_module_callback=post, output_width=24)}, tiny_llm()
    )
    mllm.set_modality_token_ids({"signal": 7})
    mllm(input_ids=torch.tensor([[1, 7, 7, 2]]), x=torch.randn(1, 2, 4))
    assert seen == ["BaseModelOutput"]


def test_additional_args_reach_the_callbacks_but_not_the_encoder():
    seen = []

    def pre(inputs):
        seen.append(inputs["image_sizes"].tolist())
        return inputs

    mllm, _, _ = _vlm(preprocess_callback=pre, additional_args=["image_sizes"])
    # CLIP's forward takes no image_sizes: it would raise if the argument reached it
    mllm(input_ids=torch.tensor([[1, 7, 7, 7, 7, 7, 2]]), pixel_values=torch.randn(IMG), image_sizes=torch.tensor([[28, 28]]))
    assert seen == [[[28, 28]]]
    with pytest.raises(ConfigError, match="additional_args by keyword"):
        ModalEncoderModule(tiny_clip_vision(), None, ["image_sizes"])


# -- MultimodalProjector / MultimodalProjectorConfig in Cornstarch's form ------------------------------------
@pytest.mark.parametrize("projection_type, layers", [("linear", nn.Linear), ("mlp", nn.Sequential)])
def test_projector_config_takes_widths_and_type_from_the_configs(projection_type, layers):
    vision_encoder = tiny_siglip_vision()
    llm = tiny_llm()
    projector_config = MultimodalProjectorConfig(
        encoder_config=vision_encoder.config,
        text_config=llm.config,
        projection_type=projection_type,
        activation="gelu",
    )
    assert (projector_config.in_features, projector_config.out_features) == (24, 32)
    assert projector_config.projector_type == projector_config.projection_type == projection_type
    projector = MultimodalProjector(projector_config)
    assert isinstance(projector.projection, layers)
    mllm = MultimodalModel(
        encoders={"vision": ModalEncoderModule(model=vision_encoder, projector=projector)}, language_model=llm
    )
    assert mllm.vision_encoder.projector is projector


def test_projector_config_never_ignores_an_argument():
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['hidden_act'\]"):
        MultimodalProjectorConfig(projection_type="mlp", in_features=4, out_features=8, hidden_act="gelu")
    with pytest.raises(ConfigError, match="in_features=16 but encoder_config says 24"):
        MultimodalProjectorConfig(encoder_config=tiny_clip_vision().config, in_features=16, out_features=8)
    with pytest.raises(ConfigError, match="disagree"):
        MultimodalProjectorConfig(projector_type="linear", projection_type="mlp", in_features=4, out_features=8)


def test_multimodal_projector_wraps_a_users_module():
    clip, llm = tiny_clip_vision(), tiny_llm()
    config = MultimodalProjectorConfig(encoder_config=clip.config, text_config=llm.config, projection_type="mlp")
    mine = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 32))
    projector = MultimodalProjector(config, mine)
    assert projector.projection is mine
    torch.testing.assert_close(projector(torch.ones(1, 2, 24)), mine(torch.ones(1, 2, 24)))


# -- train(encoders_mode=..., llm_mode=...) ------------------------------------------------------------------
def test_train_with_cornstarchs_modes_sets_mode_and_requires_grad_per_part():
    mllm, clip, llm = _vlm()
    mllm.train(encoders_mode={"vision": (False, True)}, llm_mode=False)
    encoder = mllm.vision_encoder
    assert not encoder.module.training and encoder.projector.training and not llm.training
    assert not any(p.requires_grad for p in encoder.module.parameters())
    assert all(p.requires_grad for p in encoder.projector.parameters())
    assert not any(p.requires_grad for p in llm.parameters())

    mllm.train()  # HF Trainer's call: every part in training mode, requires_grad untouched
    assert encoder.module.training and llm.training
    assert not any(p.requires_grad for p in llm.parameters())
    mllm.eval()
    assert not any(m.training for m in mllm.modules())

    mllm.train(llm_mode=True)  # encoders_mode omitted: every part follows llm_mode
    assert all(p.requires_grad for p in mllm.parameters())
    with pytest.raises(TrainableSpecError, match="encoders_mode names \\['audio'\\]"):
        mllm.train(encoders_mode={"audio": (True, True)})


# -- preprocess_llm_callback ---------------------------------------------------------------------------------
def test_preprocess_llm_callback_sees_the_merged_inputs_and_its_updates_reach_the_language_model():
    seen = {}

    def preprocess_llm_callback(inputs_embeds, attention_mask, position_ids, labels, input_ids, pixel_values):
        seen.update(embeds=inputs_embeds.shape, labels=labels.tolist(), ids=input_ids.tolist(), pixels=pixel_values.shape)
        return {"position_ids": torch.arange(inputs_embeds.shape[1]).flip(0)[None]}

    mllm, _, llm = _vlm()
    mllm.preprocess_llm_callback = preprocess_llm_callback
    got = {}
    hook = llm.register_forward_pre_hook(lambda m, a, kw: got.update(kw), with_kwargs=True)
    ids = torch.tensor([[1, 7, 7, 7, 7, 7, 2]])
    mllm(input_ids=ids, pixel_values=torch.randn(IMG), labels=ids)
    hook.remove()
    assert seen == {"embeds": (1, 7, 32), "labels": [[1, -100, -100, -100, -100, -100, 2]], "ids": ids.tolist(),
                    "pixels": IMG}  # fmt: skip
    assert got["position_ids"].tolist() == [[6, 5, 4, 3, 2, 1, 0]]
    assert "input_ids" not in got and got["inputs_embeds"].shape == (1, 7, 32)


def test_a_registered_preprocess_llm_callback_is_recorded_and_rebuilt(tmp_path):
    from mmcore import hookimpl
    from mmcore.registry import CallbackSpec
    from mmcore.testing import registered_plugin

    class Plugin:
        @hookimpl
        def register_callbacks(self, register):
            register(CallbackSpec(name="shift_positions", slots=("preprocess_llm",), summary="positions + n",
                                  factory=f"{__name__}:ShiftPositions"))  # fmt: skip

    ids = torch.tensor([[1, 7, 7, 7, 7, 7, 2]])
    pixels = torch.randn(IMG)
    with registered_plugin(Plugin(), "positions"):
        mllm, _, _ = _vlm()
        mllm.preprocess_llm_callback = ShiftPositions(3)
        logits = mllm(input_ids=ids, pixel_values=pixels).logits
        mllm.save_pretrained(tmp_path / "m")
        record = json.loads((tmp_path / "m" / "config.json").read_text())["preprocess_llm_callback"]
        assert record == {"name": "positions:shift_positions", "params": {"n": 3}}
        loaded = MultimodalModel.from_pretrained(tmp_path / "m")
    assert loaded.preprocess_llm_callback == ShiftPositions(3)
    torch.testing.assert_close(loaded(input_ids=ids, pixel_values=pixels).logits, logits, rtol=0, atol=0)
    mllm.preprocess_llm_callback = lambda **kw: None
    with pytest.raises(UnrecordableCallbackError, match="preprocess_llm callback"):
        mllm.save_pretrained(tmp_path / "n")


def test_preprocess_llm_callback_returning_something_else_is_an_error():
    mllm, _, _ = _vlm()
    mllm.preprocess_llm_callback = lambda inputs_embeds: inputs_embeds
    with pytest.raises(ConfigError, match="must return a dict"):
        mllm(input_ids=torch.tensor([[1, 7, 7, 7, 7, 7, 2]]), pixel_values=torch.randn(IMG))


class ShiftPositions(IntParamCallback):
    name = "shift_positions"
    slot = "preprocess_llm"

    def __call__(self, inputs_embeds, **kwargs):
        return {"position_ids": torch.arange(inputs_embeds.shape[1])[None] + self.n}


# -- set_modality_token_ids(token_ids, new_num_tokens) -------------------------------------------------------
def test_set_modality_token_ids_takes_cornstarchs_vocabulary_size():
    mllm, _, llm = _vlm()
    rows = llm.get_input_embeddings().weight.shape[0]
    old = llm.get_input_embeddings().weight.detach().clone()
    mllm.set_modality_token_ids({"vision": rows}, rows + 2)
    weight = llm.get_input_embeddings().weight
    assert weight.shape[0] == rows + 2 and torch.equal(weight[:rows], old)
    assert mllm.config.modality_token_ids == {"vision": rows}
    mllm.set_modality_token_ids({"vision": 7}, {"vision": (8, 9)})  # mmcore's earlier positional wrap ids
    assert mllm.config.modality_wrap_token_ids == {"vision": [8, 9]}


# -- nested sub-configs keep their attention implementation ---------------------------------------------------
def test_wrapping_keeps_the_attention_implementation_of_nested_configs():
    from transformers import Qwen2VLConfig

    from mmcore.modeling.configuration import MultimodalConfig

    config = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=100),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2),
    )  # fmt: skip
    config._attn_implementation = "eager"
    wrapped = MultimodalConfig(text_config=config).text_config
    assert wrapped._attn_implementation == "eager"
    assert wrapped.text_config._attn_implementation == wrapped.vision_config._attn_implementation == "eager"
