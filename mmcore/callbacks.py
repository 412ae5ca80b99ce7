"""Public home of the encoder callbacks (see `mmcore.builtin.callbacks` for the contract)."""

from mmcore.builtin.callbacks import Callback, DropPrefixTokens, SelectFeatureLayer

__all__ = ["Callback", "DropPrefixTokens", "SelectFeatureLayer"]
