"""`import mmcore` stays cheap: public names resolve lazily."""

import subprocess
import sys

from mmcore.testing.suite import HEAVY_MODULES as HEAVY


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return set(out.stdout.split())


def test_import_mmcore_imports_no_torch_transformers_or_timm():
    loaded = _modules_after("import mmcore")
    assert "mmcore" in loaded
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]


def test_public_names_resolve_lazily():
    loaded = _modules_after("import mmcore\nmmcore.MultimodalModel")
    assert "torch" in loaded and "mmcore.modeling.multimodal" in loaded


def test_every_public_name_resolves():
    import mmcore

    for name in mmcore.__all__:
        assert getattr(mmcore, name) is not None, name
    assert sorted(mmcore.__all__) == sorted([*mmcore._LAZY, "__version__"])  # the list names every lazy one


def test_unknown_attribute_raises_attribute_error():
    import mmcore

    try:
        mmcore.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
