"""What test files that register their own plugin in-process share: an encoder spec whose factory is a
class of the test module, a context that registers such specs as a plugin, and a base for test callbacks
with one integer parameter (recorded in a saved model as ``{"n": n}``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mmcore import hookimpl
from mmcore.callbacks import Callback
from mmcore.registry import EncoderSpec
from mmcore.testing import registered_plugin


def tiny_spec(module: str, name: str, modality: str, summary: str, factory: str) -> EncoderSpec:
    """An encoder spec for ``module``'s class ``factory``, with one preset, ``tiny``."""
    return EncoderSpec(
        name=name, modality=modality, summary=summary, factory=f"{module}:{factory}", presets=("tiny",)
    )


class EncoderSpecsPlugin:
    """A plugin that registers the given encoder specs (metadata only: a factory is imported when used)."""

    def __init__(self, *specs: EncoderSpec):
        self.specs = specs

    @hookimpl
    def register_encoders(self, register):
        for spec in self.specs:
            register(spec)


@contextmanager
def registered_encoders(name: str, *specs: EncoderSpec) -> Iterator[object]:
    """``specs`` registered as the plugin ``name`` for the ``with`` block; yields the fresh registry."""
    with registered_plugin(EncoderSpecsPlugin(*specs), name=name) as registry:
        yield registry


class IntParamCallback(Callback):
    """A callback with one integer parameter ``n``; a subclass sets ``name``, ``slot`` and ``__call__``."""

    def __init__(self, n: int):
        self.n = n

    def params(self):
        return {"n": self.n}
