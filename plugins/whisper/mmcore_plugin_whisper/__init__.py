"""mmcore plugin: the Whisper audio encoder (transformers), with log-mel features from torchaudio.

Imported on every `mmcore` command, so it registers metadata only and imports no torch, torchaudio
or transformers: the factory (`mmcore_plugin_whisper.factory:WhisperFactory`) is loaded when an
encoder is built, the ``trim_padding`` callback when a model uses it.
"""

from mmcore import hookimpl
from mmcore.registry import CallbackSpec, EncoderSpec
from mmcore_plugin_whisper.presets import DEFAULT_CHECKPOINT, PRESET_NAMES

MMCORE_PLUGIN_API = 1  # the plugin-API version this plugin is written for


@hookimpl
def register_encoders(register):
    register(
        EncoderSpec(
            name="whisper",
            modality="audio",
            summary=(
                "Whisper encoder (transformers); torchaudio log-mel; window set by max_seconds, "
                "tokens by each clip's length"
            ),
            factory="mmcore_plugin_whisper.factory:WhisperFactory",
            default_checkpoint=DEFAULT_CHECKPOINT,
            presets=PRESET_NAMES,
            tags=("transformers", "speech", "audio"),
        )
    )


@hookimpl
def register_callbacks(register):
    register(
        CallbackSpec(
            name="trim_padding",
            slots=("postprocess_projector",),
            summary="each clip keeps only the encoder positions its own samples cover (Qwen2-Audio's cut)",
            factory="mmcore_plugin_whisper.callbacks:TrimPadding",
        )
    )
