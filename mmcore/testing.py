"""Tiny random-weight parts and an offline tokenizer, for tests, docs and the demo.

Everything here works with no network: configs are built in code and the tokenizer is trained in
memory on a small built-in corpus. Heavy imports happen inside the functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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


def tiny_multimodal_model(family: str = "llama", projector: str = "mlp2x_gelu", wrap: bool = False, seed: int = 0):
    """CLIP (penultimate layer, CLS dropped) + Whisper + a tiny LLM, with modality tokens added.

    Returns ``(model, tokenizer)``. Each image becomes 4 tokens, each audio clip 10.
    """
    from mmcore.callbacks import SelectFeatureLayer
    from mmcore.modeling.encoder import ModalEncoderModule
    from mmcore.modeling.multimodal import MultimodalModel
    from mmcore.modeling.tokens import add_modality_tokens

    tokenizer = tiny_tokenizer()
    model = MultimodalModel(
        encoders={
            "vision": ModalEncoderModule(
                tiny_clip_vision(seed=seed), postprocess_module_callback=SelectFeatureLayer(-2, drop_prefix_tokens=1)
            ),
            "audio": ModalEncoderModule(tiny_whisper_encoder(seed=seed)),
        },
        language_model=tiny_llm(family, vocab_size=len(tokenizer), seed=seed),
        init_projector_type=projector,
    )
    add_modality_tokens(tokenizer, model, wrap=wrap)
    return model, tokenizer


@contextmanager
def registered_plugin(obj: Any, name: str = "test") -> Iterator[Any]:
    """Register a plugin object (a module, class or instance with ``@hookimpl`` functions) for the
    duration of a ``with`` block, as if it were installed; yield the fresh `Registry`.

    It goes through the same loading and isolation as an installed plugin (see its
    `mmcore.plugins.plugin_statuses`). Plugin caches are reset on entry and on exit.

    >>> from mmcore import hookimpl
    >>> from mmcore.registry import EncoderSpec
    >>> class MyPlugin:
    ...     @hookimpl
    ...     def register_encoders(self, register):
    ...         register(EncoderSpec(name="toy", modality="vision", summary="toy", factory="my.mod:build"))
    >>> with registered_plugin(MyPlugin()) as registry:
    ...     registry.get_encoder("test:toy").plugin
    'test'
    """
    from mmcore import plugins

    if name in plugins._extra_plugins:
        raise ValueError(f"a plugin named {name!r} is already registered by registered_plugin")
    plugins._extra_plugins[name] = obj
    plugins.reset()
    try:
        yield plugins.get_registry()
    finally:
        del plugins._extra_plugins[name]
        plugins.reset()


# -- the plugin contract check -----------------------------------------------------------------------------
@dataclass
class ContractReport:
    """What `check_encoder_plugin` verified, for a plugin author's test to print or inspect."""

    encoder: str
    preset: str
    recipe: dict[str, Any]
    output_width: int
    tokens_per_item: list[int]
    checks: list[str] = field(default_factory=list)


class ContractError(AssertionError):
    """An encoder plugin breaks the mmcore contract; the message names the encoder and the check."""


def check_encoder_plugin(
    name: str,
    preset: str = "tiny",
    *,
    options: dict[str, Any] | None = None,
    batch_size: int = 2,
    tmp_path: Any = None,
    meta_presets: bool = False,
) -> ContractReport:
    """Check that registered encoder ``name`` keeps the mmcore plugin contract; raise `ContractError`
    (an ``AssertionError``, so pytest shows it as a failure) naming the first check that fails.

    Checks, in order: the spec's fields are valid and its presets match the factory's; the factory
    imports and is an `~mmcore.factory.EncoderFactory`; ``preset`` builds; its recipe is JSON-able;
    dummy inputs run through the encoder; the output width is the announced one; ``num_tokens``
    equals the real output length per item, for dummy inputs and for the processor's output on
    ``dummy_items``; an assembled model (encoder + tiny LLM) saves and loads back with identical
    outputs. ``meta_presets=True`` also builds every preset on the meta device (full-size ones too).

    Use it in the plugin's tests::

        def test_contract(tmp_path):
            mmcore.testing.check_encoder_plugin("whisper", preset="tiny", tmp_path=tmp_path)
    """
    import contextlib
    import json
    import tempfile

    import torch

    from mmcore.factory import EncoderFactory, build_encoder, get_factory
    from mmcore.plugins import get_registry
    from mmcore.registry import EncoderSpec

    def fail(check: str, detail: str) -> ContractError:
        return ContractError(f"encoder {name!r}, check {check!r}: {detail}")

    checks: list[str] = []
    spec = get_registry().get_encoder(name)
    try:
        EncoderSpec(**{f: getattr(spec, f) for f in ("name", "modality", "summary", "factory", "default_checkpoint", "presets", "tags")})
    except Exception as exc:  # noqa: BLE001 - reported as a contract failure
        raise fail("spec", str(exc)) from exc
    checks.append("spec")

    try:
        factory = get_factory(name)
    except Exception as exc:  # noqa: BLE001
        raise fail("factory", f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(factory, EncoderFactory):
        raise fail("factory", f"{spec.factory} is not an EncoderFactory subclass")
    if set(spec.presets) != set(factory.presets):
        raise fail("presets", f"spec lists {sorted(spec.presets)} but the factory has {sorted(factory.presets)}")
    if preset not in factory.presets:
        raise fail("presets", f"preset {preset!r} is not one of {sorted(factory.presets)}")
    checks.append("factory")

    torch.manual_seed(0)
    encoder = build_encoder(name, preset=preset, **(options or {}))
    recipe = encoder.source["recipe"]
    try:
        json.loads(json.dumps(recipe))
    except (TypeError, ValueError) as exc:
        raise fail("recipe", f"the recipe is not JSON-able ({exc}): {recipe!r}") from exc
    checks.append("build")

    width = factory.output_width(recipe)
    encoder.eval()

    def run(inputs: dict[str, Any], what: str) -> list[int]:
        with torch.no_grad():
            features = encoder(**encoder.select_inputs(inputs))
        items = list(features) if isinstance(features, list) else list(features.unbind(0))
        for item in items:
            if item.dim() != 2 or item.shape[-1] != width:
                raise fail("output", f"{what}: expected features (tokens, {width}) per item, got {tuple(item.shape)}")
            if not torch.isfinite(item).all():
                raise fail("output", f"{what}: non-finite features")
        counts = [int(item.shape[0]) for item in items]
        announced = [int(n) for n in factory.num_tokens(recipe, inputs)]
        if announced != counts:
            raise fail("num_tokens", f"{what}: num_tokens says {announced} but the encoder produced {counts}")
        return counts

    dummy = factory.dummy_inputs(recipe, batch_size)
    counts = run(dummy, f"dummy_inputs(batch_size={batch_size})")
    if len(counts) != batch_size:
        raise fail("dummy_inputs", f"asked for {batch_size} items, got {len(counts)}")
    checks += ["dummy_inputs", "num_tokens"]

    items = factory.dummy_items(recipe, 2)
    if items:
        processed = factory.processor(recipe)(items)
        run(dict(processed), "processor(dummy_items)")
        checks.append("processor")

    if meta_presets:
        for other in factory.presets:
            try:
                build_encoder(name, preset=other, device="meta")
            except Exception as exc:  # noqa: BLE001
                raise fail("meta_presets", f"preset {other!r} does not build on the meta device: {exc}") from exc
        checks.append("meta_presets")

    from mmcore.modeling.multimodal import MultimodalModel
    from mmcore.modeling.tokens import add_modality_tokens

    tokenizer = tiny_tokenizer()
    model = MultimodalModel(encoders={spec.modality: encoder}, language_model=tiny_llm(vocab_size=len(tokenizer)))
    add_modality_tokens(tokenizer, model)
    model.eval()
    with tempfile.TemporaryDirectory() if tmp_path is None else contextlib.nullcontext(str(tmp_path)) as root:
        target = f"{root}/{spec.name}-contract-model"
        model.save_pretrained(target)
        loaded = MultimodalModel.from_pretrained(target).eval()
    inputs = loaded.encoders[spec.modality].select_inputs(dummy)
    with torch.no_grad():
        before = model.encoders[spec.modality](**inputs)
        after = loaded.encoders[spec.modality](**inputs)
    before = torch.cat(list(before)) if isinstance(before, list) else before
    after = torch.cat(list(after)) if isinstance(after, list) else after
    if before.shape != after.shape or not torch.equal(before, after):
        raise fail("save_load", "the model loaded from its directory gives different features than the one saved")
    checks.append("save_load")
    return ContractReport(spec.qualified_name, preset, dict(recipe), width, counts, checks)


#: aten ops whose result the host must wait for on an accelerator. ``masked_scatter_backward`` is one
#: CompositeExplicitAutograd op to a dispatch mode: the ``masked_select`` and ``.item()`` inside it
#: are not seen on their own, so the op itself is counted.
HOST_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "item", "is_nonzero", "masked_scatter_backward")


@contextmanager
def count_host_syncs() -> Iterator[Any]:
    """Count, while active, what makes the host wait for an accelerator: the `HOST_SYNC_OPS` as they
    are dispatched, plus ``Tensor.tolist`` (on CPU it reads memory without dispatching any op; on
    CUDA it is a device-to-host copy). Yields a ``collections.Counter``: name -> calls. Works on CPU,
    so tests can hold code to "no sync" without a GPU; ``nonzero_static`` is not counted (its size is
    given, and its CUDA kernel does not sync).

    >>> with count_host_syncs() as syncs:          # doctest: +SKIP
    ...     model(**batch).loss.backward()
    >>> syncs["nonzero"], sum(syncs.values())       # doctest: +SKIP
    """
    from collections import Counter

    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter = Counter()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]  # "nonzero.default" -> "nonzero"
            if name in HOST_SYNC_OPS:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "tolist":
                counts["tolist"] += 1
            return func(*args, **(kwargs or {}))

    with Ops(), Calls():
        yield counts


def mmcore_twin_of_llava(llava: Any) -> Any:
    """An mmcore `MultimodalModel` sharing every weight of a transformers ``LlavaForConditionalGeneration``:
    its vision tower, its projector (as a custom projector), its decoder and its lm_head, with LLaVA's
    feature selection as a `SelectFeatureLayer` callback. For reference tests and benchmarks.

    Supports ``vision_feature_select_strategy="default"`` (CLS dropped) and ``"full"``, and an int
    ``vision_feature_layer``. The placeholder id is LLaVA's ``image_token_index``.
    """
    from transformers import AutoModelForCausalLM

    from mmcore.callbacks import SelectFeatureLayer
    from mmcore.modeling.encoder import ModalEncoderModule
    from mmcore.modeling.multimodal import MultimodalModel
    from mmcore.modeling.projector import MultimodalProjector, MultimodalProjectorConfig

    config = llava.config
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer must be an int, got {config.vision_feature_layer!r}")
    text_config = config.text_config
    with _meta_init():  # the twin's decoder and head are LLaVA's own; build only the shell
        language_model = AutoModelForCausalLM.from_config(text_config)
    language_model.model = llava.model.language_model
    language_model.lm_head = llava.lm_head
    vision_width = config.vision_config.hidden_size
    projector = MultimodalProjector(
        MultimodalProjectorConfig(projector_type="custom", in_features=vision_width, out_features=text_config.hidden_size),
        projection=llava.model.multi_modal_projector,
    )
    drop = 1 if config.vision_feature_select_strategy == "default" else 0
    encoder = ModalEncoderModule(
        llava.model.vision_tower,
        projector=projector,
        postprocess_module_callback=SelectFeatureLayer(layer=config.vision_feature_layer, drop_prefix_tokens=drop),
    )
    twin = MultimodalModel(encoders={"vision": encoder}, language_model=language_model)
    twin.set_modality_token_ids({"vision": config.image_token_index})
    return twin.to(llava.dtype)


@contextmanager
def _meta_init() -> Iterator[None]:
    import torch

    with torch.device("meta"):
        yield
