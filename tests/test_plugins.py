"""Plugin system: hook specs, registry, entry-point discovery, isolation, environment, no-torch listing.

Fake distributions are written into a temp dir (a module plus ``<dist>.dist-info`` with METADATA and
entry_points.txt) and put on ``sys.path``, so `importlib.metadata` finds them as if installed.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmcore import hookspecs, plugins
from mmcore.errors import (
    AmbiguousNameError,
    FactoryImportError,
    InvalidSpecError,
    PluginError,
    PluginWarning,
    UnknownNameError,
)
from mmcore.registry import CallbackSpec, EncoderSpec, ProjectorSpec, Registry, load_factory
from mmcore.testing import registered_plugin
from mmcore.testing.suite import HEAVY_MODULES as HEAVY

GOOD = """
from mmcore import hookimpl
from mmcore.registry import CallbackSpec, EncoderSpec, ProjectorSpec

MMCORE_PLUGIN_API = 1

@hookimpl
def register_encoders(register):
    register(EncoderSpec(name="eva02-tiny", modality="vision", summary="tiny EVA02", factory="{mod}:build",
                         presets=("tiny",), tags=("timm",)))
    register(name="eva02-base", modality="vision", summary="EVA02 base", factory="{mod}:build")
    register(EncoderSpec(name="beep", modality="audio", summary="beeps", factory="{mod}:build"))

@hookimpl
def register_projectors(register):
    register(ProjectorSpec(name="qformer", summary="Q-Former", factory="{mod}:build"))

@hookimpl
def register_callbacks(register):
    register(CallbackSpec(name="pool", slots=("postprocess_projector",), summary="mean-pool", factory="{mod}:build"))
"""

ENCODER_ONLY = """
from mmcore import hookimpl
from mmcore.registry import EncoderSpec

@hookimpl
def register_encoders(register):
    register(EncoderSpec(name="{enc}", modality="vision", summary="s", factory="{mod}:build"))
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """Install fake plugin distributions: ``site.add(plugin_name, source)``; returns the module name."""
    for var in ("MMCORE_LOAD_PLUGINS", "MMCORE_DISABLE_PLUGINS", "MMCORE_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))  # also invalidates importlib's caches
    added: list[str] = []

    class Site:
        path = tmp_path

        def add(self, name: str, source: str, api: str | None = None, version: str = "1.0") -> str:
            module = f"mmcore_plugin_{name}_{abs(hash(str(tmp_path))) % 10**8}"
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source).replace("{mod}", module))
            dist = f"mmcore-plugin-{name}"
            info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
            (info / "entry_points.txt").write_text(f"[mmcore]\n{name} = {module}\n")
            added.append(module)
            plugins.reset()
            return module

    plugins.reset()
    yield Site()
    for module in added:
        sys.modules.pop(module, None)
    plugins.reset()


def status(name: str) -> plugins.PluginStatus:
    return {s.name: s for s in plugins.plugin_statuses()}[name]


# --- hook specs -------------------------------------------------------------------------------------

HOOKS = sorted(n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "mmcore_spec"))
# hook -> the test that exercises it through a real plugin
HOOK_TESTS = {
    "register_encoders": "test_good_plugin_is_loaded_with_its_status",
    "register_projectors": "test_good_plugin_is_loaded_with_its_status",
    "register_callbacks": "test_good_plugin_is_loaded_with_its_status",
    "register_commands": "test_register_commands_adds_plugin_commands_and_isolates_a_failing_one",
}


def test_every_hook_is_documented_and_has_a_test():
    assert HOOKS == ["register_callbacks", "register_commands", "register_encoders", "register_projectors"]
    for hook in HOOKS:
        assert len((getattr(hookspecs, hook).__doc__ or "").strip()) > 40, hook
        assert callable(globals()[HOOK_TESTS[hook]]), hook
    assert isinstance(hookspecs.PLUGIN_API_VERSION, int)


def test_mmcore_hookimpl_resolves_lazily_without_heavy_imports():
    code = "import mmcore, sys\nassert mmcore.hookimpl is __import__('mmcore.hookspecs').hookspecs.hookimpl\n"
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


# --- specs and registry -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: EncoderSpec(name="bad name", modality="v", summary="s", factory="a:b"), "name"),
        (lambda: EncoderSpec(name="a:b", modality="v", summary="s", factory="a:b"), "name"),
        (lambda: EncoderSpec(name="clip", modality="v", summary="s", factory="a.b"), "factory"),
        (lambda: EncoderSpec(name="clip", modality="", summary="s", factory="a:b"), "modality"),
        (lambda: EncoderSpec(name="clip", modality="v", summary="s", factory="a:b", presets=["x"]), "presets"),
        (lambda: ProjectorSpec(name="p", summary="s", factory="a:b", pattern="("), "pattern"),
        (lambda: CallbackSpec(name="c", slots=("middle",), summary="s", factory="a:b"), "slots"),
        (lambda: CallbackSpec(name="c", slots=(), summary="s", factory="a:b"), "slots"),
    ],
)
def test_specs_are_validated_at_construction(make, needle):
    with pytest.raises(InvalidSpecError, match=needle):
        make()


def test_valid_specs_accept_identifier_like_names():
    spec = EncoderSpec(name="eva02-base", modality="vision", summary="s", factory="pkg.mod:Cls.build")
    assert spec.name == "eva02-base" and spec.plugin is None


def test_load_factory_imports_only_when_called(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "lazy_factory_mod.py").write_text("def build():\n    return 'built'\n")
    spec = Registry().add("p", EncoderSpec(name="e", modality="v", summary="s", factory="lazy_factory_mod:build"))
    assert "lazy_factory_mod" not in sys.modules
    try:
        assert load_factory(spec)() == "built"
    finally:
        sys.modules.pop("lazy_factory_mod", None)
    missing = EncoderSpec(name="e", modality="v", summary="s", factory="no_such_mod_xyz:build", plugin="p")
    with pytest.raises(FactoryImportError, match="p:e.*no_such_mod_xyz"):
        load_factory(missing)


def _registry_with_clash() -> Registry:
    reg = Registry()
    for plugin in ("alpha", "beta"):
        reg.add(plugin, EncoderSpec(name="clip", modality="vision", summary="s", factory="m:f"))
    reg.add("alpha", EncoderSpec(name="eva02-base", modality="vision", summary="s", factory="m:f"))
    reg.add("beta", EncoderSpec(name="whisper", modality="audio", summary="s", factory="m:f"))
    return reg


def test_plugin_colon_name_always_resolves_and_records_the_plugin():
    reg = _registry_with_clash()
    assert reg.get_encoder("alpha:clip").plugin == "alpha"
    assert reg.get_encoder("beta:clip").plugin == "beta"
    assert reg.get_encoder("whisper").qualified_name == "beta:whisper"


def test_clash_is_recorded_and_ambiguous_bare_name_names_both_plugins():
    reg = _registry_with_clash()
    assert [str(c) for c in reg.clashes()] == [
        "encoder 'clip' is registered by plugins alpha, beta; use 'alpha:clip' or 'beta:clip'"
    ]
    with pytest.raises(AmbiguousNameError, match="alpha.*beta"):
        reg.get_encoder("clip")
    assert len(reg.list_encoders("clip")) == 2  # neither overwritten


def test_same_plugin_registering_a_name_twice_is_invalid():
    reg = Registry()
    reg.add("p", EncoderSpec(name="clip", modality="vision", summary="s", factory="m:f"))
    with pytest.raises(InvalidSpecError, match="twice"):
        reg.add("p", EncoderSpec(name="clip", modality="vision", summary="s", factory="m:f"))


def test_unknown_name_suggests_close_matches():
    reg = _registry_with_clash()
    with pytest.raises(UnknownNameError, match="did you mean 'whisper'"):
        reg.get_encoder("wisper")
    with pytest.raises(UnknownNameError, match="unknown encoder 'zzz'.*registered: clip, eva02-base, whisper"):
        reg.get_encoder("zzz")
    with pytest.raises(UnknownNameError, match="did you mean 'alpha:clip'"):
        reg.get_encoder("alpha:clipp")


def test_list_encoders_filters_by_wildcard_and_modality():
    reg = _registry_with_clash()
    assert [s.qualified_name for s in reg.list_encoders("eva02*")] == ["alpha:eva02-base"]
    assert [s.name for s in reg.list_encoders(modality="audio")] == ["whisper"]
    assert [s.qualified_name for s in reg.list_encoders("beta:*")] == ["beta:clip", "beta:whisper"]
    assert len(reg.list_encoders()) == 4


def test_projector_pattern_matches_a_family_and_an_exact_name_wins():
    reg = Registry()
    reg.add("builtin", ProjectorSpec(name="mlpNx_act", summary="s", factory="m:f", pattern=r"mlp(\d+)x_(\w+)"))
    reg.add("other", ProjectorSpec(name="mlp2x_gelu", summary="s", factory="m:g"))
    assert reg.get_projector("mlp3x_silu").name == "mlpNx_act"
    assert reg.get_projector("mlp2x_gelu").plugin == "other"
    assert reg.get_projector("builtin:mlp2x_gelu").name == "mlpNx_act"


# --- built-in plugin --------------------------------------------------------------------------------


def test_builtin_projectors_and_callbacks_are_an_ordinary_plugin(site):
    from mmcore.builtin.anyres import AnyResFlatten, AnyResPack
    from mmcore.builtin.callbacks import DropPrefixTokens, SelectFeatureLayer
    from mmcore.modeling.projector import MultimodalProjector, MultimodalProjectorConfig

    reg = plugins.get_registry()
    assert status("builtin").state == "loaded"
    builtin_projectors = [s.name for s in reg.list_projectors() if s.plugin == "builtin"]  # plugins add theirs
    assert builtin_projectors == ["linear", "mlp", "mlpNx_act", "resampler"]
    from mmcore.builtin.mrope import MRope
    from mmcore.builtin.qwen2_audio import Qwen2AudioPaddingMask, Qwen2AudioTrim
    from mmcore.builtin.video import VideoFrames, VideoPool

    builtin_callbacks = {
        cls.name: cls
        for cls in (SelectFeatureLayer, DropPrefixTokens, AnyResFlatten, AnyResPack, Qwen2AudioPaddingMask, Qwen2AudioTrim,
                    VideoFrames, VideoPool, MRope)
    }  # fmt: skip
    assert {s.name for s in reg.list_callbacks() if s.plugin == "builtin"} == set(builtin_callbacks)
    for name, cls in builtin_callbacks.items():
        assert load_factory(reg.get_callback(f"builtin:{name}")) is cls
        assert reg.get_callback(name).slots == (cls.slot,)
    spec = reg.get_projector("mlp2x_gelu")
    assert spec.qualified_name == "builtin:mlpNx_act" and load_factory(spec) is MultimodalProjector
    config = MultimodalProjectorConfig(projector_type="mlp2x_gelu", in_features=4, out_features=6)
    assert load_factory(spec)(config).config.out_features == 6


# --- discovery and isolation ------------------------------------------------------------------------


def test_good_plugin_is_loaded_with_its_status(site):
    module = site.add("good", GOOD, version="2.3")
    reg = plugins.get_registry()
    st = status("good")
    assert (st.state, st.reason, st.distribution, st.version, st.module) == (
        "loaded", "", "mmcore-plugin-good", "2.3", module
    )  # fmt: skip
    assert st.hooks == ("register_callbacks", "register_encoders", "register_projectors")
    assert st.registered == {"encoder": ("beep", "eva02-base", "eva02-tiny"), "projector": ("qformer",),
                             "callback": ("pool",)}  # fmt: skip
    assert st.load_time_s >= 0
    assert reg.get_encoder("eva02-tiny").presets == ("tiny",)
    assert [s.name for s in reg.list_encoders("good:eva02*")] == ["eva02-base", "eva02-tiny"]
    assert reg.get_projector("good:qformer").factory == f"{module}:build"
    assert reg.get_callback("pool").slots == ("postprocess_projector",)


def test_plugin_failing_at_import_is_set_aside_and_others_load(site):
    site.add("broken", "import no_such_dependency_xyz\n")
    site.add("good", GOOD)
    with pytest.warns(PluginWarning, match="'broken' failed: import of .* ModuleNotFoundError.*no_such_dependency_xyz"):
        reg = plugins.get_registry()
    assert status("broken").state == "failed" and "no_such_dependency_xyz" in status("broken").reason
    assert status("good").state == "loaded" and reg.get_encoder("beep").plugin == "good"


def test_plugin_raising_in_a_hook_is_set_aside_with_nothing_registered(site):
    site.add("raiser", """
        from mmcore import hookimpl
        from mmcore.registry import EncoderSpec

        @hookimpl
        def register_encoders(register):
            register(EncoderSpec(name="half", modality="vision", summary="s", factory="m:f"))
            raise RuntimeError("boom")
        """)  # fmt: skip
    site.add("good", GOOD)
    with pytest.warns(PluginWarning, match="'raiser' failed: register_encoders raised RuntimeError: boom"):
        reg = plugins.get_registry()
    assert status("raiser").state == "failed"
    with pytest.raises(UnknownNameError):
        reg.get_encoder("half")  # a set-aside plugin leaves nothing behind
    assert not plugins.get_plugin_manager().has_plugin("raiser")
    assert status("good").state == "loaded"


def test_plugin_with_misspelled_hook_is_set_aside(site):
    site.add("typo", """
        from mmcore import hookimpl

        @hookimpl
        def register_encoder(register):
            pass
        """)  # fmt: skip
    site.add("good", GOOD)
    with pytest.warns(PluginWarning, match="'typo' failed: implements a hook mmcore does not define.*register_encoder"):
        plugins.get_registry()
    assert status("typo").state == "failed"
    assert status("good").state == "loaded"


@pytest.mark.parametrize(
    "body, needle",
    [
        ('register(EncoderSpec(name="bad name", modality="v", summary="s", factory="m:f"))', "name must be"),
        ('register(name="x", modality="v", summary="s", factory="m:f", colour="red")', "colour"),
        ('register(ProjectorSpec(name="p", summary="s", factory="m:f"))', "expects EncoderSpec"),
        ('register(EncoderSpec(name="x", modality="v", summary="s", factory="m:f"))\n'
         '    register(EncoderSpec(name="x", modality="v", summary="s", factory="m:f"))', "twice"),
        ('try:\n        register("nonsense")\n    except Exception:\n        pass', "expects EncoderSpec"),
    ],
)
def test_plugin_registering_something_invalid_is_set_aside(site, body, needle):
    site.add("invalid", f"""
from mmcore import hookimpl
from mmcore.registry import EncoderSpec, ProjectorSpec

@hookimpl
def register_encoders(register):
    {body}
""")  # fmt: skip
    with pytest.warns(PluginWarning, match="'invalid' failed: register_encoders registered an invalid item"):
        plugins.get_registry()
    assert status("invalid").state == "failed" and needle in status("invalid").reason


def test_incompatible_plugin_says_which_api_it_needs_and_which_mmcore_provides(site):
    site.add("future", "MMCORE_PLUGIN_API = (2, 3)\n" + ENCODER_ONLY.replace("{enc}", "future-enc"))
    site.add("ranged", "MMCORE_PLUGIN_API = (1, 4)\n" + ENCODER_ONLY.replace("{enc}", "ranged-enc"))
    with pytest.warns(PluginWarning, match="'future' incompatible"):
        reg = plugins.get_registry()
    st = status("future")
    assert st.state == "incompatible"
    assert "plugin API 2 to 3" in st.reason and f"provides plugin API {hookspecs.PLUGIN_API_VERSION}" in st.reason
    assert status("ranged").state == "loaded" and reg.get_encoder("ranged-enc")


def test_two_plugins_registering_one_name_clash_and_both_stay_reachable(site):
    # a name no real plugin registers (mmcore-plugin-clip may be installed)
    site.add("first", ENCODER_ONLY.replace("{enc}", "toyenc"))
    site.add("second", ENCODER_ONLY.replace("{enc}", "toyenc"))
    with pytest.warns(PluginWarning, match="clash: encoder 'toyenc' is registered by plugins first, second"):
        reg = plugins.get_registry()
    with pytest.raises(AmbiguousNameError, match="first:toyenc or second:toyenc"):
        reg.get_encoder("toyenc")
    assert reg.get_encoder("second:toyenc").plugin == "second"
    assert status("first").state == status("second").state == "loaded"


# --- environment ------------------------------------------------------------------------------------


def test_load_plugins_env_loads_only_those_and_imports_no_other(site, monkeypatch):
    skipped = site.add("skipped", GOOD)
    site.add("chosen", ENCODER_ONLY.replace("{enc}", "chosen-enc"))
    monkeypatch.setenv("MMCORE_LOAD_PLUGINS", "chosen, nonexistent")
    reg = plugins.get_registry()
    assert status("chosen").state == "loaded" and reg.get_encoder("chosen-enc")
    assert (status("skipped").state, status("skipped").reason) == ("disabled", "not listed in MMCORE_LOAD_PLUGINS")
    assert skipped not in sys.modules


def test_empty_load_plugins_env_is_a_safe_mode_with_builtin_only(site, monkeypatch):
    site.add("good", GOOD)
    monkeypatch.setenv("MMCORE_LOAD_PLUGINS", "")
    reg = plugins.get_registry()
    assert [s.name for s in plugins.plugin_statuses() if s.state == "loaded"] == ["builtin"]
    assert reg.list_encoders() == [] and reg.get_projector("mlp").plugin == "builtin"


def test_disable_plugins_env_blocks_the_named_plugins(site, monkeypatch):
    site.add("good", GOOD)
    site.add("other", ENCODER_ONLY.replace("{enc}", "other-enc"))
    monkeypatch.setenv("MMCORE_DISABLE_PLUGINS", "good")
    reg = plugins.get_registry()
    assert (status("good").state, status("good").reason) == ("disabled", "listed in MMCORE_DISABLE_PLUGINS")
    assert status("other").state == "loaded"
    with pytest.raises(UnknownNameError):
        reg.get_encoder("beep")


def test_strict_env_raises_instead_of_warning(site, monkeypatch):
    site.add("broken", "raise ImportError('nope')\n")
    monkeypatch.setenv("MMCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'broken' failed.*nope"):
        plugins.get_registry()


def test_strict_env_raises_on_a_clash(site, monkeypatch):
    site.add("first", ENCODER_ONLY.replace("{enc}", "clip"))
    site.add("second", ENCODER_ONLY.replace("{enc}", "clip"))
    monkeypatch.setenv("MMCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="clash"):
        plugins.get_registry()


# --- register_commands and the testing helper -------------------------------------------------------


def test_register_commands_adds_plugin_commands_and_isolates_a_failing_one(site):
    import typer

    site.add("cmds", """
        from mmcore import hookimpl

        @hookimpl
        def register_commands(app):
            @app.command(name="hello")
            def hello():
                print("hi")
        """)  # fmt: skip
    site.add("badcmds", """
        from mmcore import hookimpl

        @hookimpl
        def register_commands(app):
            raise ValueError("no commands today")
        """)  # fmt: skip
    app = typer.Typer()
    with pytest.warns(PluginWarning, match="'badcmds' failed: register_commands raised ValueError"):
        plugins.register_commands(app)
    assert [c.name for c in app.registered_commands] == ["hello"]
    assert status("cmds").hooks == ("register_commands",)


def test_registered_plugin_registers_temporarily():
    from mmcore import hookimpl

    class Toy:
        @hookimpl
        def register_encoders(self, register):
            register(EncoderSpec(name="toy", modality="vision", summary="s", factory="m:f"))

    with registered_plugin(Toy(), name="toyplug") as reg:
        assert reg is plugins.get_registry()
        assert reg.get_encoder("toy").qualified_name == "toyplug:toy"
        assert status("toyplug").state == "loaded"
    with pytest.raises(UnknownNameError):
        plugins.get_registry().get_encoder("toy")
    assert "toyplug" not in {s.name for s in plugins.plugin_statuses()}


def test_registered_plugin_goes_through_isolation():
    from mmcore import hookimpl

    class Broken:
        @hookimpl
        def register_callbacks(self, register):
            raise KeyError("x")

    with pytest.warns(PluginWarning, match="'broken' failed"), registered_plugin(Broken(), name="broken"):
        assert status("broken").state == "failed"


# --- cost -------------------------------------------------------------------------------------------


def test_listing_encoders_from_a_plugin_imports_no_torch_transformers_or_timm(site):
    site.add("good", GOOD)
    code = textwrap.dedent(f"""
        import json, sys
        from mmcore.plugins import get_registry, plugin_statuses
        reg = get_registry()
        print(json.dumps({{
            "encoders": [s.qualified_name for s in reg.list_encoders()],
            "projectors": [s.name for s in reg.list_projectors()],
            "states": {{s.name: s.state for s in plugin_statuses()}},
            "heavy": sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}),
        }}))
        """)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site.path), str(Path.cwd())])}
    for var in ("MMCORE_LOAD_PLUGINS", "MMCORE_DISABLE_PLUGINS", "MMCORE_STRICT_PLUGINS"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout)
    assert result["states"]["good"] == "loaded"
    assert {"good:beep", "good:eva02-base", "good:eva02-tiny"} <= set(result["encoders"])
    assert "mlp" in result["projectors"]
    assert result["heavy"] == []
