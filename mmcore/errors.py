"""Typed errors a user can meet. Each says what was expected and what came.

The CLI turns any `MMCoreError` into one line on stderr and exit status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class MMCoreError(Exception):
    """Base class of every error mmcore raises on bad input."""


class ConfigError(MMCoreError, ValueError):
    """A configuration value is missing, malformed or inconsistent."""


class WidthMismatchError(ConfigError):
    """A projector's input or output width does not match its encoder or the language model."""


class EncoderInputError(MMCoreError, ValueError):
    """Inputs for the encoders cannot be routed unambiguously, or an encoder rejected them."""


class PlaceholderMismatchError(MMCoreError, ValueError):
    """The number of placeholder tokens differs from the number of features an encoder produced."""


class TokenIdError(ConfigError):
    """Modality token ids are missing or invalid."""


class SerializationError(MMCoreError):
    """A model part cannot be recorded in, or rebuilt from, a saved model directory."""


class UnrecordableCallbackError(SerializationError):
    """A callback (a lambda, a local function, ...) cannot be written to config.json."""


class TrainableSpecError(ConfigError):
    """A part name given to `set_trainable` does not exist."""


class InvalidSpecError(ConfigError):
    """A plugin registered an item whose metadata is malformed (bad name, factory path, slot, ...)."""


class UnknownNameError(MMCoreError, LookupError):
    """No registered encoder, projector or callback has this name (the message suggests close ones)."""


class AmbiguousNameError(MMCoreError, LookupError):
    """A bare name is registered by more than one plugin; ``plugin:name`` picks one."""


class FactoryImportError(MMCoreError, ImportError):
    """A registered item's lazy ``module:attr`` factory cannot be imported."""


class PluginError(MMCoreError):
    """A plugin cannot be loaded. Raised only with ``MMCORE_STRICT_PLUGINS=1``; otherwise a warning."""


class PluginWarning(UserWarning):
    """A plugin was set aside (failed, incompatible) or two plugins registered the same name."""


class DataFormatError(ConfigError):
    """A training-data file or record does not follow the expected format."""


class DataError(MMCoreError, ValueError):
    """Training data has problems; ``problems`` lists them, one ``file:line: what`` string each."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class NonFiniteError(MMCoreError, FloatingPointError):
    """A training step's loss or gradients are NaN or infinite; ``step`` and ``samples`` say where."""

    def __init__(self, message: str, step: int = 0, samples: list | None = None):
        super().__init__(message)
        self.step, self.samples = step, list(samples or [])


class SaveError(MMCoreError, OSError):
    """Writing a model, processor or checkpoint failed (a full disk, no permission, a file where a
    folder should be); the previous contents are kept and the message says what was kept."""


class CheckpointError(SerializationError):
    """A saved model or processor file is truncated, corrupt, unsafe, or does not fit its config."""


class UntrustedCodeError(SerializationError):
    """Loading would import code that no installed plugin registered; ``trust_remote_code=True`` allows it."""
