"""A tiny random-weight transformers LLaVA and its processor, built offline, for tests and docs.

>>> llava, processor = tiny_llava("clip")          # doctest: +SKIP
>>> llava.save_pretrained(d); processor.save_pretrained(d)   # a directory `mmcore convert` reads
"""

from __future__ import annotations

from typing import Any

IMAGE_SIZE, PATCH_SIZE = 28, 14
#: LLaVA-NeXT grid resolutions of `tiny_llava_next` (multiples of the 28 px tile)
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84]]


def tiny_llava(tower: str = "clip", *, seed: int = 0, feature_layer: int | list[int] = -2) -> tuple[Any, Any]:
    """``(LlavaForConditionalGeneration, LlavaProcessor)``: a 3-layer CLIP (strategy ``default``: CLS
    dropped) or SigLIP (strategy ``full``) tower at 28 px (4 patches), a 2-layer llama, and
    `mmcore.testing.tiny_tokenizer` with an ``<image>`` token inside the vocabulary."""
    import torch
    from tokenizers import AddedToken
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    from mmcore.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = dict(
        hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    )  # fmt: skip
    if tower == "clip":
        vision_config, strategy, prefix = CLIPVisionConfig(**vision), "default", 1
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
    elif tower == "siglip":
        vision_config, strategy, prefix = SiglipVisionConfig(**vision), "full", 0
        image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    else:
        raise ValueError(f"tower must be 'clip' or 'siglip', got {tower!r}")
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    num_image_tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2 + prefix - (1 if strategy == "default" else 0)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=num_image_tokens,
    )
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy=strategy,
        chat_template=tokenizer.chat_template,
        num_additional_image_tokens=prefix,
    )
    return llava, processor


def tiny_llava_next(tower: str = "clip", *, seed: int = 0) -> tuple[Any, Any]:
    """``(LlavaNextForConditionalGeneration, LlavaNextProcessor)``: a 3-layer CLIP tower (strategy
    ``default``) with a 2-layer Mistral, or a SigLIP tower (strategy ``full``) with a 2-layer Llama;
    28 px tiles (4 tokens each) on the grids `NEXT_PINPOINTS`, and `mmcore.testing.tiny_tokenizer` with an
    ``<image>`` token inside the vocabulary."""
    import torch
    from tokenizers import AddedToken
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        MistralConfig,
        SiglipVisionConfig,
    )

    from mmcore.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)  # fmt: skip
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)  # fmt: skip
    if tower == "clip":
        vision_config, text_config, strategy, prefix = CLIPVisionConfig(**vision), MistralConfig(**text), "default", 1
    else:
        vision_config, text_config, strategy, prefix = SiglipVisionConfig(**vision), LlamaConfig(**text), "full", 0
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        image_grid_pinpoints=NEXT_PINPOINTS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    hf = LlavaNextForConditionalGeneration(config).to(torch.float32).eval()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=NEXT_PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=prefix,
        chat_template=tokenizer.chat_template,
    )  # fmt: skip
    return hf, processor
