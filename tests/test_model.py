"""MultimodalModel: routing, callbacks, projectors, labels, padding, training switches, tokens."""

from collections import Counter

import pytest
import torch
from torch import nn

from mmcore import ModalEncoderModule, MultimodalModel, MultimodalProjector, MultimodalProjectorConfig
from mmcore.callbacks import SelectFeatureLayer
from mmcore.errors import EncoderInputError, TokenIdError, TrainableSpecError, WidthMismatchError
from mmcore.modeling.tokens import add_modality_tokens
from mmcore.testing import (
    count_host_syncs,
    tiny_clip_vision,
    tiny_llm,
    tiny_siglip_vision,
    tiny_tokenizer,
    tiny_whisper_encoder,
)

IMG = (1, 3, 28, 28)  # one tiny image -> 4 tokens (CLS dropped)
AUD = (1, 8, 20)  # one tiny clip -> 10 tokens


def ids_with(model, *parts):
    """Token ids from parts: ints are text ids, ("vision", n) a run of n placeholders."""
    out = []
    for part in parts:
        if isinstance(part, tuple):
            out += [model.config.modality_token_ids[part[0]]] * part[1]
        else:
            out.append(part)
    return out


def test_inputs_reach_encoders_by_signature_and_absent_encoders_are_skipped(tiny):
    model, _ = tiny
    calls = {"vision": 0, "audio": 0}
    for name in calls:
        model.encoders[name].module.register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    ids = torch.tensor([ids_with(model, 5, ("vision", 4), 6)])
    out = model(input_ids=ids, pixel_values=torch.randn(IMG))
    assert calls == {"vision": 1, "audio": 0}
    assert out.logits.shape == (1, 6, model.config.text_config.vocab_size)
    ids = torch.tensor([ids_with(model, 5, ("audio", 10), 6)])
    model(input_ids=ids, input_features=torch.randn(AUD))
    assert calls == {"vision": 1, "audio": 1}


def two_vision_towers():
    llm = tiny_llm()
    model = MultimodalModel(
        encoders={"clip": ModalEncoderModule(tiny_clip_vision()), "siglip": ModalEncoderModule(tiny_siglip_vision())},
        language_model=llm,
    )
    model.set_modality_token_ids({"clip": 500, "siglip": 501})  # outside the vocabulary on purpose
    return model


def test_shared_input_name_needs_encoder_inputs():
    model = two_vision_towers()
    ids = torch.tensor([[5] + [500] * 5 + [501] * 4 + [6]])
    with pytest.raises(EncoderInputError, match="'pixel_values' is taken by encoders \\['clip', 'siglip'\\]"):
        model(input_ids=ids, pixel_values=torch.randn(IMG))
    out = model(
        input_ids=ids,
        encoder_inputs={"clip": {"pixel_values": torch.randn(IMG)}, "siglip": {"pixel_values": torch.randn(IMG)}},
    )
    assert torch.isfinite(out.logits).all()


def test_placeholder_ids_outside_vocabulary_work():
    model = two_vision_towers()
    vocab = model.get_input_embeddings().num_embeddings
    assert min(model.config.modality_token_ids.values()) >= vocab
    ids = torch.tensor([[5] + [500] * 5 + [6]])
    out = model(input_ids=ids, encoder_inputs={"clip": {"pixel_values": torch.randn(IMG)}})
    assert out.logits.shape[:2] == (1, 7)


def test_text_only_forward_gives_the_language_model_its_ids():
    """With nothing to merge (a text prompt, every decode step), the LLM embeds the ids itself; an
    out-of-vocabulary placeholder id is replaced by 0, in-vocabulary ones are embedded as tokens."""
    model = two_vision_towers().eval()
    seen = []
    hook = model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    ids = torch.tensor([[5, 500, 7, 501, 6]])
    with torch.no_grad():
        out = model(input_ids=ids)
        ref = model.language_model(input_ids=torch.tensor([[5, 0, 7, 0, 6]]))
    hook.remove()
    assert seen[0].get("inputs_embeds") is None
    assert torch.equal(seen[0]["input_ids"], torch.tensor([[5, 0, 7, 0, 6]]))
    assert torch.equal(out.logits, ref.logits)
    model.set_modality_token_ids({"clip": 7, "siglip": 501})  # clip's id inside the vocabulary
    seen.clear()
    hook = model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 7, 8, 501, 6]]))
    hook.remove()
    assert torch.equal(seen[0]["input_ids"], torch.tensor([[5, 7, 8, 0, 6]]))


def test_callback_order_and_outputs_as_tuple_or_model_output():
    events = []
    clip = tiny_clip_vision()

    def pre(inputs):
        events.append("pre")
        return {**inputs, "pixel_values": inputs["pixel_values"] * 0}

    def post_module(inputs, output):
        events.append(("post_module", type(output).__name__, float(inputs["pixel_values"].abs().sum())))
        return output  # a ModelOutput, returned as is

    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(24, 32)

        def forward(self, x):
            events.append(("projector", tuple(x.shape)))
            return self.lin(x)

    def post_projector(inputs, output):  # Cornstarch's form: output[0] is the projected features
        events.append(("post_projector", type(output).__name__, tuple(output[0].shape)))
        return (output[0][:, :2],)  # a tuple: first element is used

    model = MultimodalModel(
        encoders={"vision": ModalEncoderModule(clip, Proj(), pre, post_module, post_projector)},
        language_model=tiny_llm(),
    )
    model.set_modality_token_ids({"vision": 7})
    model(input_ids=torch.tensor([[1, 7, 7, 2]]), pixel_values=torch.randn(IMG))
    assert events == [
        "pre",
        ("post_module", "BaseModelOutputWithPooling", 0.0),
        ("projector", (1, 5, 24)),
        ("post_projector", "BaseModelOutput", (1, 5, 32)),
    ]


def test_plain_nn_module_encoder_timm():
    timm = pytest.importorskip("timm")
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=1, embed_dim=24, num_heads=2
    )

    class Tokens(nn.Module):  # timm returns pooled (B, D); ask for the token sequence instead
        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, pixel_values):
            return self.vit.forward_features(pixel_values)

    model = MultimodalModel(
        encoders={
            "pooled": ModalEncoderModule(vit, input_names={"pixel_values": "x"}),
            "tokens": ModalEncoderModule(Tokens(vit), output_width=24),
        },
        language_model=tiny_llm(),
        init_projector_type="linear",
    )
    model.set_modality_token_ids({"pooled": 10, "tokens": 11})
    assert model.encoders["pooled"].output_width == 24  # read off timm's num_features
    # pooled: one token per image; tokens: 4 patches + CLS = 5 per image
    ids = torch.tensor([[1, 10, 2], [1, 10, 3]])
    out = model(input_ids=ids, encoder_inputs={"pooled": {"pixel_values": torch.randn(2, 3, 32, 32)}})
    assert out.logits.shape[:2] == (2, 3)
    ids = torch.tensor([[1] + [11] * 5 + [2]])
    out = model(input_ids=ids, encoder_inputs={"tokens": {"pixel_values": torch.randn(1, 3, 32, 32)}})
    assert torch.isfinite(out.logits).all()


def test_projector_created_from_encoder_and_llm_widths():
    model = MultimodalModel(
        encoders={"vision": ModalEncoderModule(tiny_clip_vision(hidden_size=24)), "audio": ModalEncoderModule(tiny_whisper_encoder(d_model=16))},
        language_model=tiny_llm(hidden_size=32),
        init_projector_type="mlp3x_silu",
    )
    for name, width in (("vision", 24), ("audio", 16)):
        cfg = model.encoders[name].projector.config
        assert (cfg.projector_type, cfg.in_features, cfg.out_features) == ("mlp3x_silu", width, 32)


@pytest.mark.parametrize(
    "projector, message",
    [
        (nn.Linear(20, 32), "projector takes width 20 but the encoder outputs width 24"),
        (nn.Linear(24, 30), "projector outputs width 30 but the language model's embeddings have width 32"),
    ],
)
def test_width_mismatch_names_both_widths(projector, message):
    with pytest.raises(WidthMismatchError, match=message):
        MultimodalModel(
            encoders={"vision": ModalEncoderModule(tiny_clip_vision(hidden_size=24), projector)},
            language_model=tiny_llm(hidden_size=32),
        )


def test_placeholder_count_mismatch_is_reported(tiny):
    model, _ = tiny
    ids = torch.tensor([ids_with(model, 5, ("vision", 3), 6)])
    with pytest.raises(Exception, match="vision: 3 placeholder tokens but 4 features"):
        model(input_ids=ids, pixel_values=torch.randn(IMG))


def test_missing_token_id_is_a_clear_error():
    model = MultimodalModel(encoders={"vision": ModalEncoderModule(tiny_clip_vision())}, language_model=tiny_llm())
    with pytest.raises(TokenIdError, match="set_modality_token_ids"):
        model(input_ids=torch.tensor([[1, 2]]), pixel_values=torch.randn(IMG))
    with pytest.raises(TokenIdError, match="encoders are \\['vision'\\]"):
        model.set_modality_token_ids({"audio": 3})


def test_labels_at_placeholders_are_ignored(tiny):
    model, _ = tiny
    ids = torch.tensor([ids_with(model, 5, 6, ("vision", 4), 7, 8, 9)])
    pv = torch.randn(IMG)
    out = model(input_ids=ids, pixel_values=pv, labels=ids.clone())
    masked = ids.masked_fill(ids == model.config.modality_token_ids["vision"], -100)
    logits = model(input_ids=ids, pixel_values=pv).logits
    expected = nn.functional.cross_entropy(logits[0, :-1], masked[0, 1:], ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert model(input_ids=ids, pixel_values=pv, labels=None).loss is None


@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_mask_is_kept_as_given(tiny, side):
    model, _ = tiny
    model.eval()
    seq = ids_with(model, 5, ("vision", 4), 6, 7)
    pad = [3, 3, 3]
    padded = pad + seq if side == "left" else seq + pad
    mask = [0] * 3 + [1] * len(seq) if side == "left" else [1] * len(seq) + [0] * 3
    pv = torch.randn(2, 3, 28, 28)
    batch = model(
        input_ids=torch.tensor([padded, seq + [8, 9, 10]]),
        attention_mask=torch.tensor([mask, [1] * (len(seq) + 3)]),
        pixel_values=pv,
    ).logits
    alone = model(input_ids=torch.tensor([seq]), pixel_values=pv[:1]).logits
    real = slice(3, None) if side == "left" else slice(0, len(seq))
    assert torch.allclose(batch[0, real], alone[0], atol=1e-5)


def test_text_only_batch_in_training_touches_every_trainable_encoder(tiny):
    model, _ = tiny
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for name, encoder in model.encoders.items():
        for pname, param in encoder.named_parameters():
            if param.requires_grad:
                assert param.grad is not None, f"{name}.{pname} got no gradient"
                assert torch.count_nonzero(param.grad) == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.language_model.parameters())


def test_a_part_two_encoders_share_counts_once():
    from mmcore.training import apply_stage

    tower = tiny_clip_vision()
    image = ModalEncoderModule(tower)
    model = MultimodalModel(
        encoders={"image": image, "video": ModalEncoderModule(tower)}, language_model=tiny_llm(vocab_size=128)
    )
    model.encoders["video"].projector = image.projector  # one tower, one projector (OneVision's video encoder)
    counts = model.trainable_parameters()
    assert counts["video.module"] == counts["video.projector"] == (0, 0)
    assert counts["image.module"][1] == sum(p.numel() for p in tower.parameters())
    report = apply_stage(model, "align")
    assert report.total == sum(p.numel() for p in model.parameters())  # the model's, not more
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_set_trainable_changes_requires_grad_only(tiny):
    model, _ = tiny
    report = model.set_trainable({"*": False, "vision.projector": True, "audio": True})
    assert report["vision.module"][0] == 0 and report["language_model"][0] == 0
    assert report["vision.projector"][0] == report["vision.projector"][1] > 0
    assert report["audio.projector"][0] > 0 and report["audio.module"][0] > 0
    model.eval()
    model.train()  # what HF Trainer does: modes change, trainability does not
    assert all(m.training for m in model.modules())
    assert model.trainable_parameters() == report
    with pytest.raises(TrainableSpecError, match="unknown part 'llm'"):
        model.set_trainable({"llm": True})


def test_frozen_encoder_keeps_no_activations(tiny):
    model, _ = tiny
    model.set_trainable({"vision.module": False})
    seen = []
    model.encoders["vision"].module.register_forward_hook(lambda m, i, o: seen.append(o.last_hidden_state.requires_grad))
    ids = torch.tensor([ids_with(model, 5, ("vision", 4), 6)])
    model(input_ids=ids, pixel_values=torch.randn(IMG), labels=ids).loss.backward()
    assert seen == [False]
    assert model.encoders["vision"].projector.projection[0].weight.grad is not None


def test_gradient_checkpointing_reaches_every_part(tiny):
    model, _ = tiny
    model.train()
    ids = torch.tensor([ids_with(model, 5, ("vision", 4), 6, ("audio", 10), 7)])
    inputs = dict(input_ids=ids, pixel_values=torch.randn(IMG), input_features=torch.randn(AUD), labels=ids)
    model(**inputs).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.encoders["vision"].module.encoder.gradient_checkpointing
    assert model.encoders["audio"].module.gradient_checkpointing
    assert all(enc.projector.gradient_checkpointing for enc in model.encoders.values())
    assert model.language_model.model.gradient_checkpointing
    model(**inputs).loss.backward()
    for name, grad in reference.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-6), name


def test_gradient_checkpointing_plain_module_and_timm():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=1, embed_dim=24, num_heads=2)
    conv = nn.Sequential(nn.Conv1d(4, 24, 3), nn.ReLU())

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, signal):
            return self.conv(signal).transpose(1, 2)

    model = MultimodalModel(
        encoders={
            "vision": ModalEncoderModule(vit, input_names={"pixel_values": "x"}),
            "signal": ModalEncoderModule(Plain(), output_width=24),
        },
        language_model=tiny_llm(),
    )
    model.activation_checkpointing_enable()
    assert vit.grad_checkpointing
    assert model.encoders["signal"]._checkpointed
    model.set_modality_token_ids({"vision": 10, "signal": 11})
    model.train()
    ids = torch.tensor([[1, 10, 2] + [11] * 6])
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), signal=torch.randn(1, 4, 8), labels=ids)
    out.loss.backward()
    assert conv[0].weight.grad is not None and vit.patch_embed.proj.weight.grad is not None


def test_concurrent_encoders_equal_the_sequential_path(tiny, monkeypatch):
    """``concurrent_encoders`` launches every encoder after the first on its own stream (no-ops
    on CPU, so the numbers must be exactly those of the sequential path), and only with two or more."""
    model, _ = tiny
    model.train()
    ids = torch.tensor([ids_with(model, 5, ("vision", 4), 6, ("audio", 10), 7)])
    inputs = dict(input_ids=ids, pixel_values=torch.randn(IMG), input_features=torch.randn(AUD), labels=ids)
    loss = model(**inputs).loss
    loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    entered, real_stream = [], torch.cpu.stream

    def stream(side):
        entered.append(side)
        return real_stream(side)

    monkeypatch.setattr(torch.cpu, "stream", stream)
    model.config.concurrent_encoders = True
    concurrent = model(**inputs).loss
    assert len(entered) == 1  # two encoders: the second on a side stream
    concurrent.backward()
    assert torch.equal(concurrent, loss)
    assert set(reference) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in reference.items():
        assert torch.equal(dict(model.named_parameters())[name].grad, grad), name
    model(input_ids=torch.tensor([ids_with(model, 5, ("vision", 4), 6)]), pixel_values=torch.randn(IMG))
    assert len(entered) == 1  # one encoder: nothing to overlap, no stream



def count_syncs(fn):
    with count_host_syncs() as syncs:
        fn()
    return syncs


def test_no_host_sync_beyond_the_language_models_own(tiny):
    """With the device-side count check (the default on GPU), a training step and a generation make
    exactly the host syncs the bare language model makes on the same text: mmcore adds none."""
    model, _ = tiny
    model.config.merge_check = "async"
    llm = model.language_model
    ids = torch.tensor([ids_with(model, 5, ("vision", 4), 6, ("audio", 10), 7), ids_with(model, *[8] * 7, ("vision", 4), *[9] * 6)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    text_ids = ids.masked_fill(ids >= llm.get_input_embeddings().num_embeddings, 0)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, *IMG[1:]), input_features=torch.randn(AUD))
    model.train()
    step = count_syncs(lambda: model(**inputs, labels=ids).loss.backward())
    embeds = llm.get_input_embeddings()(text_ids).detach().requires_grad_()
    labels = ids.masked_fill(ids != text_ids, -100)
    llm_step = count_syncs(lambda: llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.backward())
    assert step == llm_step
    model.config.merge_check = "eager"  # the CPU default reads the placeholder counts once, for its message
    assert count_syncs(lambda: model(**inputs, labels=ids).loss.backward()) == llm_step + Counter(tolist=1)
    model.config.merge_check = "async"
    model.eval()
    with torch.no_grad():
        generate = count_syncs(lambda: model.generate(**inputs, max_new_tokens=3, do_sample=False))
        llm_generate = count_syncs(lambda: llm.generate(input_ids=text_ids, attention_mask=mask, max_new_tokens=3, do_sample=False))
    assert generate == llm_generate



@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_llm_families(family):
    tok = tiny_tokenizer()
    model = MultimodalModel(
        encoders={"vision": ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=SelectFeatureLayer(-2, 1))},
        language_model=tiny_llm(family, vocab_size=len(tok)),
    )
    add_modality_tokens(tok, model)
    ids = torch.tensor([ids_with(model, 5, ("vision", 4), 6)])
    out = model(input_ids=ids, pixel_values=torch.randn(IMG), labels=ids)
    assert torch.isfinite(out.loss)


def test_add_modality_tokens_initialises_new_rows_to_the_mean():
    tok = tiny_tokenizer()
    llm = tiny_llm("llama", vocab_size=len(tok))
    old_in = llm.get_input_embeddings().weight.detach().clone()
    old_out = llm.get_output_embeddings().weight.detach().clone()
    model = MultimodalModel(encoders={"vision": ModalEncoderModule(tiny_clip_vision())}, language_model=llm)
    ids = add_modality_tokens(tok, model, wrap=True)
    assert model.config.modality_token_ids == ids
    start, end = model.config.modality_wrap_token_ids["vision"]
    assert tok.convert_ids_to_tokens([ids["vision"], start, end]) == ["<vision>", "<vision_start>", "<vision_end>"]
    assert tok.tokenize("a <vision> b").count("<vision>") == 1  # one token, never split
    new_in, new_out = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    assert new_in.shape[0] == len(tok) == old_in.shape[0] + 3
    assert torch.equal(new_in[: old_in.shape[0]], old_in)
    for row in (ids["vision"], start, end):
        assert torch.allclose(new_in[row], old_in.mean(0), atol=1e-6)
        assert torch.allclose(new_out[row], old_out.mean(0), atol=1e-6)
    assert model.config.text_config.vocab_size == len(tok)


def test_add_modality_tokens_keeps_tied_embeddings_tied():
    tok = tiny_tokenizer()
    llm = tiny_llm("gpt2", vocab_size=len(tok))
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    model = MultimodalModel(encoders={"audio": ModalEncoderModule(tiny_whisper_encoder())}, language_model=llm)
    add_modality_tokens(tok, model)
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    assert llm.get_input_embeddings().weight.shape[0] == len(tok)


def test_peft_wrapped_llm_trains_and_generates(tiny):
    peft = pytest.importorskip("peft")
    _, tok = tiny
    llm = peft.get_peft_model(tiny_llm(vocab_size=len(tok)), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = MultimodalModel(encoders={"vision": ModalEncoderModule(tiny_clip_vision())}, language_model=llm)
    model.set_modality_token_ids({"vision": 900})
    ids = torch.tensor([[1] + [900] * 5 + [6, 7]])
    out = model(input_ids=ids, pixel_values=torch.randn(IMG), labels=ids)
    out.loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert not any(p.requires_grad for n, p in model.language_model.named_parameters() if "lora" not in n)
    gen = model.generate(input_ids=ids, pixel_values=torch.randn(IMG), max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 3)


def test_projector_given_as_multimodal_projector_is_kept():
    proj = MultimodalProjector(MultimodalProjectorConfig(projector_type="resampler", in_features=24, out_features=32, num_queries=3))
    model = MultimodalModel(encoders={"vision": ModalEncoderModule(tiny_clip_vision(), proj)}, language_model=tiny_llm())
    model.set_modality_token_ids({"vision": 9})
    assert model.encoders["vision"].projector is proj
    out = model(input_ids=torch.tensor([[1, 9, 9, 9, 2]]), pixel_values=torch.randn(IMG))
    assert out.logits.shape[:2] == (1, 5)


def test_start_end_wrapped_runs_are_real_tokens_and_placeholders_are_masked():
    from mmcore import expand_placeholders
    from mmcore.testing import tiny_multimodal_model

    model, tok = tiny_multimodal_model(wrap=True)
    token_ids = model.config.modality_token_ids
    wrap = {m: tuple(v) for m, v in model.config.modality_wrap_token_ids.items()}
    ids = expand_placeholders(tok("look <vision> and <vision>").input_ids, token_ids, {"vision": [4, 4]}, wrap=wrap)
    start, end = wrap["vision"]
    assert ids.count(start) == ids.count(end) == 2 and ids.count(token_ids["vision"]) == 8
    ids = torch.tensor([ids])
    out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 28, 28), labels=ids)
    assert torch.isfinite(out.loss)
    # the wrap tokens keep their own (trainable) embeddings, so they receive gradient; placeholders do not
    out.loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad[start].abs().sum() > 0 and grad[end].abs().sum() > 0
    assert grad[token_ids["vision"]].abs().sum() == 0


def test_bad_constructor_arguments_are_typed_errors():
    from mmcore.errors import ConfigError

    with pytest.raises(ConfigError, match="encoders\\['vision'\\] must be a ModalEncoderModule, got CLIPVisionModel"):
        MultimodalModel(encoders={"vision": tiny_clip_vision()}, language_model=tiny_llm())
    with pytest.raises(ConfigError, match="needs a language_model"):
        MultimodalModel(encoders={"vision": ModalEncoderModule(tiny_clip_vision())})
    with pytest.raises(ConfigError, match="unknown projector type 'conv'"):
        MultimodalModel(encoders={"vision": ModalEncoderModule(tiny_clip_vision())}, language_model=tiny_llm(), init_projector_type="conv")


def test_a_callback_declares_how_it_changes_the_width_and_the_projector_follows():
    from mmcore.callbacks import Callback

    class TwoLayers(Callback):  # concatenates the last two hidden states: twice the width
        name = "two_layers"
        slot = "postprocess_module"
        module_kwargs = {"output_hidden_states": True}

        def output_width(self, width):
            return 2 * width

        def __call__(self, inputs, output):
            return (torch.cat([output.hidden_states[-1], output.hidden_states[-2]], dim=-1),)

    model = MultimodalModel(
        encoders={"vision": ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=TwoLayers())},
        language_model=tiny_llm(),
    )
    assert model.encoders["vision"].projector.config.in_features == 48  # CLIP's 24, doubled
    model.set_modality_token_ids({"vision": 7})
    assert model(input_ids=torch.tensor([[1] + [7] * 5]), pixel_values=torch.randn(IMG)).logits.shape == (1, 6, 384)


def test_an_encoder_may_name_its_projector_type():
    model = MultimodalModel(
        encoders={"vision": ModalEncoderModule(tiny_clip_vision(), "mlp2x_gelu"), "audio": ModalEncoderModule(tiny_whisper_encoder())},
        language_model=tiny_llm(),
    )
    assert model.encoders["vision"].projector.config.projector_type == "mlp2x_gelu"
    assert model.encoders["audio"].projector.config.projector_type == "linear"  # init_projector_type's default


def test_hf_trainer_counts_the_loss_tokens_of_a_causal_lm(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = MultimodalModel({"vision": ModalEncoderModule(tiny_clip_vision())}, tiny_llm())
    assert model.loss_type == "ForCausalLM"
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    assert trainer._loss_shifts_labels  # num_items_in_batch over labels[..., 1:], as the shifted loss counts
