"""Plugins in tests: `registered_plugin` (register one for a ``with`` block, as if installed) and the
encoder-plugin contract check `check_encoder_plugin` a plugin author runs in their own tests."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mmcore.testing.fixtures import tiny_assembled_model


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
def encoder_features(encoder: Any, inputs: Mapping[str, Any]) -> list[Any]:
    """``encoder``'s features for processed ``inputs`` (its projector not run, no gradients): one
    ``(tokens, width)`` tensor per item, whether the module returns a batch or a list."""
    import torch

    with torch.no_grad():
        features = encoder(**encoder.select_inputs(dict(inputs)))
    return list(features) if isinstance(features, list) else list(features.unbind(0))


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
        items = encoder_features(encoder, inputs)
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

    model, _ = tiny_assembled_model({spec.modality: encoder})
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
