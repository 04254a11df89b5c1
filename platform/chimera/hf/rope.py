"""RoPE settings between an HF config's `rope_parameters` (transformers 5 standardises the old
`rope_theta` / `rope_scaling` fields into it) and Chimera's `rope_theta` + `rope_scaling`.

    HF {"rope_type": "default", "rope_theta": t}                  <-> rope_theta t, rope_scaling None
    HF {"rope_type": "llama3" | "yarn", "rope_theta": t, ...}     <-> rope_scaling {"type": ..., ...}
Both sides use the formulas of transformers/modeling_rope_utils.py; rotate-half layout on both.
Other rope types, partial rotary factors and per-layer-type rope dicts are refused (ValueError
naming the field).
"""
from __future__ import annotations

from typing import Any

ROPE_TYPES = ("default", "llama3", "yarn")
_LLAMA3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_from_hf(hf_cfg) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) for Chimera from a loaded HF config object."""
    rp = getattr(hf_cfg, "rope_parameters", None)
    if not isinstance(rp, dict) or "rope_theta" not in rp:
        raise ValueError(f"{hf_cfg.model_type} config rope_parameters={rp!r}: expected one dict with "
                         f"rope_type and rope_theta (per-layer-type rope is not supported)")
    rt = rp.get("rope_type", rp.get("type", "default"))
    if rt not in ROPE_TYPES:
        raise ValueError(f"{hf_cfg.model_type} config rope_parameters rope_type={rt!r}: Chimera "
                         f"supports {', '.join(ROPE_TYPES)}")
    prf = rp.get("partial_rotary_factor", 1.0)
    if prf not in (None, 1.0):
        raise ValueError(f"{hf_cfg.model_type} config partial_rotary_factor={prf!r}: Chimera rotates "
                         f"whole heads (1.0)")
    theta = float(rp["rope_theta"])
    if rt == "default":
        return theta, None
    from models.config import RopeScaling
    known = set(RopeScaling._KEYS[rt]) | {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    extra = sorted(k for k, v in rp.items() if k not in known and v is not None)
    if extra:                                # a setting Chimera would silently not apply
        raise ValueError(f"{hf_cfg.model_type} config rope_parameters {({k: rp[k] for k in extra})!r}: "
                         f"not supported with rope_type {rt!r}")
    if rt == "llama3":
        return theta, {"type": "llama3", **{k: rp[k] for k in _LLAMA3}}
    orig = rp["original_max_position_embeddings"]
    factor = rp.get("factor")
    if factor is None:                       # HF: the ratio of the context lengths
        factor = hf_cfg.max_position_embeddings / orig
    return theta, {"type": "yarn", "factor": float(factor), "original_max_position_embeddings": orig,
                   "beta_fast": float(rp.get("beta_fast") or 32.0),        # HF: `or` defaults
                   "beta_slow": float(rp.get("beta_slow") or 1.0),
                   "mscale": rp.get("mscale"), "mscale_all_dim": rp.get("mscale_all_dim"),
                   "attention_factor": rp.get("attention_factor"),
                   "truncate": bool(rp.get("truncate", True))}


def rope_to_hf(cfg) -> dict[str, Any]:
    """HF rope_parameters for a Chimera ModelConfig (None-valued keys left out: HF infers them)."""
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling:
        sc = cfg.rope_scaling.to_dict()
        out["rope_type"] = sc.pop("type")
        out.update({k: v for k, v in sc.items() if v is not None})
    return out
