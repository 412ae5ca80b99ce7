"""Packaging metadata every distribution in the tree shares."""

from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECTS = sorted([ROOT / "pyproject.toml", *ROOT.glob("plugins/*/pyproject.toml"), *ROOT.glob("docs/examples/*/pyproject.toml")])


@pytest.mark.parametrize("path", PYPROJECTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_license_is_an_spdx_string(path):
    # `license = {text = ...}` is deprecated by setuptools (refused from 2027-02); PEP 639 wants the SPDX form.
    project = tomllib.loads(path.read_text())["project"]
    license = project.get("license")
    assert license is None or isinstance(license, str), f"{path}: license must be an SPDX string, got {license!r}"
    assert not any(c.startswith("License ::") for c in project.get("classifiers", [])), "license classifiers conflict with PEP 639"


@pytest.mark.parametrize("path", PYPROJECTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_build_backend_understands_spdx_licenses(path):
    requires = tomllib.loads(path.read_text())["build-system"]["requires"]
    assert "setuptools>=77" in requires, f"{path}: SPDX license strings need setuptools>=77, got {requires}"
