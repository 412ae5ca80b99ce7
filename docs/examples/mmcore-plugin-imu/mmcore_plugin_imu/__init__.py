"""mmcore plugin: an IMU encoder (6-channel accelerometer + gyroscope time series).

This module is imported on every `mmcore` command, so it registers metadata only and imports no
torch: the factory class is named by its import path and loaded when an encoder is built.
"""

from mmcore import hookimpl
from mmcore.registry import EncoderSpec

MMCORE_PLUGIN_API = 1  # the plugin-API version this plugin is written for


@hookimpl
def register_encoders(register):
    register(
        EncoderSpec(
            name="imu",
            modality="imu",
            summary="IMU time series: strided 1-D conv patches + a small transformer",
            factory="mmcore_plugin_imu.factory:ImuFactory",
            presets=("tiny", "base"),
            tags=("sensor", "time-series"),
        )
    )
