"""Multi-token prediction (DeepSeek-V3 §2.2): `mtp_depth` D sequential modules trained beside
the model, module k (1..D) predicting the token k+1 ahead of each position.

    h^0 = the main stack's last hidden state, before the final norm        (B, T, C)
    module k, positions t = 0 .. T-k-1:
        h'_t  = eh_proj([hnorm(h^{k-1}_t) ; enorm(wte(token_{t+k}))])    (B, T-k, 2C) -> (B, T-k, C)
        h^k   = block(h')                    one Chimera Block built from the LAST layer's config
        logits = lm_head(ln_f(h^k))          the model's own final norm and head (shared)
        L_k   = cross-entropy(logits, token_{t+k+1})
    L = L_main + mtp_lambda * mean_k L_k     (+ the MTP blocks' MoE balancing terms, if any)

The token embedding, final norm and head are the model's own: a module owns only its two
RMSNorms, the 2C -> C projection and its block. The modules run only when the model's forward
is given targets (training); logits, generation, the KV cache, serving and evaluation never
touch them, so a model with MTP gives exactly the logits of the same weights without it.
`drop_mtp` returns that model without the modules (HF export: no HF family has them).
models/speculative.py uses module 1 as a draft model for greedy self-speculative decoding.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.norms import make_norm


class MTPModule(nn.Module):
    """One depth: combine the previous depth's hidden states with the next tokens' embeddings."""

    def __init__(self, cfg, block_cls: type[nn.Module]):
        super().__init__()
        C = cfg.n_embd
        self.hnorm = make_norm("rmsnorm", C, cfg.norm_eps)
        self.enorm = make_norm("rmsnorm", C, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * C, C, bias=False)
        self.block = block_cls(cfg, cfg.n_layer - 1)               # the last layer's attn / FFN

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cache: dict | None = None,
                start: int = 0, recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, L, C) hidden states, emb (B, L, C) embeddings of the tokens k ahead ->
        (h^k (B, L, C), MoE balancing term). `cache`/`start`: the block's KV cache layer
        (speculative decoding, models/speculative.py), as for a Block."""
        x = self.eh_proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1))   # (B, L, C)
        if recompute:
            return checkpoint(self.block, x, use_reentrant=False)
        return self.block(x, cache, start)


def mtp_losses(model, h0: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over depths of the MTP cross-entropies, sum of the MTP blocks' balancing terms).
    h0 (B, T, C) the main stack's output before ln_f; idx, targets (B, T) as for the model
    (targets[t] = token t+1; -1 is ignored)."""
    T = idx.size(1)
    D = len(model.mtp)
    if T <= D:
        raise ValueError(f"mtp_depth={D} needs sequences of more than {D} tokens, got {T}")
    recompute = model.cfg.act_recomp and model.training
    h, aux, ces = h0, h0.new_zeros(()), []
    for k, module in enumerate(model.mtp, start=1):
        L = T - k                                                   # positions with a target k+1 ahead
        h, a = module(h[:, :L], model.wte(idx[:, k:]), recompute=recompute)   # (B, L, C)
        logits = model.lm_head(model.ln_f(h))                       # (B, L, V)
        ces.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                   targets[:, k:].reshape(-1), ignore_index=-1))
        aux = aux + a
    return torch.stack(ces).mean(), aux


def drop_mtp(model):
    """The same model without its MTP modules: an LLM of the config with mtp_depth 0 holding
    every other weight (shared ones included). Its logits are the original's."""
    if not model.cfg.mtp_depth:
        return model
    plain = type(model)(dataclasses.replace(model.cfg, mtp_depth=0))     # models.model.LLM
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    plain.load_state_dict(state, strict=True)
    return plain.to(next(model.parameters()).device).train(model.training)
