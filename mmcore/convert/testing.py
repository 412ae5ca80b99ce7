"""A tiny random-weight transformers LLaVA and its processor, built offline, for tests and docs.

>>> llava, processor = tiny_llava("clip")          # doctest: +SKIP
>>> llava.save_pretrained(d); processor.save_pretrained(d)   # a directory `mmcore convert` reads
"""

from __future__ import annotations

from typing import Any

IMAGE_SIZE, PATCH_SIZE = 28, 14
#: LLaVA-NeXT grid resolutions of `tiny_llava_next` (multiples of the 28 px tile)
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84]]


def _tiny_parts(tower: str, text_family: str = "llama") -> tuple[Any, Any, Any, str, int]:
    """``(tokenizer with <image>, vision config, text config, strategy, prefix tokens)`` of the tiny
    LLaVA-family models: a 3-layer CLIP (strategy ``default``: CLS dropped) or SigLIP (``full``) tower
    at 28 px (4 patches) and a 2-layer llama, mistral or qwen2."""
    from tokenizers import AddedToken
    from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig, Qwen2Config, SiglipVisionConfig

    from mmcore.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    vision = dict(
        hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    )  # fmt: skip
    if tower == "clip":
        vision_config, strategy, prefix = CLIPVisionConfig(**vision), "default", 1
    elif tower == "siglip":
        vision_config, strategy, prefix = SiglipVisionConfig(**vision), "full", 0
    else:
        raise ValueError(f"tower must be 'clip' or 'siglip', got {tower!r}")
    text_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[text_family]
    text_config = text_class(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    return tokenizer, vision_config, text_config, strategy, prefix


def _seeded_model(
    model_class: type, config_class: type, seed: int, tokenizer: Any, vision_config: Any, text_config: Any,
    **fields: Any,
) -> Any:  # fmt: skip
    """A LLaVA-family ``model_class`` of seeded random fp32 weights, in eval mode, on a ``config_class`` of
    the tiny parts (`_tiny_parts`) with the tokenizer's ``<image>`` as the image token and ``fields``."""
    import torch

    config = config_class(
        vision_config=vision_config, text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), **fields,
    )  # fmt: skip
    torch.manual_seed(seed)
    return model_class(config).to(torch.float32).eval()


def tiny_llava(tower: str = "clip", *, seed: int = 0, feature_layer: int | list[int] = -2) -> tuple[Any, Any]:
    """``(LlavaForConditionalGeneration, LlavaProcessor)``: a 3-layer CLIP (strategy ``default``: CLS
    dropped) or SigLIP (strategy ``full``) tower at 28 px (4 patches), a 2-layer llama, and
    `mmcore.testing.tiny_tokenizer` with an ``<image>`` token inside the vocabulary."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
    )

    tokenizer, vision_config, text_config, strategy, prefix = _tiny_parts(tower)
    if tower == "clip":
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
    else:
        image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    num_image_tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2 + prefix - (1 if strategy == "default" else 0)
    llava = _seeded_model(
        LlavaForConditionalGeneration, LlavaConfig, seed, tokenizer, vision_config, text_config,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
        image_seq_length=num_image_tokens,
    )  # fmt: skip
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
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer, vision_config, text_config, strategy, prefix = _tiny_parts(
        tower, "mistral" if tower == "clip" else "llama"
    )
    hf = _seeded_model(
        LlavaNextForConditionalGeneration, LlavaNextConfig, seed, tokenizer, vision_config, text_config,
        vision_feature_layer=-2, vision_feature_select_strategy=strategy, image_grid_pinpoints=NEXT_PINPOINTS,
        tie_word_embeddings=False,
    )  # fmt: skip
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=NEXT_PINPOINTS,
    )  # fmt: skip
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=prefix,
        chat_template=tokenizer.chat_template,
    )  # fmt: skip
    return hf, processor


#: LLaVA-OneVision tile and grid resolutions of `tiny_llava_onevision`: 42 px tiles, patch 14 (3x3 tokens
#: per tile, pooled to 2x2 per video frame), grids that are multiples of the tile
ONEVISION_IMAGE_SIZE = 42
ONEVISION_PINPOINTS = [[42, 84], [84, 42], [84, 84], [42, 126]]


def tiny_llava_onevision(tower: str = "siglip", *, seed: int = 0, vision_aspect_ratio: str = "anyres_max_2") -> tuple[Any, Any]:
    """``(LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor)``: a 3-layer SigLIP tower
    (strategy ``full``, as the released checkpoints) with a 2-layer Qwen2, or a CLIP tower (strategy
    ``default``) with a 2-layer Llama; 42 px tiles (9 tokens each) on the grids `ONEVISION_PINPOINTS`,
    ``anyres_max_2`` (a near-square image's grid is downscaled), `mmcore.testing.tiny_tokenizer` with
    ``<image>`` and ``<video>`` tokens, and a video processor at the tile size."""
    from tokenizers import AddedToken
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tokenizer, vision_config, text_config, strategy, prefix = _tiny_parts(tower, "qwen2" if tower == "siglip" else "llama")
    tokenizer.add_tokens([AddedToken("<video>", special=True, normalized=False)], special_tokens=True)
    text_config.vocab_size = len(tokenizer)
    vision_config.image_size = ONEVISION_IMAGE_SIZE
    hf = _seeded_model(
        LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig, seed, tokenizer, vision_config,
        text_config, video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2 if tower == "clip" else -1, vision_feature_select_strategy=strategy,
        image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio=vision_aspect_ratio,
        tie_word_embeddings=False,
    )  # fmt: skip
    size = {"height": ONEVISION_IMAGE_SIZE, "width": ONEVISION_IMAGE_SIZE}
    image_processor = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=ONEVISION_PINPOINTS)
    video_processor = LlavaOnevisionVideoProcessor(size=size)
    side = ONEVISION_IMAGE_SIZE // PATCH_SIZE
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        # the processor subtracts one for the 'default' strategy: count CLIP's CLS in (int(sqrt) still gives side)
        num_image_tokens=side * side + prefix, vision_feature_select_strategy=strategy,
        vision_aspect_ratio=vision_aspect_ratio, chat_template=tokenizer.chat_template,
    )  # fmt: skip
    return hf, processor


def random_images(sizes: Any, seed: int = 0) -> list[Any]:
    """Seeded random RGB PIL images, one per ``(height, width)`` of ``sizes``, drawn from one generator
    (the images `load_without_mmcore` makes for the same sizes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def random_video(frames: int, height: int, width: int, seed: int = 0) -> Any:
    """A seeded random ``(frames, height, width, 3)`` uint8 video."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def qwen2_vl_tokenizer() -> tuple[Any, dict[str, int]]:
    """`mmcore.testing.tiny_tokenizer` with Qwen2-VL's vision tokens (``<|vision_start|>``,
    ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``) added as special tokens, and their ids."""
    from tokenizers import AddedToken

    from mmcore.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    return tokenizer, {t: tokenizer.convert_tokens_to_ids(t) for t in special}


def tiny_qwen2_vl(family: str, seed: int = 0):
    """``(Qwen2VLForConditionalGeneration or Qwen2_5_VLForConditionalGeneration, its processor)`` for
    ``family`` ``qwen2_vl`` / ``qwen2_5_vl``: the qwen2vl plugin's tiny tower (4 px patches, images of
    8x8 to 32x32 px), a 2-layer text model with M-RoPE sections (2, 3, 3), and
    `mmcore.testing.tiny_tokenizer` with Qwen2-VL's vision tokens (``<|vision_start|>``,
    ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``). Needs mmcore-plugin-qwen2vl."""
    import torch
    from mmcore_plugin_qwen2vl.presets import PRESETS
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer, ids = qwen2_vl_tokenizer()
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_parameters={"rope_type": "default",
        "mrope_section": [2, 3, 3], "rope_theta": 10000.0}, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config_class, model_class, processor_class = {
        "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
        "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
    }[family]
    config = config_class(
        text_config=text, vision_config=PRESETS[family]["tiny"]["config"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = model_class(config).eval()
    pixels = dict(
        patch_size=4, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 64, "longest_edge": 1024}
    )
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(**pixels), video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
    )  # fmt: skip
    return hf, processor


# The start of every script `run_without_mmcore` runs: the interpreter's packages without the .pth
# files (the editable mmcore), and proof that mmcore is not importable.
_NO_MMCORE = """
import sys
sys.path[:0] = {paths!r}
for name in ("mmcore", "mmcore_plugin_clip"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{{name}} is importable; the test would prove nothing")
RESULT = {result!r}
"""


def run_without_mmcore(script: str, workdir: Any) -> dict[str, Any]:
    """Run the Python source ``script`` in an interpreter where mmcore and its plugins cannot be
    imported (``python -I -S`` with only the interpreter's site-packages on the path), in ``workdir``;
    the script ``torch.save``-s its result (a dict) to the path ``RESULT``, which is returned, loaded.
    An ``AssertionError`` with the script's stderr when it fails."""
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    import torch

    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    result = Path(workdir) / "without-mmcore.pt"
    prelude = _NO_MMCORE.format(paths=paths, result=str(result))
    run = subprocess.run([sys.executable, "-I", "-S", "-c", prelude + script], capture_output=True, text=True,
                         cwd=workdir, timeout=300)  # fmt: skip
    if run.returncode != 0:
        raise AssertionError(f"running without mmcore failed:\n{run.stderr[-3000:]}")
    return torch.load(result, weights_only=True)


# What `load_without_mmcore` runs on an exported directory.
_LOAD_EXPORTED = """
import numpy as np, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained({out!r}).eval()
processor = AutoProcessor.from_pretrained({out!r})
processor.tokenizer.padding_side = "left"
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in {image_sizes!r}]
token = processor.image_token
texts = {texts}
batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**batch).logits
torch.save({{"batch": dict(batch), "logits": logits, "class": type(model).__name__,
            "processor": type(processor).__name__, "texts": texts}}, RESULT)
"""


def load_without_mmcore(
    out: Any, workdir: Any, *, image_sizes: list[tuple[int, int]], texts: str
) -> dict[str, Any]:
    """Load the exported transformers directory ``out`` where mmcore cannot be imported
    (`run_without_mmcore`), run its processor on seeded random images of ``image_sizes`` and the
    prompts ``texts`` (a Python expression that may use ``processor`` and its image ``token``), and
    return ``{"batch", "logits", "class", "processor", "texts"}``."""
    script = _LOAD_EXPORTED.format(out=str(out), image_sizes=list(image_sizes), texts=texts)
    return run_without_mmcore(script, workdir)


def convert_saved(hf: Any, processor: Any, path: Any, *, text: list[str], **media: Any) -> dict[str, Any]:
    """Save the transformers model ``hf`` and its ``processor`` into ``path``, load both back as
    transformers does (``AutoModelForImageTextToText`` / ``AutoProcessor``), make a left-padded batch
    of ``text`` and ``media`` (``images=``, ``videos=``) with the loaded processor, and convert the
    directory as a user does (``MultimodalModel.from_pretrained_multimodal_model``).

    Returns ``{"path", "hf", "hf_processor", "batch", "mllm", "processor"}`` (the models in eval mode)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmcore import MultimodalModel

    hf.save_pretrained(path)
    processor.save_pretrained(path)
    loaded = AutoModelForImageTextToText.from_pretrained(path).eval()
    hf_processor = AutoProcessor.from_pretrained(path)
    hf_processor.tokenizer.padding_side = "left"
    batch = dict(hf_processor(text=text, **media, return_tensors="pt", padding=True))
    mllm, mm_processor = MultimodalModel.from_pretrained_multimodal_model(path, return_processor=True)
    return {"path": path, "hf": loaded, "hf_processor": hf_processor, "batch": batch, "mllm": mllm.eval(),
            "processor": mm_processor}  # fmt: skip


def assert_same_tensors(got: Any, expected: Any, keys: Any) -> None:
    """``got[key]`` has the dtype and, to the bit, the values of ``expected[key]`` for each of ``keys``;
    an ``AssertionError`` naming the first key that differs otherwise."""
    import torch

    for key in keys:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


def assert_bit_exact(got: Any, expected: Any, config_fields: tuple[str, ...] = ()) -> None:
    """The model ``got`` holds the tensors of ``expected`` (the same keys, dtypes and values, to the bit)
    and the same values of the config fields ``config_fields``; an ``AssertionError`` naming the first
    key or field that differs otherwise."""
    want, have = expected.state_dict(), got.state_dict()
    assert sorted(have) == sorted(want)
    assert_same_tensors(have, want, want)
    for field in config_fields:
        assert getattr(got.config, field) == getattr(expected.config, field), field


def assert_same_outputs(
    mllm: Any, hf: Any, batch: dict[str, Any], *, atol: float = 1e-5, new_tokens: int = 6
) -> None:
    """On ``batch``, the mmcore model's logits are transformers' ``hf``'s (within ``atol``, ``rtol=0``) and
    both generate the same ``new_tokens`` tokens greedily."""
    import torch

    with torch.no_grad():
        torch.testing.assert_close(mllm(**batch).logits, hf(**batch).logits, rtol=0, atol=atol)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        assert mllm.generate(**batch, **kwargs).tolist() == hf.generate(**batch, **kwargs).tolist()


def save_and_load(mllm: Any, processor: Any, path: Any) -> tuple[Any, Any]:
    """Save the mmcore model and its processor into ``path`` and load both back from it with nothing
    passed; returns (the model in eval mode, the processor)."""
    from mmcore import MultimodalModel
    from mmcore.processing import MultimodalProcessor

    mllm.save_pretrained(path)
    processor.save_pretrained(path)
    return MultimodalModel.from_pretrained(path).eval(), MultimodalProcessor.from_pretrained(path)


def export_with_cli(mllm: Any, processor: Any, workdir: Any) -> tuple[Any, dict[str, Any]]:
    """Save ``mllm`` and its ``processor`` under ``workdir / "model"`` and run ``mmcore export`` on it
    into ``workdir / "exported"``; returns (that directory, the command's ``--json`` report). An
    ``AssertionError`` with the command's output when it fails."""
    import json

    from typer.testing import CliRunner

    from mmcore.cli import app as cli_app

    model_dir, out = workdir / "model", workdir / "exported"
    mllm.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    result = CliRunner().invoke(cli_app.build_app(), ["export", str(model_dir), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)
