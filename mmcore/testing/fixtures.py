"""Tiny random-weight parts and an offline tokenizer (no network: configs are built in code, the
tokenizer is trained in memory on a small built-in corpus). Heavy imports happen inside the functions."""

from __future__ import annotations

from typing import Any

_CORPUS = """
the quick brown fox jumps over the lazy dog . a red circle , a blue square , a green triangle .
a picture of a cat sitting on a mat . the sound of a low tone , a high tone , a chord .
user : what is in the image ? assistant : there is a yellow star on a white background .
describe the audio clip . it is a short beep followed by silence . hello world , how are you ?
one two three four five six seven eight nine ten red green blue yellow purple orange black white
"""


def tiny_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer trained in memory (``PreTrainedTokenizerFast``), with bos/eos/pad/unk
    and a minimal chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return fast


def tiny_llm(family: str = "llama", vocab_size: int = 384, hidden_size: int = 32, seed: int = 0, **overrides: Any):
    """A 2-layer random-weight causal LM of the given family (``llama``, ``qwen2``, ``gpt2``)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if family == "llama":
        config = LlamaConfig(
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common,
        )  # fmt: skip
    elif family == "qwen2":
        config = Qwen2Config(
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common,
        )  # fmt: skip
    elif family == "gpt2":
        config = GPT2Config(n_embd=hidden_size, n_layer=2, n_head=4, n_positions=256, **common)
    else:
        raise ValueError(f"unknown tiny LLM family {family!r}; expected llama, qwen2 or gpt2")
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def tiny_clip_vision(hidden_size: int = 24, image_size: int = 28, patch_size: int = 14, seed: int = 0):
    """A 2-layer random CLIP vision tower: ``(image_size / patch_size)**2 + 1`` tokens (with CLS)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=hidden_size,
    )  # fmt: skip
    return CLIPVisionModel._from_config(config)


def tiny_siglip_vision(hidden_size: int = 24, image_size: int = 28, patch_size: int = 14, seed: int = 0):
    """A 2-layer random SigLIP vision tower (no CLS token)."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size,
    )  # fmt: skip
    return SiglipVisionModel._from_config(config)


def tiny_whisper_encoder(d_model: int = 16, num_mel_bins: int = 8, max_source_positions: int = 10, seed: int = 0):
    """A 1-layer random Whisper encoder; ``input_features`` of shape ``(batch, num_mel_bins,
    2 * max_source_positions)`` give ``max_source_positions`` tokens."""
    import torch
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(seed)
    config = WhisperConfig(
        d_model=d_model, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
        num_mel_bins=num_mel_bins, max_source_positions=max_source_positions,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=2 * d_model,
    )  # fmt: skip
    return WhisperEncoder._from_config(config)


def tiny_assembled_model(
    encoders: Any, *, family: str = "llama", seed: int = 0, wrap: bool = False, **model_options: Any
) -> tuple[Any, Any]:
    """``encoders`` (modality -> `ModalEncoderModule`, e.g. from `mmcore.build_encoder`) around a
    tiny LLM of ``family`` sized to `tiny_tokenizer`, with the modality tokens added to both (start and
    end tokens too with ``wrap``); ``model_options`` go to `MultimodalModel` (e.g.
    ``init_projector_type="resampler"``). Returns ``(model, tokenizer)``.

    >>> model, tokenizer = tiny_assembled_model({"vision": mmcore.build_encoder("clip", preset="tiny")})  # doctest: +SKIP
    """
    from mmcore.modeling.multimodal import MultimodalModel
    from mmcore.modeling.tokens import add_modality_tokens

    tokenizer = tiny_tokenizer()
    llm = tiny_llm(family, vocab_size=len(tokenizer), seed=seed)
    model = MultimodalModel(encoders=dict(encoders), language_model=llm, **model_options)
    add_modality_tokens(tokenizer, model, wrap=wrap)
    return model, tokenizer


def tiny_multimodal_model(family: str = "llama", projector: str = "mlp2x_gelu", wrap: bool = False, seed: int = 0):
    """CLIP (penultimate layer, CLS dropped) + Whisper + a tiny LLM, with modality tokens added.

    Returns ``(model, tokenizer)``. Each image becomes 4 tokens, each audio clip 10.
    """
    from mmcore.callbacks import SelectFeatureLayer
    from mmcore.modeling.encoder import ModalEncoderModule

    encoders = {
        "vision": ModalEncoderModule(
            tiny_clip_vision(seed=seed), postprocess_module_callback=SelectFeatureLayer(-2, drop_prefix_tokens=1)
        ),
        "audio": ModalEncoderModule(tiny_whisper_encoder(seed=seed)),
    }
    return tiny_assembled_model(encoders, family=family, seed=seed, wrap=wrap, init_projector_type=projector)
