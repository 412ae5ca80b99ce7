"""MultimodalProjector: built-in kinds, LLaVA's mlpNx grammar, resampler, user modules, save/load."""

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from mmcore import MultimodalProjector, MultimodalProjectorConfig
from mmcore.errors import ConfigError
from mmcore.modeling.projector import Resampler, parse_projector_type


def make(kind, **kw):
    return MultimodalProjector(MultimodalProjectorConfig(projector_type=kind, in_features=16, out_features=32, **kw))


@pytest.mark.parametrize(
    "kind, linears, act",
    [("linear", 1, None), ("mlp", 2, "gelu"), ("mlp2x_gelu", 2, "gelu"), ("mlp3x_silu", 3, "silu")],
)
def test_mlp_kinds_have_the_layers_their_name_says(kind, linears, act):
    proj = make(kind)
    found = [m for m in proj.modules() if isinstance(m, nn.Linear)]
    assert len(found) == linears
    assert found[0].in_features == 16 and found[-1].out_features == 32
    if act is not None:
        assert sum(isinstance(m, type(ACT2FN[act])) for m in proj.modules()) == linears - 1
    assert proj(torch.randn(2, 5, 16)).shape == (2, 5, 32)


def test_mlp_activation_is_any_act2cls_key():
    proj = make("mlp", activation="quick_gelu")
    assert proj(torch.randn(1, 3, 16)).shape == (1, 3, 32)
    with pytest.raises(ConfigError, match="unknown activation 'nope'"):
        make("mlp", activation="nope")


def test_mlp_grammar_parses_depth_and_activation():
    assert parse_projector_type("mlp4x_relu") == ("mlp", 4, "relu")
    with pytest.raises(ConfigError, match="unknown projector type"):
        parse_projector_type("conv")


@pytest.mark.parametrize("tokens", [1, 7, 16, 50])
def test_resampler_outputs_fixed_number_of_tokens(tokens):
    proj = make("resampler", num_queries=6)
    assert isinstance(proj.projection, Resampler)
    assert proj(torch.randn(3, tokens, 16)).shape == (3, 6, 32)
    assert proj.num_output_tokens(tokens) == 6


def test_resampler_uses_position_embedding():
    """Permuting the encoder tokens changes the output: positions matter."""
    torch.manual_seed(0)
    proj = make("resampler", num_queries=4).eval()
    x = torch.randn(1, 16, 16)
    perm = torch.randperm(16)
    assert not torch.allclose(proj(x), proj(x[:, perm]))


def test_resampler_heads_must_divide_width():
    with pytest.raises(ConfigError, match="divisible"):
        make("resampler", num_heads=5)


def test_wraps_user_module_without_reinitialising_it():
    module = nn.Linear(16, 32)
    torch.nn.init.constant_(module.weight, 0.5)
    proj = MultimodalProjector(MultimodalProjectorConfig(in_features=16, out_features=32), projection=module)
    assert proj.projection is module
    assert torch.all(module.weight == 0.5)
    assert proj.config.projector_type == "custom"


@pytest.mark.parametrize("kind", ["linear", "mlp3x_silu", "resampler"])
def test_save_load_round_trip_is_bit_exact(kind, tmp_path):
    proj = make(kind).eval()
    proj.save_pretrained(tmp_path / "p")
    back = MultimodalProjector.from_pretrained(tmp_path / "p").eval()
    assert back.config.projector_type == kind
    x = torch.randn(2, 9, 16)
    assert torch.equal(proj(x), back(x))


def test_missing_widths_is_a_clear_error():
    with pytest.raises(ConfigError, match="in_features and out_features"):
        MultimodalProjector(MultimodalProjectorConfig(projector_type="mlp"))
