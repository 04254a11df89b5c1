"""Model configuration: frozen, validated dataclasses and the one loader that builds them.

Three input forms all end in the same `ModelConfig`:
  (a) homogeneous flat flags, as the seed README names them:
        ModelConfig.from_dict({"n_layer": 6, "attn": "gqa", "n_head": 8, "n_kv_heads": 2, ...})
  (b) heterogeneous stacks: a list of per-layer dicts (seed JSONL format, one layer per line)
        ModelConfig.from_dict({"n_embd": 256, "layers": [{...}, {...}]})
        ModelConfig.from_layer_file("configs/hetero.jsonl", n_embd=256, block_size=256)
  (c) the resolved config JSON (`cfg.to_dict()`), which round-trips exactly and travels with
      every checkpoint.

Layer keys given at the top level are defaults for every layer; a layer dict overrides them.
Unknown keys are errors (with a "did you mean" hint). Keys that belong to another mechanism
than the one a layer uses (seed layer files list MLA latent dims on GQA layers) are accepted
and dropped from the resolved config.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or inconsistent."""


# --- names that are valid in one place only ---------------------------------------------------
ATTN_TYPES = ("mha", "mqa", "gqa", "mla")
POS_EMBS = ("learn", "sin", "rope", "alibi")
NORMS = ("layernorm", "rmsnorm")
_NORM_ALIASES = {"layer": "layernorm", "ln": "layernorm", "rms": "rmsnorm"}
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swish", "mish", "selu", "celu", "elu", "lrelu",
               "tanh", "sigmoid", "glu", "swiglu")
BIASES = ("none", "qkv", "attn", "all")
ROPE_SCALINGS = ("llama3", "yarn")

@dataclass(frozen=True)
class Flag:
    """One model flag, declared once: its name, type, default (the seed's train.py defaults)
    and meaning. The config loader below, jobs/train.py's flags (and --help), sweep specs'
    accepted keys and docs/parameters.md are all generated from FLAGS; adding a model flag is
    one entry here (plus the mechanism that reads it)."""
    name: str
    type: type
    default: Any
    help: str
    scope: str            # "global": model-wide; "attn" / "ffn": per layer (dropout: both)
    nullable: bool = False   # None (JSON null, CLI "null") is a value of its own


def _one_of(names) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}"


FLAGS: tuple[Flag, ...] = (
    Flag("n_layer", int, 6, "number of transformer layers (must equal the number of layer dicts when given)", "global"),
    Flag("n_embd", int, 256, "model width (embedding size)", "global"),
    Flag("vocab_size", int, 50304, "vocabulary size (default: the dataset's tokenizer vocabulary rounded up to 64)", "global"),
    Flag("block_size", int, 1024, "context length in tokens", "global"),
    Flag("dropout", float, 0.0, "dropout probability", "global"),
    Flag("pos_emb", str, "rope", f"positions: {_one_of(POS_EMBS)}", "global"),
    Flag("norm", str, "layernorm", _one_of(NORMS), "global"),
    Flag("up_dim", int, 512, "hidden width of the MLP / of each expert", "ffn"),
    Flag("non_linearity", str, "swiglu", f"MLP activation ({' '.join(ACTIVATIONS)})", "ffn"),
    Flag("attn", str, "mla", f"attention: {_one_of(ATTN_TYPES)} (DeepSeek multi-head latent attention)", "attn"),
    Flag("n_head", int, 8, "attention heads", "attn"),
    Flag("n_kv_heads", int, 4, "key/value heads (gqa; mha uses n_head, mqa 1)", "attn"),
    Flag("q_latent_dim", int, 32, "mla: query latent width (null: no query latent, as DeepSeek-V2-Lite)", "attn",
         nullable=True),
    Flag("kv_latent_dim", int, 32, "mla: key/value latent width (what the KV cache stores)", "attn"),
    Flag("rope_head_dim", int, 16, "mla: decoupled RoPE width per head (0 without rope)", "attn"),
    Flag("moe", bool, False, "mixture of experts instead of the dense MLP", "ffn"),
    Flag("n_exp", int, 8, "moe: experts per layer", "ffn"),
    Flag("n_shared", int, 1, "moe: always-active shared experts", "ffn"),
    Flag("n_act", int, 4, "moe: active experts per token, shared ones included", "ffn"),
    Flag("coeff", float, 0.01, "moe: auxiliary load-balancing loss weight (without --aux_free)", "ffn"),
    Flag("aux_free", bool, False, "moe: auxiliary-loss-free balancing (per-expert router bias)", "ffn"),
    Flag("alpha", float, 0.0001, "moe --aux_free: weight of the small sequence-wise balance loss", "ffn"),
    Flag("gamma", float, 0.001, "moe --aux_free: bias update step per optimizer step", "ffn"),
    Flag("act_recomp", bool, False, "recompute activations in the backward pass (less memory, more compute)", "global"),
    # --- knobs that existing checkpoints (GPT-2, Llama, Qwen2, DeepSeek-V2/V3) need; see chimera.hf
    Flag("bias", str, "none", "linear biases: none; qkv (the q/k/v projection, Qwen2); attn (q/k/v and the "
         "attention output, Llama attention_bias); all (attn + the dense MLP, GPT-2). Not on mla or MoE layers",
         "global"),
    Flag("tie_embeddings", bool, True, "the LM head shares the token embedding's weights (false: its own matrix)", "global"),
    Flag("norm_eps", float, None, "epsilon of the block and final norms (null: LayerNorm 1e-5, RMSNorm 1e-6; "
         "MLA's latent norms always use 1e-6, as DeepSeek's)", "global", nullable=True),
    Flag("rope_theta", float, 10000.0, "RoPE base (also MLA's decoupled RoPE)", "global"),
    Flag("rope_scaling", dict, None, "RoPE scaling as in transformers: {type: llama3, factor, low_freq_factor, "
         "high_freq_factor, original_max_position_embeddings} or {type: yarn, factor, "
         "original_max_position_embeddings, beta_fast: 32, beta_slow: 1, mscale, mscale_all_dim, attention_factor, "
         "truncate: true} (null: none)", "global", nullable=True),
    Flag("qk_nope_head_dim", int, None, "mla: per-head query/key width without RoPE (null: n_embd/n_head)", "attn",
         nullable=True),
    Flag("v_head_dim", int, None, "mla: per-head value width (null: n_embd/n_head)", "attn", nullable=True),
    Flag("norm_topk_prob", bool, True, "moe: renormalise the chosen routed experts' gates to sum 1", "ffn"),
    Flag("routed_scaling_factor", float, 1.0, "moe: routed experts' gates are multiplied by this", "ffn"),
    Flag("n_group", int, 1, "moe: routed experts form this many groups (group-limited routing)", "ffn"),
    Flag("topk_group", int, 1, "moe: each token picks its experts from its best topk_group groups", "ffn"),
    Flag("window", int, None, "sliding-window attention on gqa-family layers: a query sees its last `window` "
         "positions and the layer caches only those (null: full attention; not on mla)", "attn", nullable=True),
    # --- multi-token prediction (DeepSeek-V3): training-only modules, see models/mtp.py
    Flag("mtp_depth", int, 0, "multi-token prediction: D sequential MTP modules, module k predicting the token "
         "k+1 ahead (0: off). Trained with the model, unused at inference", "global"),
    Flag("mtp_lambda", float, 0.3, "weight of the mean MTP cross-entropy in the training loss (DeepSeek-V3's "
         "0.3, its value for the first 10T tokens)", "global"),
)


def derive(flags: tuple[Flag, ...]) -> dict[str, Any]:
    """The views of a flag table that the loader and the jobs read (module globals below).
    Code elsewhere reads them as `models.config.X` at call time, never copies them."""
    glob = {f.name: f.default for f in flags if f.scope == "global"}
    attn = {f.name: f.default for f in flags if f.scope == "attn"}
    ffn = {f.name: f.default for f in flags if f.scope == "ffn"}
    layer = frozenset(attn) | frozenset(ffn) | {"dropout"}
    return {"FLAGS": flags, "MODEL_KEYS": tuple(f.name for f in flags), "GLOBAL_DEFAULTS": glob,
            "ATTN_DEFAULTS": attn, "FFN_DEFAULTS": ffn, "LAYER_KEYS": layer,
            "GLOBAL_KEYS": frozenset(glob), "ALL_FLAT_KEYS": frozenset(glob) | layer,
            "_TYPES": {f.name: f.type for f in flags},
            "_NULLABLE": frozenset(f.name for f in flags if f.nullable)}


_views = derive(FLAGS)
MODEL_KEYS: tuple[str, ...] = _views["MODEL_KEYS"]        # every model flag, in FLAGS order
GLOBAL_DEFAULTS: dict[str, Any] = _views["GLOBAL_DEFAULTS"]
ATTN_DEFAULTS: dict[str, Any] = _views["ATTN_DEFAULTS"]
FFN_DEFAULTS: dict[str, Any] = _views["FFN_DEFAULTS"]
LAYER_KEYS: frozenset[str] = _views["LAYER_KEYS"]
GLOBAL_KEYS: frozenset[str] = _views["GLOBAL_KEYS"]
ALL_FLAT_KEYS: frozenset[str] = _views["ALL_FLAT_KEYS"]
_TYPES: dict[str, type] = _views["_TYPES"]
_NULLABLE: frozenset[str] = _views["_NULLABLE"]


def pad_vocab(n: int, multiple: int = 64) -> int:
    """A tokenizer's vocabulary size padded up to a multiple of 64: the model's vocab_size when
    none is given (faster matmuls; the extra rows are never sampled)."""
    return -(-n // multiple) * multiple


def _check_type(where: str, key: str, value: Any) -> Any:
    """Return value coerced to the key's type (int -> float only), or raise ConfigError."""
    want = _TYPES[key]
    if value is None and key in _NULLABLE:
        return None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}{key}={value!r} must be of type {want.__name__}, "
                          f"got {type(value).__name__}")
    if want is float and not math.isfinite(value):
        raise ConfigError(f"{where}{key}={value!r} must be a finite number")
    return value


def _unknown(where: str, key: str, valid) -> ConfigError:
    hint = difflib.get_close_matches(key, sorted(valid), n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ConfigError(f"{where}unknown key {key!r}{extra}; valid keys: {', '.join(sorted(valid))}")


def _positive(where: str, **kv: int) -> None:
    for k, v in kv.items():
        if v < 1:
            raise ConfigError(f"{where}{k}={v} must be >= 1")


# --- per-mechanism configs ----------------------------------------------------------------------
@dataclass(frozen=True)
class AttnConfig:
    """One layer's attention. mha/mqa/gqa use n_kv_heads; mla uses the latent dims.

    `rope_head_dim` is MLA's decoupled RoPE width; it is 0 unless the model uses RoPE.
    MLA's per-head widths `qk_nope_head_dim` and `v_head_dim` are resolved by the loader
    (default n_embd // n_head); `q_latent_dim` None is an MLA without the query latent.
    Fields that the mechanism does not use are normalised (None) so equal layers compare equal.
    """
    attn: str = ATTN_DEFAULTS["attn"]         # defaults: the flag tables above, declared once
    n_head: int = ATTN_DEFAULTS["n_head"]
    n_kv_heads: int | None = None
    q_latent_dim: int | None = None
    kv_latent_dim: int | None = None
    rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    window: int | None = None                 # sliding window (gqa family); None: full attention

    def __post_init__(self) -> None:
        w = "attn: "
        if self.window is not None:
            if self.attn == "mla":
                raise ConfigError(f"{w}window={self.window} is for gqa-family layers (mha, mqa, gqa); an mla "
                                  f"layer attends over its whole latent cache (use window=null)")
            if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
                raise ConfigError(f"{w}window={self.window!r} must be an int >= 1 (null: full attention)")
        if self.attn not in ATTN_TYPES:
            raise ConfigError(f"{w}unknown attention {self.attn!r}; choose one of {', '.join(ATTN_TYPES)}")
        _positive(w, n_head=self.n_head)
        if self.attn == "mla":
            need = {"kv_latent_dim": self.kv_latent_dim, "rope_head_dim": self.rope_head_dim,
                    "qk_nope_head_dim": self.qk_nope_head_dim, "v_head_dim": self.v_head_dim}
            if any(v is None for v in need.values()):
                raise ConfigError(f"{w}mla needs {', '.join(need)}")
            _positive(w, kv_latent_dim=self.kv_latent_dim, qk_nope_head_dim=self.qk_nope_head_dim,
                      v_head_dim=self.v_head_dim)
            if self.q_latent_dim is not None:                 # None: no query latent
                _positive(w, q_latent_dim=self.q_latent_dim)
            if self.rope_head_dim < 0 or self.rope_head_dim % 2:
                raise ConfigError(f"{w}rope_head_dim={self.rope_head_dim} must be an even number >= 0")
            if self.n_kv_heads is not None:
                raise ConfigError(f"{w}mla does not use n_kv_heads (leave it None)")
        else:
            if self.n_kv_heads is None:
                raise ConfigError(f"{w}{self.attn} needs n_kv_heads")
            _positive(w, n_kv_heads=self.n_kv_heads)
            if self.attn == "mha" and self.n_kv_heads != self.n_head:
                raise ConfigError(f"{w}mha needs n_kv_heads == n_head, got {self.n_kv_heads} != {self.n_head}")
            if self.attn == "mqa" and self.n_kv_heads != 1:
                raise ConfigError(f"{w}mqa needs n_kv_heads == 1, got {self.n_kv_heads}")
            if self.n_kv_heads > self.n_head:
                raise ConfigError(f"{w}n_kv_heads={self.n_kv_heads} must be <= n_head={self.n_head}")
            if self.n_head % self.n_kv_heads:
                raise ConfigError(f"{w}n_head={self.n_head} is not divisible by n_kv_heads={self.n_kv_heads}")
            if any(v is not None for v in (self.q_latent_dim, self.kv_latent_dim, self.rope_head_dim,
                                           self.qk_nope_head_dim, self.v_head_dim)):
                raise ConfigError(f"{w}{self.attn} does not use MLA latent dims (leave them None)")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if self.attn == "mla":
            d["q_latent_dim"] = self.q_latent_dim          # None means "no query latent" here
        return d


@dataclass(frozen=True)
class FFNConfig:
    """One layer's feed-forward network: a dense MLP, or a mixture of experts (moe=True).

    MoE: `n_exp` experts of hidden width `up_dim`, `n_shared` of them always active, and the
    router picks top-(n_act - n_shared) of the other n_exp - n_shared. Balancing is either the
    auxiliary loss (`coeff`) or auxiliary-loss-free bias updates (`aux_free`: `gamma` step size
    and the small sequence-wise loss `alpha`). Gates of the chosen routed experts are renormalised
    to sum 1 when `norm_topk_prob`, then multiplied by `routed_scaling_factor`; with `n_group` > 1
    a token picks its experts inside its best `topk_group` groups of consecutive routed experts.
    Unused fields are None (MoE routing fields left None are filled with their defaults).
    """
    moe: bool = FFN_DEFAULTS["moe"]
    up_dim: int = FFN_DEFAULTS["up_dim"]
    non_linearity: str = FFN_DEFAULTS["non_linearity"]
    n_exp: int | None = None
    n_shared: int | None = None
    n_act: int | None = None
    aux_free: bool | None = None
    coeff: float | None = None
    alpha: float | None = None
    gamma: float | None = None
    norm_topk_prob: bool | None = None
    routed_scaling_factor: float | None = None
    n_group: int | None = None
    topk_group: int | None = None

    _ROUTING = ("norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group")

    def __post_init__(self) -> None:
        w = "ffn: "
        _positive(w, up_dim=self.up_dim)
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"{w}unknown non_linearity {self.non_linearity!r}; "
                              f"choose one of {', '.join(ACTIVATIONS)}")
        moe_fields = (self.n_exp, self.n_shared, self.n_act, self.aux_free)
        routing = tuple(getattr(self, k) for k in self._ROUTING)
        if not self.moe:
            if any(v is not None for v in moe_fields + routing + (self.coeff, self.alpha, self.gamma)):
                raise ConfigError(f"{w}a dense MLP does not use MoE fields (leave them None)")
            return
        for k in self._ROUTING:                              # defaults: FLAGS, declared once
            if getattr(self, k) is None:
                object.__setattr__(self, k, FFN_DEFAULTS[k])
        if any(v is None for v in moe_fields):
            raise ConfigError(f"{w}moe needs n_exp, n_shared, n_act and aux_free")
        if self.n_exp < 2:
            raise ConfigError(f"{w}n_exp={self.n_exp} must be >= 2")
        if not 0 <= self.n_shared < self.n_exp:
            raise ConfigError(f"{w}n_shared={self.n_shared} must be in [0, n_exp={self.n_exp})")
        if not self.n_shared < self.n_act <= self.n_exp:
            raise ConfigError(f"{w}n_act={self.n_act} must be > n_shared={self.n_shared} (at least one "
                              f"routed expert) and <= n_exp={self.n_exp}")
        if self.aux_free:
            if self.alpha is None or self.gamma is None or self.coeff is not None:
                raise ConfigError(f"{w}aux_free moe uses alpha and gamma (and not coeff)")
            for k in ("alpha", "gamma"):
                if getattr(self, k) < 0:
                    raise ConfigError(f"{w}{k}={getattr(self, k)} must be >= 0")
        else:
            if self.coeff is None or self.alpha is not None or self.gamma is not None:
                raise ConfigError(f"{w}aux-loss moe uses coeff (and not alpha/gamma)")
            if self.coeff < 0:
                raise ConfigError(f"{w}coeff={self.coeff} must be >= 0")
        if not isinstance(self.norm_topk_prob, bool):
            raise ConfigError(f"{w}norm_topk_prob={self.norm_topk_prob!r} must be true or false")
        r = self.routed_scaling_factor
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and r > 0):
            raise ConfigError(f"{w}routed_scaling_factor={r!r} must be a number > 0")
        _positive(w, n_group=self.n_group, topk_group=self.topk_group)
        if self.n_routed % self.n_group:
            raise ConfigError(f"{w}n_group={self.n_group} must divide the {self.n_routed} routed experts "
                              f"(n_exp - n_shared)")
        if self.topk_group > self.n_group:
            raise ConfigError(f"{w}topk_group={self.topk_group} must be <= n_group={self.n_group}")
        if self.top_k > self.topk_group * (self.n_routed // self.n_group):
            raise ConfigError(f"{w}top-k={self.top_k} routed experts (n_act - n_shared) do not fit in "
                              f"topk_group={self.topk_group} groups of {self.n_routed // self.n_group}")

    @property
    def n_routed(self) -> int:
        return (self.n_exp - self.n_shared) if self.moe else 0

    @property
    def top_k(self) -> int:
        return (self.n_act - self.n_shared) if self.moe else 0

    @property
    def gated(self) -> bool:
        return self.non_linearity in ("glu", "swiglu")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class BlockConfig:
    """One transformer block: attention + FFN, with its own residual dropout."""
    attn: AttnConfig
    ffn: FFNConfig
    dropout: float = GLOBAL_DEFAULTS["dropout"]

    def to_dict(self) -> dict[str, Any]:
        return {**self.attn.to_dict(), **self.ffn.to_dict(), "dropout": self.dropout}

    def summary(self) -> str:
        """Short label, e.g. `mla+moe8/2`, `gqa2+mlp`, `mha+mlp`."""
        a = self.attn
        att = f"gqa{a.n_kv_heads}" if a.attn == "gqa" else a.attn
        if a.window is not None:
            att += f"/w{a.window}"
        f = self.ffn
        ffn = f"moe{f.n_exp}/{f.n_act}" if f.moe else "mlp"
        return f"{att}+{ffn}"


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for long contexts, with transformers' names and formulas
    (models/positions.py computes them): `llama3` (Llama 3.1) or `yarn` (YaRN, DeepSeek-V3).
    Fields of the other type are None; `from_dict` fills yarn's optional fields as transformers
    does (beta_fast 32, beta_slow 1, truncate true)."""
    type: str
    factor: float
    original_max_position_embeddings: int
    low_freq_factor: float | None = None         # llama3
    high_freq_factor: float | None = None        # llama3
    beta_fast: float | None = None               # yarn
    beta_slow: float | None = None               # yarn
    mscale: float | None = None                  # yarn: with mscale_all_dim, the attention factor
    mscale_all_dim: float | None = None          # yarn: MLA's softmax scale gets mscale(factor, this)^2
    attention_factor: float | None = None        # yarn: cos/sin scale (None: inferred from factor)
    truncate: bool | None = None                 # yarn: round the correction range to whole dims

    _KEYS = {"llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
             "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                      "mscale_all_dim", "attention_factor", "truncate")}
    _OPTIONAL = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None,
                 "attention_factor": None, "truncate": True}

    def __post_init__(self) -> None:
        w = "rope_scaling: "
        if self.type not in ROPE_SCALINGS:
            raise ConfigError(f"{w}type={self.type!r} must be one of {', '.join(ROPE_SCALINGS)}")
        keys = self._KEYS[self.type]
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "type":
                continue
            if f.name not in keys:
                if v is not None:
                    raise ConfigError(f"{w}{f.name} is not a {self.type} parameter "
                                      f"(its keys: {', '.join(keys)})")
                continue
            if f.name == "truncate":
                if not isinstance(v, bool):
                    raise ConfigError(f"{w}truncate={v!r} must be true or false")
                continue
            if v is None and f.name in self._OPTIONAL:
                continue
            if f.name == "original_max_position_embeddings":
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ConfigError(f"{w}original_max_position_embeddings={v!r} must be an int >= 1")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{w}{f.name}={v!r} must be a number > 0")
            object.__setattr__(self, f.name, float(v))
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"{w}high_freq_factor={self.high_freq_factor} must be > "
                              f"low_freq_factor={self.low_freq_factor}")

    @classmethod
    def from_dict(cls, d: Any) -> "RopeScaling":
        w = "rope_scaling: "
        if not isinstance(d, Mapping):
            raise ConfigError(f"rope_scaling must be a mapping with a 'type' (or null), got {type(d).__name__}")
        d = dict(d)
        kind = d.pop("type", None)
        if kind not in ROPE_SCALINGS:
            raise ConfigError(f"{w}type={kind!r} must be one of {', '.join(ROPE_SCALINGS)}")
        keys = cls._KEYS[kind]
        for k in d:
            if k not in keys:
                raise _unknown(f"{w}({kind}) ", k, keys)
        missing = [k for k in keys if k not in d and k not in cls._OPTIONAL]
        if missing:
            raise ConfigError(f"{w}{kind} needs {', '.join(missing)}")
        opt = {k: v for k, v in cls._OPTIONAL.items() if k in keys}
        return cls(type=kind, **{**opt, **d})

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **{k: getattr(self, k) for k in self._KEYS[self.type]}}


@dataclass(frozen=True)
class ModelConfig:
    """The whole model: global settings plus one BlockConfig per layer."""
    layers: tuple[BlockConfig, ...]
    vocab_size: int = GLOBAL_DEFAULTS["vocab_size"]
    block_size: int = GLOBAL_DEFAULTS["block_size"]
    n_embd: int = GLOBAL_DEFAULTS["n_embd"]
    n_layer: int = GLOBAL_DEFAULTS["n_layer"]
    dropout: float = GLOBAL_DEFAULTS["dropout"]
    pos_emb: str = GLOBAL_DEFAULTS["pos_emb"]
    norm: str = GLOBAL_DEFAULTS["norm"]
    act_recomp: bool = GLOBAL_DEFAULTS["act_recomp"]
    bias: str = GLOBAL_DEFAULTS["bias"]
    tie_embeddings: bool = GLOBAL_DEFAULTS["tie_embeddings"]
    norm_eps: float | None = GLOBAL_DEFAULTS["norm_eps"]
    rope_theta: float = GLOBAL_DEFAULTS["rope_theta"]
    rope_scaling: RopeScaling | None = GLOBAL_DEFAULTS["rope_scaling"]
    mtp_depth: int = GLOBAL_DEFAULTS["mtp_depth"]
    mtp_lambda: float = GLOBAL_DEFAULTS["mtp_lambda"]

    def __post_init__(self) -> None:
        # the one place where cross-field rules live; every message names path and values
        if not isinstance(self.layers, tuple) or not all(isinstance(b, BlockConfig) for b in self.layers):
            raise ConfigError("layers must be a tuple of BlockConfig")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        for k in GLOBAL_KEYS - {"rope_scaling"}:
            _check_type("", k, getattr(self, k))
        if self.bias not in BIASES:
            raise ConfigError(f"unknown bias {self.bias!r}; choose one of {', '.join(BIASES)}")
        if self.norm_eps is not None and not 0 < self.norm_eps < 1:
            raise ConfigError(f"norm_eps={self.norm_eps} must be in (0, 1)")
        if self.rope_theta <= 1:
            raise ConfigError(f"rope_theta={self.rope_theta} must be > 1")
        if self.rope_scaling is not None and self.pos_emb != "rope":
            raise ConfigError(f"rope_scaling needs pos_emb='rope' (got {self.pos_emb!r})")
        _positive("", vocab_size=self.vocab_size, block_size=self.block_size, n_embd=self.n_embd,
                  n_layer=self.n_layer)
        if self.vocab_size > 2 ** 31 - 1:
            raise ConfigError(f"vocab_size={self.vocab_size} is too large")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if self.pos_emb not in POS_EMBS:
            raise ConfigError(f"unknown pos_emb {self.pos_emb!r}; choose one of {', '.join(POS_EMBS)}")
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if len(self.layers) != self.n_layer:
            raise ConfigError(f"n_layer={self.n_layer} but {len(self.layers)} layer configs were given")
        if not 0 <= self.mtp_depth < self.block_size:
            raise ConfigError(f"mtp_depth={self.mtp_depth} must be >= 0 (0: off) and < block_size="
                              f"{self.block_size}")
        if self.mtp_lambda < 0:
            raise ConfigError(f"mtp_lambda={self.mtp_lambda} must be >= 0")
        for i, b in enumerate(self.layers):
            w = f"layers[{i}]."
            if not 0.0 <= b.dropout < 1.0:
                raise ConfigError(f"{w}dropout={b.dropout} must be in [0, 1)")
            a = b.attn
            if a.attn == "mla" and self.bias != "none":
                raise ConfigError(f"{w}attn: bias={self.bias!r} is for gqa-family layers; mla layers have "
                                  f"no biases (use bias='none')")
            if b.ffn.moe and self.bias == "all":
                raise ConfigError(f"{w}ffn: bias='all' puts biases on dense MLPs; MoE experts have none "
                                  f"(use bias='attn' or 'qkv')")
            if a.attn != "mla" and self.n_embd % a.n_head:
                raise ConfigError(f"{w}attn: n_embd={self.n_embd} is not divisible by n_head={a.n_head}")
            head_dim = self.n_embd // a.n_head
            if a.attn == "mla":
                if self.pos_emb == "alibi":
                    raise ConfigError(f"{w}attn: pos_emb='alibi' is not defined for mla layers: DeepSeek's MLA "
                                      f"carries positions in its decoupled RoPE (use pos_emb='rope', or "
                                      f"gqa-family layers with alibi)")
                if self.pos_emb == "rope" and a.rope_head_dim < 2:
                    raise ConfigError(f"{w}attn: mla with pos_emb='rope' needs rope_head_dim >= 2 "
                                      f"(decoupled RoPE), got {a.rope_head_dim}")
                if self.pos_emb != "rope" and a.rope_head_dim != 0:
                    raise ConfigError(f"{w}attn: rope_head_dim={a.rope_head_dim} needs pos_emb='rope' "
                                      f"(got {self.pos_emb!r}); use 0")
            elif self.pos_emb == "rope" and head_dim % 2:
                raise ConfigError(f"{w}attn: RoPE needs an even head_dim, got n_embd/n_head={head_dim}")

    # --- derived views ---
    @property
    def is_homogeneous(self) -> bool:
        return all(b == self.layers[0] for b in self.layers)

    def summary(self) -> str:
        """Run-length architecture label, e.g. `4×[mla+moe8/2] + 4×[gqa2+mlp]`."""
        parts: list[list] = []
        for b in self.layers:
            s = b.summary()
            if parts and parts[-1][1] == s:
                parts[-1][0] += 1
            else:
                parts.append([1, s])
        label = " + ".join(f"{n}×[{s}]" for n, s in parts)
        return label + (f" + mtp{self.mtp_depth}" if self.mtp_depth else "")

    # --- serialisation ---
    def to_dict(self) -> dict[str, Any]:
        """The resolved config: globals + one complete seed-format dict per layer."""
        d = {k: getattr(self, k) for k in GLOBAL_DEFAULTS}
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling.to_dict()
        d["layers"] = [b.to_dict() for b in self.layers]
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def layers_jsonl(self) -> str:
        """The layer stack in the seed's JSONL format (one layer per line)."""
        return "".join(json.dumps(b.to_dict()) + "\n" for b in self.layers)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from flat flags, a `layers` list, or a resolved dict (see module docstring)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a model config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        layers = d.pop("layers", None)
        for k in d:
            if k not in ALL_FLAT_KEYS:
                raise _unknown("", k, ALL_FLAT_KEYS | {"layers"})
        glob = {k: _check_type("", k, v) for k, v in d.items() if k in GLOBAL_KEYS}
        if "norm" in glob:
            glob["norm"] = _NORM_ALIASES.get(glob["norm"], glob["norm"])
        glob = {**GLOBAL_DEFAULTS, **glob}
        # layer keys at the top level are defaults for every layer ("dropout" is both)
        layer_defaults = {k: v for k, v in d.items() if k in LAYER_KEYS}
        if layers is None:
            _positive("", n_layer=glob["n_layer"])
            layer_dicts = [{}] * glob["n_layer"]
        else:
            if not isinstance(layers, (list, tuple)) or not layers:
                raise ConfigError("layers must be a non-empty list of per-layer dicts")
            layer_dicts = list(layers)
            if "n_layer" in d and d["n_layer"] != len(layer_dicts):
                raise ConfigError(f"n_layer={d['n_layer']} but {len(layer_dicts)} layer configs were given")
            glob["n_layer"] = len(layer_dicts)
        blocks = tuple(_build_block(i, layer_defaults, ld, glob) for i, ld in enumerate(layer_dicts))
        return cls(layers=blocks, **glob)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        """Load a JSON file holding a config dict (resolved or flat)."""
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_layer_file(cls, path: str | Path, **global_flags: Any) -> "ModelConfig":
        """Seed-format JSONL: one layer dict per line (blank lines and `#` lines skipped)."""
        return cls.from_dict({**global_flags, "layers": read_layer_file(path)})

    @classmethod
    def from_layer_list(cls, text: str, **global_flags: Any) -> "ModelConfig":
        """A JSON string holding a list of layer dicts (the seed's --layer_configs)."""
        return cls.from_dict({**global_flags, "layers": parse_layer_list(text)})


def parse_layer_list(text: str) -> list:
    """The seed's --layer_configs: a JSON string holding a list of layer dicts."""
    try:
        layers = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"layer configs: invalid JSON: {e}") from None
    if not isinstance(layers, list):
        raise ConfigError("layer configs must be a JSON list of per-layer dicts")
    return layers


def read_layer_file(path: str | Path) -> list[dict]:
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"layer file not found: {p}") from None
    out = []
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            out.append(json.loads(s))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{n}: invalid JSON: {e}") from None
    if not out:
        raise ConfigError(f"layer file {p} holds no layers")
    return out


def _build_block(i: int, defaults: dict, ld: Any, glob: dict) -> BlockConfig:
    w = f"layers[{i}]."
    if not isinstance(ld, Mapping):
        raise ConfigError(f"layers[{i}] must be a dict, got {type(ld).__name__}")
    for k in ld:
        if k not in LAYER_KEYS:
            raise _unknown(f"layers[{i}]: ", k, LAYER_KEYS)
    merged = {**ATTN_DEFAULTS, **FFN_DEFAULTS, "dropout": glob["dropout"], **defaults, **ld}
    m = {k: _check_type(w, k, v) for k, v in merged.items()}
    try:
        kind = m["attn"]
        if kind == "mla":
            n_head = m["n_head"]
            if n_head >= 1 and glob["n_embd"] % n_head and None in (m["qk_nope_head_dim"], m["v_head_dim"]):
                raise ConfigError(f"attn: n_embd={glob['n_embd']} is not divisible by n_head={n_head} "
                                  f"(give mla's qk_nope_head_dim and v_head_dim)")
            dflt = glob["n_embd"] // n_head if n_head >= 1 else None
            attn = AttnConfig(attn="mla", n_head=n_head, q_latent_dim=m["q_latent_dim"],
                              kv_latent_dim=m["kv_latent_dim"],
                              rope_head_dim=m["rope_head_dim"] if glob["pos_emb"] == "rope" else 0,
                              qk_nope_head_dim=dflt if m["qk_nope_head_dim"] is None else m["qk_nope_head_dim"],
                              v_head_dim=dflt if m["v_head_dim"] is None else m["v_head_dim"],
                              window=m["window"])
        else:
            kv = {"mha": m["n_head"], "mqa": 1}.get(kind, m["n_kv_heads"])
            attn = AttnConfig(attn=kind, n_head=m["n_head"], n_kv_heads=kv, window=m["window"])
        if m["moe"]:
            bal = dict(alpha=m["alpha"], gamma=m["gamma"]) if m["aux_free"] else dict(coeff=m["coeff"])
            ffn = FFNConfig(moe=True, up_dim=m["up_dim"], non_linearity=m["non_linearity"],
                            n_exp=m["n_exp"], n_shared=m["n_shared"], n_act=m["n_act"],
                            aux_free=m["aux_free"], **bal,
                            **{k: m[k] for k in FFNConfig._ROUTING})
        else:
            ffn = FFNConfig(moe=False, up_dim=m["up_dim"], non_linearity=m["non_linearity"])
    except ConfigError as e:
        raise ConfigError(f"{w}{e}") from None
    return BlockConfig(attn=attn, ffn=ffn, dropout=m["dropout"])
