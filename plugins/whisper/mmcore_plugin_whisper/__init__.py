"""mmcore plugin: the Whisper audio encoder (transformers), with log-mel features from torchaudio.

Imported on every `mmcore` command, so it registers metadata only and imports no torch, torchaudio
or transformers: the factory (`mmcore_plugin_whisper.factory:WhisperFactory`) is loaded when an
encoder is built.
"""

from mmcore import hookimpl
from mmcore.registry import EncoderSpec
from mmcore_plugin_whisper.presets import DEFAULT_CHECKPOINT, PRESET_NAMES

MMCORE_PLUGIN_API = 1  # the plugin-API version this plugin is written for


@hookimpl
def register_encoders(register):
    register(
        EncoderSpec(
            name="whisper",
            modality="audio",
            summary="Whisper encoder (transformers); torchaudio log-mel; window set by max_seconds",
            factory="mmcore_plugin_whisper.factory:WhisperFactory",
            default_checkpoint=DEFAULT_CHECKPOINT,
            presets=PRESET_NAMES,
            tags=("transformers", "speech", "audio"),
        )
    )
