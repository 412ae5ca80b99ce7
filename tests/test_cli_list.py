"""``mmcore list-encoders`` / ``list-projectors`` / ``list-callbacks`` / ``list-llms``: tables and JSON,
filters, the LLM presets, and listing without importing torch, transformers or timm."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from mmcore.testing.suite import HEAVY_MODULES as HEAVY


def test_list_encoders_json_and_table_show_the_installed_plugins(cli):
    result = cli("list-encoders", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["qualified_name"]: r for r in json.loads(result.stdout)}
    assert rows["fake:toyvision"] == {
        "name": "toyvision",
        "qualified_name": "fake:toyvision",
        "modality": "vision",
        "plugin": "fake",
        "default_checkpoint": "org/toy-ckpt",
        "presets": ["tiny", "big"],
        "tags": [],
        "summary": "toy vision",
    }
    table = cli("list-encoders")
    assert table.exit_code == 0
    for column in ("name", "modality", "plugin", "default", "presets"):
        assert column in table.stdout
    assert "toyvision" in table.stdout and "toyaudio" in table.stdout and "org/toy-ckpt" in table.stdout


def test_list_encoders_filters_by_wildcard_and_modality(cli):
    names = lambda *args: [r["name"] for r in json.loads(cli("list-encoders", *args, "--json").stdout)]  # noqa: E731
    assert names("toy*", "--modality", "audio") == ["toyaudio"]
    assert names("fake:toyv*") == ["toyvision"]
    assert names("nothing-matches*") == []
    assert "no encoders match" in cli("list-encoders", "nothing-matches*").stdout


def test_list_projectors_and_callbacks_include_builtin_and_plugin_items(cli):
    projectors = {r["qualified_name"]: r for r in json.loads(cli("list-projectors", "--json").stdout)}
    assert {"builtin:linear", "builtin:mlp", "builtin:mlpNx_act", "builtin:resampler", "fake:toyproj"} <= set(
        projectors
    )
    assert projectors["builtin:mlpNx_act"]["pattern"] == r"mlp(\d+)x_(\w+)"
    callbacks = json.loads(cli("list-callbacks", "--slot", "postprocess_projector", "--json").stdout)
    # only that slot's: the fake plugin's, and those of installed plugins (whisper's trim_padding)
    assert "fake:toypool" in [c["qualified_name"] for c in callbacks]
    assert all(c["slots"] == ["postprocess_projector"] for c in callbacks)
    table = cli("list-callbacks")
    assert table.exit_code == 0 and "select_feature_layer" in table.stdout and "toypool" in table.stdout
    assert "toyproj" in cli("list-projectors").stdout


def test_list_llms_lists_the_presets(cli):
    rows = {r["name"]: r for r in json.loads(cli("list-llms", "--json").stdout)}
    assert {"tiny", "tiny-qwen2", "llama3-8b", "qwen2-0.5b", "qwen2-7b", "mistral-7b", "vicuna-7b"} <= set(
        rows
    )
    assert rows["tiny"]["tokenizer"] == "tiny" and rows["llama3-8b"]["tokenizer"] is None
    assert "llama3-8b" in cli("list-llms").stdout


@pytest.mark.parametrize(
    "name, params",
    # Published parameter counts of the released models these presets copy.
    [
        ("llama3-8b", 8_030_261_248),
        ("qwen2-0.5b", 494_032_768),
        ("qwen2-7b", 7_615_616_512),
        ("mistral-7b", 7_241_732_096),
        ("vicuna-7b", 6_738_415_616),
    ],
)
def test_llm_presets_have_the_released_models_parameter_counts(name, params):
    import torch
    from transformers import AutoModelForCausalLM

    from mmcore.presets import get_llm_preset

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(get_llm_preset(name).build_config())
    assert sum(p.numel() for p in model.parameters()) == params


def test_listing_imports_no_torch_transformers_or_timm():
    code = textwrap.dedent(f"""
        import io, json, sys
        from contextlib import redirect_stdout
        from mmcore.cli.app import main
        outputs = {{}}
        for args in (["list-encoders", "--json"], ["list-projectors", "--json"], ["list-callbacks", "--json"],
                     ["plugins", "--all", "--json"], ["list-llms", "--json"], ["list-encoders"], ["--help"]):
            buffer = io.StringIO()
            with redirect_stdout(buffer):
                try:
                    main(args)
                except SystemExit as exc:
                    assert exc.code in (0, None), (args, exc.code)
            outputs[" ".join(args)] = buffer.getvalue()
        json.loads(outputs["list-encoders --json"])
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
