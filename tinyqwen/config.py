"""The model config: every number that shapes a Qwen3 network, read from an official `config.json`.

A Hugging Face checkpoint directory carries a `config.json` such as Qwen3-0.6B's:

    {"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
     "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072, "rope_theta": 1000000,
     "rope_scaling": null, "tie_word_embeddings": true, "vocab_size": 151936, ...}

Two things surprise newcomers:
- `head_dim` is its own number: 16 heads x 128 = 2048 != hidden_size 1024. Qwen3 never derives it from
  hidden_size / num_attention_heads (we only fall back to that when the key is absent, as transformers does).
- The MoE models (`model_type: "qwen3_moe"`) add `num_experts`, `num_experts_per_tok` (top-k),
  `moe_intermediate_size`, `norm_topk_prob`, and choose which layers are sparse with `decoder_sparse_step` and
  `mlp_only_layers`.

transformers 5 re-saves configs in a newer spelling (`rope_parameters` holding `rope_theta` and the scaling, and
`num_local_experts` for `num_experts`); `config_from_dict` accepts both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyqwen.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")
SUPPORTED_ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (see `tinyqwen.rope.yarn_inv_freq`). `None` fields take transformers' defaults there."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class Qwen3Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    # MoE (qwen3_moe only; zero experts means a dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # tinyqwen-only, for ablations (chapter 14 trains a model without it): False skips QK-Norm. Absent from every
    # official config.json, where it is always on; transformers ignores the key and would apply QK-Norm anyway.
    qk_norm: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Which layers route through experts — the rule transformers' Qwen3-MoE decoder layer uses.

        >>> cfg = Qwen3Config(model_type="qwen3_moe", vocab_size=8, hidden_size=4, intermediate_size=8,
        ...     num_hidden_layers=4, num_attention_heads=1, num_key_value_heads=1, head_dim=4, rms_norm_eps=1e-6,
        ...     rope_theta=1e4, max_position_embeddings=16, tie_word_embeddings=True, num_experts=4,
        ...     num_experts_per_tok=2, moe_intermediate_size=2, decoder_sparse_step=2, mlp_only_layers=(3,))
        >>> [cfg.is_moe_layer(i) for i in range(4)]
        [False, True, False, False]
        """
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


def _get(d: dict, key: str, kind: type | tuple[type, ...], source: str, default: Any = ...) -> Any:
    """Read one key with a type check; a missing required key or a wrong type is a ConfigError naming it."""
    if key not in d or d[key] is None:
        if default is ...:
            raise ConfigError(f"{source}: required key {key!r} is missing")
        return default
    value = d[key]
    # bool is a subclass of int: refuse `true` where a number is needed, and numbers where a bool is needed
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{source}: key {key!r} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{source}: key {key!r} must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _positive(value: int, key: str, source: str) -> int:
    if value <= 0:
        raise ConfigError(f"{source}: key {key!r} must be positive, got {value}")
    return value


def _rope_from_dict(d: dict, source: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and the optional YaRN scaling, from either spelling.

    transformers <= 4.x (the official Hub files): top-level `rope_theta`, and `rope_scaling` null or
    `{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}` (older files say `type`).
    transformers 5: `rope_parameters = {"rope_type": "default" | "yarn", "rope_theta": ..., ...}`.
    """
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: 'rope_parameters' must be an object, got {params!r}")
    scaling = d.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{source}: 'rope_scaling' must be null or an object, got {scaling!r}")
    if params and "rope_theta" in params:
        theta = params["rope_theta"]
    else:
        theta = d.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 1:
        raise ConfigError(f"{source}: rope_theta must be a number > 1, got {theta!r}")
    # transformers 5 keeps the YaRN keys inside rope_parameters; 4.x inside rope_scaling
    spec = scaling if scaling else params
    if not spec:
        return float(theta), None
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return float(theta), None
    factor = spec.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise ConfigError(f"{source}: YaRN needs a numeric 'factor' >= 1 in rope_scaling, got {factor!r}")
    # transformers: original_max_position_embeddings falls back to max_position_embeddings
    original = spec.get("original_max_position_embeddings") or d.get("max_position_embeddings")
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise ConfigError(
            f"{source}: YaRN needs a positive 'original_max_position_embeddings', got {original!r}"
        )
    return float(theta), RopeScaling(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(spec.get("beta_fast") or 32.0),
        beta_slow=float(spec.get("beta_slow") or 1.0),
        attention_factor=spec.get("attention_factor"),
        mscale=spec.get("mscale"),
        mscale_all_dim=spec.get("mscale_all_dim"),
        truncate=bool(spec.get("truncate", True)),
    )


def config_from_dict(d: dict, source: str = "config.json") -> Qwen3Config:
    """Validate a parsed config.json and turn it into a `Qwen3Config`. `source` names the file in errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(tinyqwen reads {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    # Qwen3 ships sliding_window as a number but switches it off with use_sliding_window: false
    if d.get("use_sliding_window"):
        raise ConfigError(
            f"{source}: use_sliding_window=true is not supported (official Qwen3 configs use false)"
        )
    layer_types = d.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ConfigError(
            f"{source}: layer_types other than 'full_attention' (sliding window) are not supported"
        )
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(
            f"{source}: hidden_act {d.get('hidden_act')!r} is not supported (Qwen3 uses 'silu')"
        )

    n = {}
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
    ):
        n[key] = _positive(_get(d, key, int, source), key, source)
    n_kv = _positive(
        _get(d, "num_key_value_heads", int, source, n["num_attention_heads"]), "num_key_value_heads", source
    )
    if n["num_attention_heads"] % n_kv:
        raise ConfigError(
            f"{source}: num_attention_heads ({n['num_attention_heads']}) must be a multiple of "
            f"num_key_value_heads ({n_kv}) for grouped-query attention"
        )
    head_dim = _get(d, "head_dim", int, source, n["hidden_size"] // n["num_attention_heads"])
    _positive(head_dim, "head_dim", source)
    if head_dim % 2:
        raise ConfigError(f"{source}: head_dim must be even for rotary embeddings, got {head_dim}")
    eps = _get(d, "rms_norm_eps", (int, float), source, 1e-6)
    theta, scaling = _rope_from_dict(d, source)

    moe: dict[str, Any] = {}
    if model_type == "qwen3_moe":
        # transformers 5 may spell num_experts as num_local_experts
        n_exp = d.get("num_experts", d.get("num_local_experts"))
        if n_exp is None:
            raise ConfigError(f"{source}: qwen3_moe config needs 'num_experts' (or 'num_local_experts')")
        moe["num_experts"] = _positive(
            _get({"num_experts": n_exp}, "num_experts", int, source), "num_experts", source
        )
        moe["num_experts_per_tok"] = _positive(
            _get(d, "num_experts_per_tok", int, source), "num_experts_per_tok", source
        )
        if moe["num_experts_per_tok"] > moe["num_experts"]:
            raise ConfigError(
                f"{source}: num_experts_per_tok ({moe['num_experts_per_tok']}) exceeds num_experts "
                f"({moe['num_experts']})"
            )
        moe["moe_intermediate_size"] = _positive(
            _get(d, "moe_intermediate_size", int, source), "moe_intermediate_size", source
        )
        moe["norm_topk_prob"] = _get(d, "norm_topk_prob", bool, source, False)
        moe["decoder_sparse_step"] = _positive(
            _get(d, "decoder_sparse_step", int, source, 1), "decoder_sparse_step", source
        )
        mlp_only = _get(d, "mlp_only_layers", list, source, [])
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in mlp_only):
            raise ConfigError(f"{source}: mlp_only_layers must be a list of layer indices, got {mlp_only!r}")
        moe["mlp_only_layers"] = tuple(mlp_only)
        moe["router_aux_loss_coef"] = float(_get(d, "router_aux_loss_coef", (int, float), source, 0.001))

    known = set(Qwen3Config.__dataclass_fields__)
    return Qwen3Config(
        model_type=model_type,
        head_dim=head_dim,
        num_key_value_heads=n_kv,
        rms_norm_eps=float(eps),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=_get(d, "tie_word_embeddings", bool, source, False),
        attention_bias=_get(d, "attention_bias", bool, source, False),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        qk_norm=_get(d, "qk_norm", bool, source, True),
        extra={k: v for k, v in d.items() if k not in known},
        **n,
        **moe,
    )


def load_config(path: str | Path) -> Qwen3Config:
    """Read `config.json` from a checkpoint directory (or the file itself); `~` is expanded."""
    path = Path(path).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no config.json found at {file}")
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    return config_from_dict(d, source=str(file))


def load_generation_config(path: str | Path) -> dict:
    """`generation_config.json` as a dict (sampling defaults and eos ids); `{}` when the file is absent."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return d


# ------------------------------------------------------------------------------------------ the published family
# tinyqwen ships four config.json files in tinyqwen/data/configs/ (a fresh clone needs nothing beside it):
# - Qwen3-0.6B, Qwen3-4B, Qwen3-8B: byte-identical copies of the official Hub files (their sha256 and git blob
#   sha1 match third-party pins of the Hub files; tests/test_config.py checks the sha256);
# - Qwen3-30B-A3B: written from the published values with the official key set, its bytes NOT verified.
CONFIG_DIR = Path(__file__).parent / "data" / "configs"
OFFICIAL_CONFIG_FILES = ("Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B")

# The other four models have no file whose bytes we could verify, so each is its nearest sibling's file with the
# fields that differ. The layer, head and expert counts are those of the Qwen3 model cards and technical report; the
# hidden and FFN sizes match third-party training configs. Evidence that they are right: with them,
# `tinyqwen.model.count_parameters` gives exactly the counts keras-hub lists for its conversions of the official
# weights (KERAS_HUB_PARAMETER_COUNTS below; tests/test_config.py checks all eight). Keys tinyqwen does not read
# (e.g. max_window_layers, in `Qwen3Config.extra`) stay the sibling's.
PUBLISHED_CHANGES: dict[str, tuple[str, dict[str, int]]] = {  # name: (the sibling's file, the fields that differ)
    # 0.6B's depth, heads and tied embedding, twice as wide
    "Qwen3-1.7B": ("Qwen3-0.6B", {"hidden_size": 2048, "intermediate_size": 6144}),
    # 8B's 8 kv heads, head_dim 128 and untied head; wider, deeper, more query heads
    "Qwen3-14B": ("Qwen3-8B", {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                               "intermediate_size": 17408}),
    "Qwen3-32B": ("Qwen3-8B", {"hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 64,
                               "intermediate_size": 25600}),
    # 30B-A3B's 128 experts, top-8, 4 kv heads; wider experts, twice the query heads, almost twice the depth
    "Qwen3-235B-A22B": ("Qwen3-30B-A3B", {"hidden_size": 4096, "num_hidden_layers": 94, "num_attention_heads": 64,
                                          "moe_intermediate_size": 1536, "intermediate_size": 12288}),
}  # fmt: skip
# dense by size, then the two mixtures of experts
FAMILY = ("Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B", "Qwen3-32B", "Qwen3-30B-A3B",
          "Qwen3-235B-A22B")  # fmt: skip

# Parameter counts keras-hub lists for its Qwen3 presets, converted from the official weights
# (keras_hub/src/models/qwen3/qwen3_presets.py and qwen3_moe/qwen3_moe_presets.py): an independent source.
KERAS_HUB_PARAMETER_COUNTS = {
    "Qwen3-0.6B": 596_049_920, "Qwen3-1.7B": 1_720_574_976, "Qwen3-4B": 4_022_468_096,
    "Qwen3-8B": 8_190_735_360, "Qwen3-14B": 14_768_307_200, "Qwen3-32B": 32_762_123_264,
    "Qwen3-30B-A3B": 30_532_122_624, "Qwen3-235B-A22B": 235_093_634_560,
}  # fmt: skip


def published_configs() -> dict[str, Qwen3Config]:
    """The config of every released Qwen3 model, in FAMILY order (dense by size, then MoE), offline.

    Four come straight from the files in CONFIG_DIR; the other four are a sibling's file with the fields of
    PUBLISHED_CHANGES replaced (see the comments above it for where each number comes from and how sure it is).

    >>> family = published_configs()
    >>> list(family) == list(FAMILY)
    True
    >>> c = family["Qwen3-14B"]  # Qwen3-8B's file with hidden size, depth and query heads changed
    >>> c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    (5120, 40, 40, 8, 128)
    >>> m = family["Qwen3-235B-A22B"]  # from Qwen3-30B-A3B's file: the experts and the top-k are inherited
    >>> m.is_moe, m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.tie_word_embeddings
    (True, 128, 8, 1536, False)
    """
    raw = {}
    for name in (*OFFICIAL_CONFIG_FILES, "Qwen3-30B-A3B"):
        raw[name] = json.loads((CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8"))
    for name, (sibling, changes) in PUBLISHED_CHANGES.items():
        raw[name] = raw[sibling] | changes
    return {name: config_from_dict(raw[name], source=name) for name in FAMILY}


# ---------------------------------------------------------------- the checkpoint a config implies


def expected_tensors(config: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name an official checkpoint of this config holds, with its shape."""
    c = config
    h, d = c.hidden_size, c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (c.q_size, h)
        shapes[p + "self_attn.k_proj.weight"] = (c.kv_size, h)
        shapes[p + "self_attn.v_proj.weight"] = (c.kv_size, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, c.q_size)
        shapes[p + "self_attn.q_norm.weight"] = (d,)
        shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if c.is_moe_layer(i):
            f = c.moe_intermediate_size
            shapes[p + "mlp.gate.weight"] = (c.num_experts, h)
            for e in range(c.num_experts):
                shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (f, h)
                shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (f, h)
                shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (h, f)
        else:
            f = c.intermediate_size
            shapes[p + "mlp.gate_proj.weight"] = (f, h)
            shapes[p + "mlp.up_proj.weight"] = (f, h)
            shapes[p + "mlp.down_proj.weight"] = (h, f)
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


def count_parameters(config: Qwen3Config) -> int:
    """Number of parameters (a tied embedding counted once), e.g. ≈ 0.6B for Qwen3-0.6B."""
    return sum(math.prod(s) for s in expected_tensors(config).values())
