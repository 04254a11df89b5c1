"""LoRA: low-rank adapters on named Linear layers of the blocks (Hu et al. 2021), pure PyTorch.

    n = apply_lora(model, rank=8, alpha=16.0, targets=("c_attn", "c_proj"))  # adapters added
    adapter_state(model)       # {"blocks.0.attn.c_attn.lora_A": (r, in), ...lora_B: (out, r)}
    merge_lora(model)          # weights W + (alpha/r) B A written back; plain nn.Linear again

An adapted Linear keeps its frozen base weight under its own key (`...c_attn.weight`) and gains
`lora_A` (r, in) and `lora_B` (out, r) beside it (B starts at zero: the adapted model is the base
model until it trains). Its forward is x W^T + (alpha/r) (x A^T) B^T (+ bias); reading `.weight`
gives the effective matrix W + (alpha/r) B A, so code that uses a projection's weight directly
(MLA's cached decode path absorbs W_uk and W_uv into the query and output) sees the adapter
too: cached == uncached with adapters on MLA, without a special case in the attention code.

Why our own module and not peft: peft wraps the model (PeftModel) and renames modules and
state-dict keys (`base_model.model....base_layer.weight`), and that wrapper would have to travel
through DDP, Ray Train checkpoints, Serve replicas and our strict safetensors loading, each of
which knows our key names. Our Linears are few and named (targets below), so the whole
mechanism is a class swap plus two parameters per Linear, and every base key stays what it is.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

# Linear modules inside the blocks that can carry adapters, and where they are
TARGETS: dict[str, str] = {
    "c_attn": "gqa/mha/mqa fused q,k,v projection",
    "c_proj": "attention output projection (gqa and mla) and dense MLP down projection",
    "c_fc": "dense MLP up (and gate) projection",
    "W_dq": "mla query down projection",
    "W_uq": "mla query up projection",
    "W_q": "mla query projection without a query latent",
    "W_dkv": "mla key/value (and rope key) down projection",
    "W_uk": "mla key up projection",
    "W_uv": "mla value up projection",
}
# what people may try that is not a Linear we adapt, and why
NOT_TARGETS: dict[str, str] = {
    **{n: "MoE experts are stacked parameters (E, C, H), not Linear layers"
       for n in ("w_up", "w_down", "shared_up", "shared_down", "experts")},
    "router": "the MoE router decides expert loads (and the aux-free bias balances them); it is not adapted",
    **{n: "the token embedding and the LM head (tied to it unless tie_embeddings is false) are "
          "not LoRA targets" for n in ("wte", "lm_head")},
}


class LoRAError(ValueError):
    """A LoRA setting is invalid for this model (names the setting and the valid choices)."""


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank adapter. Not built directly: apply_lora swaps the class
    of an existing Linear, so its `weight` (and `bias`) parameters stay under their keys."""
    lora_A: nn.Parameter          # (r, in_features)
    lora_B: nn.Parameter          # (out_features, r)
    scaling: float                # alpha / r

    @property
    def weight(self) -> torch.Tensor:                       # (out, in): base + scaling * B A
        return self._parameters["weight"] + self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (..., in) -> (..., out)
        base = F.linear(x, self._parameters["weight"], self.bias)
        return base + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.lora_A.size(0)}, scaling={self.scaling:g}"


def parse_targets(spec: str | Iterable[str]) -> tuple[str, ...]:
    """'c_attn,c_proj' (or a list) -> ('c_attn', 'c_proj'); LoRAError for an empty list, a
    refused name (MoE experts, the tied embedding/head: with the reason) or an unknown one
    (listing the valid ones)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    if not names:
        raise LoRAError(f"lora_targets is empty; choose from {', '.join(TARGETS)}")
    for n in names:
        if n in NOT_TARGETS:
            raise LoRAError(f"lora_targets: {n!r} cannot be a target: {NOT_TARGETS[n]}; "
                            f"valid targets: {', '.join(TARGETS)}")
        if n not in TARGETS:
            raise LoRAError(f"lora_targets: unknown target {n!r}; valid targets: {', '.join(TARGETS)}")
    return tuple(dict.fromkeys(names))


def present_targets(model: nn.Module) -> tuple[str, ...]:
    """The TARGETS this model has (in TARGETS order): the names of its block Linears."""
    have = {q.rsplit(".", 1)[-1] for q, m in model.named_modules()
            if q.startswith("blocks.") and isinstance(m, nn.Linear)}
    return tuple(t for t in TARGETS if t in have)


def find_targets(model: nn.Module, targets: Iterable[str] | str | None) -> list[str]:
    """Qualified names of the Linear modules inside model.blocks whose own name is one of
    `targets` (None: every target the model has). LoRAError naming any target that matches
    no module of this model, with the ones it has."""
    targets = present_targets(model) if targets is None else parse_targets(targets)
    found = [q for q, m in model.named_modules() if q.startswith("blocks.")
             and isinstance(m, nn.Linear) and q.rsplit(".", 1)[-1] in targets]
    hit = {q.rsplit(".", 1)[-1] for q in found}
    absent = [t for t in targets if t not in hit]
    if absent:
        raise LoRAError(f"lora_targets: {', '.join(absent)} match no module of this model "
                        f"(its targets: {', '.join(present_targets(model))})")
    return found


def check(rank: int, alpha: float) -> None:
    if rank < 1:
        raise LoRAError(f"lora_rank={rank} must be >= 1")
    if not alpha > 0:
        raise LoRAError(f"lora_alpha={alpha} must be > 0")


def apply_lora(model: nn.Module, rank: int, alpha: float,
               targets: Iterable[str] | str | None) -> tuple[str, ...]:
    """Add adapters of `rank` to every target Linear (None: all the model has; in place) and
    freeze every other parameter; returns the target names used (what adapter.json records). A is Kaiming-uniform (as nn.Linear
    initialises its weight), B zero. LoRAError on a bad rank, alpha or target."""
    check(rank, alpha)
    names = find_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for qual in names:
        m = model.get_submodule(qual)
        if isinstance(m, LoRALinear):
            raise LoRAError(f"{qual} already has an adapter")
        w = m._parameters["weight"]
        A = torch.empty(rank, m.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        m.__class__ = LoRALinear
        m.register_parameter("lora_A", nn.Parameter(A))
        m.register_parameter("lora_B", nn.Parameter(torch.zeros(m.out_features, rank,
                                                                device=w.device, dtype=w.dtype)))
        m.scaling = alpha / rank
    return tuple(t for t in TARGETS if any(q.rsplit(".", 1)[-1] == t for q in names))


def adapted(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(q, m) for q, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the adapters (empty without LoRA)."""
    return {f"{q}.{n}" for q, _ in adapted(model) for n in ("lora_A", "lora_B")}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by state-dict key (detached)."""
    return {f"{q}.{n}": getattr(m, n).detach() for q, m in adapted(model) for n in ("lora_A", "lora_B")}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W <- W + scaling B A) and turn the module back
    into a plain nn.Linear: the model's state dict is then exactly the base model's keys."""
    for _, m in adapted(model):
        w = m._parameters["weight"]
        w.add_((m.scaling * (m.lora_B.float() @ m.lora_A.float())).to(w.dtype))
        del m.lora_A, m.lora_B, m.scaling
        m.__class__ = nn.Linear
    return model
