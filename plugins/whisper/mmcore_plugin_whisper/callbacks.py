"""The ``trim_padding`` callback: each clip keeps only the encoder positions its own samples cover.

Whisper encodes a whole window (padding included, as Whisper itself does); Qwen2-Audio then keeps, per
clip, the positions its real log-mel frames cover. This callback does that cut after the projector,
from the ``feature_attention_mask`` the processor returns (1 for each frame the clip's samples cover),
and gives the merge one ``(positions_i, width)`` tensor per clip.

Registered as ``whisper:trim_padding`` (slot ``postprocess_projector``), so a saved model records it.
"""

from __future__ import annotations

from typing import Any

from mmcore.callbacks import Callback
from mmcore.errors import EncoderInputError


def positions_of_frames(frames: Any) -> Any:
    """Encoder positions that ``frames`` log-mel frames become (an int or an integer tensor).

    The second convolution (kernel 3, stride 2, padding 1) gives ``(frames - 1) // 2 + 1``: the first
    of ``Qwen2AudioEncoder._get_feat_extract_output_lengths``' two lengths (before its pooling).
    A 3 s clip (300 frames): 150; a 30 s window (3000 frames): 1500.
    """
    return (frames - 1) // 2 + 1


class TrimPadding(Callback):
    """Cut each clip's features ``(clips, positions, width)`` to its own positions
    ``positions_of_frames(feature_attention_mask.sum(-1))``; returns a list of ``(positions_i, width)``.

    Left as it is: a call without ``feature_attention_mask`` (every clip keeps the window, as
    ``num_tokens`` then counts too), and features whose token count is not the window's (a projector
    that sets its own count, such as a resampler's ``num_queries``).
    """

    name = "trim_padding"
    slot = "postprocess_projector"

    def __call__(self, inputs: dict, output: Any) -> Any:
        from mmcore.modeling.encoder import first_output

        mask = inputs.get("feature_attention_mask")  # (clips, frames): 1 where the clip's samples are
        features = first_output(output)  # (clips, positions, width)
        if mask is None or not hasattr(features, "dim") or features.dim() != 3:
            return output
        if features.shape[1] != positions_of_frames(mask.shape[-1]):
            return output
        if mask.shape[0] != features.shape[0]:
            raise EncoderInputError(
                f"whisper trim_padding: feature_attention_mask has {mask.shape[0]} rows but the features "
                f"{features.shape[0]} clips; pass the processor's mask for the same clips"
            )
        # One device-to-host read of the lengths (as Qwen2-Audio's boolean cut): slicing needs them.
        lengths = positions_of_frames(mask.sum(-1)).tolist()
        return ([features[i, :n] for i, n in enumerate(lengths)],)
