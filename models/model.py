"""The heterogeneous GPT: token embedding -> N blocks (each its own attention and FFN) ->
final norm -> LM head (tied to the embedding unless cfg.tie_embeddings is false).

    from models import ModelConfig, LLM
    model = LLM(ModelConfig.from_layer_file("configs/hetero.jsonl", n_embd=256))
    logits, loss = model(idx, targets)          # loss includes the MoE balancing terms
    out = model.generate(idx, max_new_tokens=50, temperature=0.0)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention.cache import KVCache
from models.config import ModelConfig
from models.norms import make_norm
from models.positions import AbsolutePositions, position_ids
from models.registry import build_attention, build_ffn


class ParamCount(NamedTuple):
    total: int
    active: int     # parameters used per token: MoE counts shared + top-k routed experts only


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.ln_1 = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps)
        self.attn = build_attention(cfg, index)
        self.ln_2 = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps)
        self.ffn = build_ffn(cfg, index)

    def forward(self, x: torch.Tensor, cache: dict | None = None, start: int | torch.Tensor = 0,
                ends: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln_1(x), cache, start, ends)         # (B, T, C)
        y, aux = self.ffn(self.ln_2(x))
        return x + y, aux


class LLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"LLM needs a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = AbsolutePositions(cfg.pos_emb, cfg.block_size, cfg.n_embd) \
            if cfg.pos_emb in ("learn", "sin") else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight                   # weight tying
        self.reset_parameters()

    # --- initialisation -----------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02); residual output projections N(0, 0.02/sqrt(2 n_layer))."""
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                std = resid_std if getattr(m, "residual_scale", False) else 0.02
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)
            residual = getattr(m, "_residual_params", None)
            if residual is not None:                                # stacked MoE expert weights
                for name, p in m.named_parameters(recurse=False):
                    if p.dim() >= 2:
                        nn.init.normal_(p, 0.0, resid_std if name in residual else 0.02)

    # --- forward ------------------------------------------------------------------------------
    def _trunk(self, idx: torch.Tensor, cache: KVCache | None, start: int | torch.Tensor,
               last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, T, C) and MoE terms; `last` (B,): each row's last real token in a
        right-padded pass (sliding-window caches keep nothing after it)."""
        B, T = idx.shape
        end = (int(start.max()) if isinstance(start, torch.Tensor) else start) + T
        if end > self.cfg.block_size:
            raise ValueError(f"sequence of {end} tokens exceeds block_size={self.cfg.block_size}")
        if isinstance(start, torch.Tensor) and (cache is None or start.shape != (B,)):
            raise ValueError("per-row starts need a cache and one start per row")
        x = self.wte(idx)                                           # (B, T, C)
        if self.pos is not None:
            x = x + self.pos(position_ids(start, T, idx.device))   # (T, C) or (B, T, C)
        x = self.drop(x)
        ends = None if last is None or cache is None else start + last.to(idx.device) + 1   # (B,)
        aux = x.new_zeros(())
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.cfg.act_recomp and self.training and cache is None:
                x, a = checkpoint(block, x, use_reentrant=False)
            else:
                x, a = block(x, layer_cache, start, ends)
            aux = aux + a
        if cache is not None:
            cache.length = start + T
        return self.ln_f(x), aux

    def forward_with_aux(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(logits (B, T, V), cross-entropy or None, MoE balancing terms) — kept apart so that
        evaluation can report the language-model loss without the balancing terms."""
        h, aux = self._trunk(idx, None, 0)
        logits = self.lm_head(h)                                    # (B, T, V)
        ce = None
        if targets is not None:
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                 ignore_index=-1)
        return logits, ce, aux

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, ce, aux = self.forward_with_aux(idx, targets)
        return logits, (ce + aux if ce is not None else None)

    @torch.no_grad()
    def next_logits(self, idx: torch.Tensor, cache: KVCache | None = None,
                    start: int | torch.Tensor = 0, last: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Logits (B, V) for the last position (or, with `last` (B,), for position last[b] of
        row b: a right-padded batch). With a cache, idx are the tokens at positions start..
        (an int, or per-row starts (B,), see models/attention/cache.py), written to the cache."""
        h, _ = self._trunk(idx, cache, start, last)
        return self._last_logits(h, last)

    def _last_logits(self, h: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
        if last is None:
            return self.lm_head(h[:, -1, :])                        # (B, V)
        return self.lm_head(h[torch.arange(h.size(0), device=h.device), last.to(h.device)])

    @torch.no_grad()
    def next_logits_and_hidden(self, idx: torch.Tensor, cache: KVCache | None,
                               start: int | torch.Tensor, last: torch.Tensor | None,
                               rows: list[int], lens: list[int]
                               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """next_logits' (B, V), and the final hidden states (lens[i], C) of rows `rows` (prompt
        scoring: one trunk pass; the caller applies lm_head to them in chunks, so that a
        batch of long prompts never holds all (T, V) logits at once)."""
        h, _ = self._trunk(idx, cache, start, last)                 # (B, T, C)
        return self._last_logits(h, last), [h[r, :n] for r, n in zip(rows, lens)]

    # --- KV cache and generation ----------------------------------------------------------------
    def new_cache(self, batch: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache([b.attn.cache_shapes() for b in self.blocks], batch, self.cfg.block_size,
                       dtype or p.dtype, device or p.device,
                       layer_lens=[b.attn.cache_len for b in self.blocks])

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 vocab_limit: int | None = None) -> torch.Tensor:
        from models.generation import generate
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_id=eos_id, use_cache=use_cache, generator=generator,
                        vocab_limit=vocab_limit)

    # --- accounting -----------------------------------------------------------------------------
    def num_params(self) -> ParamCount:
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for b in self.cfg.layers:
            f = b.ffn
            if f.moe:
                per_expert = self.cfg.n_embd * f.up_dim * (2 if f.gated else 1) + f.up_dim * self.cfg.n_embd
                inactive += (f.n_routed - f.top_k) * per_expert
        return ParamCount(total, total - inactive)

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): 6 * active non-embedding params
        (the tied LM head counts, position tables do not) plus each layer's attention term
        over a full block_size context (PaLM appendix B convention)."""
        n = self.num_params().active
        if self.pos is not None and self.pos.kind == "learn":
            n -= self.pos.wpe.weight.numel()
        if not self.cfg.tie_embeddings:                             # the lookup table does no matmul
            n -= self.wte.weight.numel()
        attn = sum(b.attn.attn_flops_per_token(self.cfg.block_size) for b in self.blocks)
        return 6 * n + attn

    def kv_cache_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes one row of the KV cache allocates (a full block_size context): per layer,
        values per position (GQA family 2*n_kv_heads*head_dim, MLA kv_latent_dim + rope_head_dim)
        times the positions it keeps (block_size; a sliding-window layer min(window, block_size))."""
        elem = torch.empty((), dtype=dtype).element_size()
        return elem * sum(b.attn.kv_values_per_token() * b.attn.cache_len for b in self.blocks)

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int | float:
        """kv_cache_bytes ÷ block_size: the bytes per token of a full context. Without windows,
        the bytes each token caches across all layers (an int); a windowed layer contributes
        its per-position bytes times min(window, block_size) / block_size."""
        total, block = self.kv_cache_bytes(dtype), self.cfg.block_size
        return total // block if total % block == 0 else total / block

    # --- MoE balancing --------------------------------------------------------------------------
    def moe_layers(self) -> list[tuple[int, nn.Module]]:
        return [(i, b.ffn) for i, b in enumerate(self.blocks) if self.cfg.layers[i].ffn.moe]

    def update_moe_biases(self) -> None:
        """Call once per optimizer step: aux-free bias updates (loads all-reduced under DDP)."""
        for _, moe in self.moe_layers():
            moe.update_bias()

    def moe_stats(self) -> dict[str, dict]:
        """Per MoE layer: expert load fractions and MaxVio of the last completed step."""
        return {f"layer{i}": moe.load_stats() for i, moe in self.moe_layers()}
