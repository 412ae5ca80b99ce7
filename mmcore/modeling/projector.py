"""Projectors: map an encoder's features into the language model's embedding space.

`MultimodalProjector` is a small HF `PreTrainedModel` (own config, own save/load). It either wraps a
module the user brings, or builds one by name:

- ``linear``: one Linear.
- ``mlp``: Linear, activation, Linear (the activation is any key of ``ACT2CLS``).
- ``mlp<N>x_<act>``: LLaVA's grammar, e.g. ``mlp2x_gelu`` = Linear, GELU, Linear; ``mlp3x_silu``.
- ``resampler``: MiniCPM-V / Qwen-VL style: learnable queries cross-attend over the encoder tokens
  (with a 2D sin-cos position embedding) and always return ``num_queries`` tokens.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2CLS, ACT2FN

from mmcore.errors import ConfigError

BUILTIN_TYPES = ("linear", "mlp", "resampler")
_MLP_GRAMMAR = re.compile(r"^mlp(\d+)x_(\w+)$")
CUSTOM = "custom"


class MultimodalProjectorConfig(PreTrainedConfig):
    r"""Configuration of a `MultimodalProjector`.

    Args:
        projector_type: ``linear`` | ``mlp`` | ``mlp<N>x_<act>`` | ``resampler`` | ``custom`` (a user module).
        in_features: width of the encoder features.
        out_features: width of the language model's embeddings.
        activation: activation of ``mlp`` (any key of ``transformers.activations.ACT2CLS``).
        bias: whether the Linear layers have a bias.
        num_queries: number of output tokens of the ``resampler``.
        num_heads: attention heads of the ``resampler`` (default: ``max(1, out_features // 128)``).

    Cornstarch's form is accepted too: ``MultimodalProjectorConfig(encoder_config=..., text_config=...,
    projection_type="mlp", activation="gelu")`` takes the widths from the two configs (the encoder's
    ``hidden_size`` / ``d_model``, the language model's ``hidden_size``) and the type from
    ``projection_type``. An argument this config does not know is a `ConfigError`, never ignored.
    """

    model_type = "mmcore_projector"
    attribute_map = {"projection_type": "projector_type"}  # Cornstarch's name

    projector_type: str = "mlp"
    in_features: int | None = None
    out_features: int | None = None
    activation: str = "gelu"
    bias: bool = True
    num_queries: int = 64
    num_heads: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self, encoder_config=None, text_config=None, projection_type=None, **kwargs):
        if projection_type is not None:
            if self.projector_type not in ("mlp", projection_type):  # "mlp": the field's default
                raise ConfigError(
                    f"projector_type={self.projector_type!r} and projection_type={projection_type!r} disagree; pass one"
                )
            self.projector_type = projection_type
        if encoder_config is not None:
            self.in_features = _config_width("in_features", encoder_config, self.in_features, "encoder_config")
        if text_config is not None:
            text_config = text_config.get_text_config() if hasattr(text_config, "get_text_config") else text_config
            self.out_features = _config_width("out_features", text_config, self.out_features, "text_config")
        unknown = sorted(k for k in kwargs if k not in _KNOWN_CONFIG_KWARGS and not k.startswith("_"))
        if unknown:
            raise ConfigError(
                f"MultimodalProjectorConfig: unknown argument(s) {unknown}; expected projector_type, in_features, "
                "out_features, activation, bias, num_queries, num_heads, initializer_range (or Cornstarch's "
                "encoder_config, text_config, projection_type)"
            )
        super().__post_init__(**kwargs)
        if self.projector_type != CUSTOM:
            parse_projector_type(self.projector_type, self.activation)


# What a saved config.json or HF's loading code may pass besides this config's own fields.
_KNOWN_CONFIG_KWARGS = frozenset(
    {
        "model_type", "torch_dtype", "name_or_path", "output_attentions", "attn_implementation",
        "experts_implementation", "num_labels", "per_layer_config", "use_cache", "tie_word_embeddings",
        "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "max_length",
    }
)  # fmt: skip


def _config_width(field: str, config, given: int | None, name: str) -> int:
    width = next(
        (getattr(config, a) for a in ("hidden_size", "d_model", "embed_dim") if isinstance(getattr(config, a, None), int)),
        None,
    )
    if width is None:
        raise ConfigError(f"MultimodalProjectorConfig: {name} has no hidden_size / d_model to read {field} from")
    if given is not None and given != width:
        raise ConfigError(f"MultimodalProjectorConfig: {field}={given} but {name} says {width}")
    return width


def parse_projector_type(projector_type: str, activation: str = "gelu") -> tuple[str, int, str]:
    """Return ``(kind, depth, activation)`` for a projector type name; raise `ConfigError` if unknown.

    >>> parse_projector_type("mlp3x_silu")
    ('mlp', 3, 'silu')
    """
    match = _MLP_GRAMMAR.match(projector_type)
    if match:
        kind, depth, activation = "mlp", int(match.group(1)), match.group(2)
        if depth < 1:
            raise ConfigError(f"projector type {projector_type!r}: depth must be >= 1, got {depth}")
    elif projector_type == "mlp":
        kind, depth = "mlp", 2
    elif projector_type in ("linear", "resampler"):
        kind, depth = projector_type, 1
    elif registered_projector(projector_type) is not None:
        return "plugin", 1, activation
    else:
        raise ConfigError(
            f"unknown projector type {projector_type!r}; expected one of {', '.join(BUILTIN_TYPES)}, "
            f"'mlp<N>x_<act>' (e.g. 'mlp2x_gelu'), a projector a plugin registers (`mmcore list-projectors`) "
            f"or a module passed as `projection=`"
        )
    if kind == "mlp" and activation not in ACT2CLS:
        raise ConfigError(
            f"unknown activation {activation!r} for projector type {projector_type!r}; "
            f"expected a key of transformers.activations.ACT2CLS such as 'gelu', 'silu', 'relu'"
        )
    return kind, depth, activation


def _mlp(in_features: int, out_features: int, depth: int, activation: str, bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=bias)]
    for _ in range(depth - 1):
        layers += [ACT2FN[activation], nn.Linear(out_features, out_features, bias=bias)]
    return nn.Sequential(*layers)


def sincos_position_embedding(num_positions: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """2D sin-cos position embedding for a square grid of ``num_positions`` tokens, 1D otherwise.

    Shape ``(num_positions, dim)``. As in MAE / MiniCPM-V: half the channels encode the row, half the
    column; each half is ``[sin, cos]`` over geometric frequencies.
    """
    side = math.isqrt(num_positions)
    if side * side == num_positions and dim % 4 == 0:
        coords = torch.arange(side, device=device, dtype=torch.float32)
        rows, cols = torch.meshgrid(coords, coords, indexing="ij")
        emb = torch.cat([_sincos_1d(rows.reshape(-1), dim // 2), _sincos_1d(cols.reshape(-1), dim // 2)], -1)
    else:
        emb = _sincos_1d(torch.arange(num_positions, device=device, dtype=torch.float32), dim)
    return emb.to(dtype) if dtype is not None else emb


def _sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, device=positions.device, dtype=torch.float32) / max(half, 1))
    angles = positions[:, None] * omega[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if emb.shape[-1] < dim:  # odd widths: pad one zero channel
        emb = nn.functional.pad(emb, (0, dim - emb.shape[-1]))
    return emb


class Resampler(nn.Module):
    """Perceiver-style resampler: ``num_queries`` learned queries attend over the encoder tokens.

    Input ``(batch, tokens, in_features)``; output ``(batch, num_queries, out_features)`` for any number
    of input tokens.
    """

    def __init__(self, in_features: int, out_features: int, num_queries: int, num_heads: int):
        super().__init__()
        self.num_queries = num_queries
        self.query = nn.Parameter(torch.empty(num_queries, out_features))
        self.kv_proj = nn.Linear(in_features, out_features, bias=False) if in_features != out_features else None
        self.attn = nn.MultiheadAttention(out_features, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(out_features)
        self.ln_kv = nn.LayerNorm(out_features)
        self.ln_post = nn.LayerNorm(out_features)
        self.proj = nn.Parameter(torch.empty(out_features, out_features))

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.kv_proj is not None:
            features = self.kv_proj(features)
        kv = self.ln_kv(features)
        pos = sincos_position_embedding(kv.shape[1], kv.shape[-1], device=kv.device, dtype=kv.dtype)
        queries = self.ln_q(self.query).unsqueeze(0).expand(kv.shape[0], -1, -1)
        out, _ = self.attn(queries, kv + pos, kv, need_weights=False)
        return self.ln_post(out) @ self.proj


class MultimodalProjector(PreTrainedModel):
    """Maps ``(batch, tokens, in_features)`` encoder features to ``(batch, tokens', out_features)``.

    Example:
        >>> cfg = MultimodalProjectorConfig(projector_type="mlp2x_gelu", in_features=32, out_features=64)
        >>> MultimodalProjector(cfg)(torch.zeros(2, 5, 32)).shape
        torch.Size([2, 5, 64])

    A module of your own: ``MultimodalProjector(MultimodalProjectorConfig(projector_type="custom",
    in_features=..., out_features=...), projection=my_module)``; its weights are kept as given.
    """

    config: MultimodalProjectorConfig
    config_class = MultimodalProjectorConfig
    base_model_prefix = "projector"
    main_input_name = "features"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: MultimodalProjectorConfig, projection: nn.Module | None = None):
        super().__init__(config)
        if projection is not None:
            # The user's module arrives initialised (often pretrained): never re-initialise it.
            for module in projection.modules():
                module._is_hf_initialized = True
            if config.projector_type != CUSTOM:
                config.projector_type = CUSTOM
            self.projection = projection
        else:
            if config.projector_type == CUSTOM:
                raise ConfigError(
                    "projector type 'custom' needs the module itself: MultimodalProjector(config, projection=module)"
                )
            if config.in_features is None or config.out_features is None:
                raise ConfigError(
                    f"projector {config.projector_type!r} needs in_features and out_features, got "
                    f"in_features={config.in_features}, out_features={config.out_features}"
                )
            self.projection = build_projection(config)
        self.gradient_checkpointing = False
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=self.config.initializer_range)
            init.normal_(module.proj, std=module.proj.shape[0] ** -0.5)
        else:
            super()._init_weights(module)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(self.projection.__call__, features)
        return self.projection(features)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """How many tokens one item of ``num_input_tokens`` features becomes after projection: what the
        projection module says (its own ``num_output_tokens``; a resampler's is ``num_queries``), else
        as many as came in."""
        custom = getattr(self.projection, "num_output_tokens", None)
        if callable(custom):
            return int(custom(num_input_tokens))
        return num_input_tokens

    def token_count_rule(self) -> Any:
        """`num_output_tokens` as a light, picklable callable for the processor's data workers (no
        weights kept), or None for the identity. A projection with a fixed count gives `FixedTokens`."""
        if isinstance(self.projection, Resampler):
            return FixedTokens(self.projection.num_queries)
        if callable(getattr(self.projection, "num_output_tokens", None)):
            return self.num_output_tokens
        return None


class FixedTokens:
    """A projector's token count that does not depend on its input (a resampler's ``num_queries``)."""

    def __init__(self, n: int):
        self.n = int(n)

    def __call__(self, num_input_tokens: int) -> int:
        return self.n


def registered_projector(projector_type: str):
    """The `ProjectorSpec` a plugin (other than the built-in one) registered under ``projector_type``
    (``name`` or ``plugin:name``), or None."""
    from mmcore.errors import MMCoreError
    from mmcore.plugins import get_registry

    try:
        spec = get_registry().get_projector(projector_type)
    except MMCoreError:
        return None
    return None if spec.plugin == "builtin" else spec


def build_projection(config: MultimodalProjectorConfig) -> nn.Module:
    kind, depth, activation = parse_projector_type(config.projector_type, config.activation)
    if kind == "plugin":
        # A plugin's projector: its factory takes this config and returns the module.
        from mmcore.registry import load_factory

        spec = registered_projector(config.projector_type)
        # recorded qualified, as encoders and callbacks are: a later plugin registering the same bare
        # name cannot make this model ambiguous (a bare name saved earlier still loads while unique)
        config.projector_type = spec.qualified_name
        return load_factory(spec)(config)
    if kind == "linear":
        return nn.Linear(config.in_features, config.out_features, bias=config.bias)
    if kind == "mlp":
        return _mlp(config.in_features, config.out_features, depth, activation, config.bias)
    num_heads = config.num_heads or max(1, config.out_features // 128)
    if config.out_features % num_heads:
        raise ConfigError(
            f"resampler: out_features ({config.out_features}) must be divisible by num_heads ({num_heads})"
        )
    if config.num_queries < 1:
        raise ConfigError(f"resampler: num_queries must be >= 1, got {config.num_queries}")
    return Resampler(config.in_features, config.out_features, config.num_queries, num_heads)


def projector_widths(projector: nn.Module) -> tuple[int | None, int | None]:
    """Best-effort (in, out) widths of any projector module, for width checks; None where unknown."""
    if isinstance(projector, MultimodalProjector):
        return projector.config.in_features, projector.config.out_features
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    if isinstance(projector, nn.Linear):
        return projector.in_features, projector.out_features
    if linears:
        return linears[0].in_features, linears[-1].out_features
    return None, None
