"""The mark for tests that need installed plugins: they are skipped where a plugin is not importable
(``make test`` puts every plugin's site on the path).

>>> pytestmark = needs_plugins("clip", "siglip")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util

import pytest


def needs_plugins(*names: str) -> pytest.MarkDecorator:
    """``skipif`` unless ``mmcore_plugin_<name>`` is importable for each of ``names``."""
    missing = [n for n in names if importlib.util.find_spec(f"mmcore_plugin_{n}") is None]
    wanted = " and ".join(f"mmcore-plugin-{n}" for n in names)
    return pytest.mark.skipif(
        bool(missing), reason=f"needs {wanted} installed (make test puts them on the path)"
    )
