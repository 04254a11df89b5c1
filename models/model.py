"""The heterogeneous GPT: token embedding -> N blocks (each its own attention and FFN) ->
final norm -> LM head (tied to the embedding unless cfg.tie_embeddings is false).

    from models import ModelConfig, LLM
    model = LLM(ModelConfig.from_layer_file("configs/hetero.jsonl", n_embd=256))
    logits, loss = model(idx, targets)          # loss includes the MoE balancing terms
                                                # (and, with mtp_depth, the MTP loss: models/mtp.py)
    logits, loss, parts = model(idx, targets, parts=True)   # parts: Losses (main, mtp apart)
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


class Losses(NamedTuple):
    """The terms of the training loss, kept apart for logging."""
    ce: torch.Tensor            # next-token cross-entropy of the main model
    aux: torch.Tensor           # MoE balancing terms of the main stack
    mtp: torch.Tensor | None    # mean over depths of the MTP cross-entropies (None: mtp_depth 0)
    total: torch.Tensor         # what training backpropagates: ce + aux (+ mtp_lambda * mtp + MTP aux)

    @property
    def main(self) -> torch.Tensor:
        """ce + aux: the loss of a model without MTP (comparable across runs)."""
        return self.ce + self.aux


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

    def decode(self, x: torch.Tensor, cache: dict, pos: torch.Tensor,
               valid: torch.Tensor | None) -> torch.Tensor:
        """forward's static-shape twin for one token per row (models/decode.py)."""
        x = x + self.attn.decode(self.ln_1(x), cache, pos, valid)   # (B, 1, C)
        return x + self.ffn.decode(self.ln_2(x))


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
        self.mtp = None
        self.reset_parameters()
        if cfg.mtp_depth:     # training-only (models/mtp.py); built after the main model's init,
            from models.mtp import MTPModule    # so that a seed draws the same main weights
            self.mtp = nn.ModuleList(MTPModule(cfg, Block) for _ in range(cfg.mtp_depth))
            self._init(self.mtp.modules())

    # --- initialisation -----------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02); residual output projections N(0, 0.02/sqrt(2 n_layer)).
        The MTP modules, registered last, are drawn after the main model's weights."""
        self._init(self.modules())

    def _init(self, modules) -> None:
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for m in modules:
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
        """Final hidden states after ln_f (B, T, C) and MoE terms; `last` (B,): each row's last
        real token in a right-padded pass (sliding-window caches keep nothing after it)."""
        h, aux = self._stack(idx, cache, start, last)
        return self.ln_f(h), aux

    def _stack(self, idx: torch.Tensor, cache: KVCache | None, start: int | torch.Tensor,
               last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's output, before ln_f (B, T, C), and MoE terms (`last`: see _trunk)."""
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
        return x, aux

    def forward_with_aux(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(logits (B, T, V), cross-entropy or None, MoE balancing terms) — kept apart so that
        evaluation can report the language-model loss without the balancing terms. The main
        model only: the MTP modules never run here."""
        logits, ce, aux, _ = self._main(idx, targets)
        return logits, ce, aux

    def _main(self, idx: torch.Tensor, targets: torch.Tensor | None):
        """(logits (B, T, V), ce or None, aux, h0 (B, T, C): the stack's output before ln_f,
        which the MTP modules start from)."""
        h0, aux = self._stack(idx, None, 0)                         # (B, T, C) before ln_f
        logits = self.lm_head(self.ln_f(h0))                        # (B, T, V)
        ce = None
        if targets is not None:
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                 ignore_index=-1)
        return logits, ce, aux, h0

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, parts: bool = False):
        """(logits (B, T, V), loss or None); with parts, (logits, loss, Losses) (None without
        targets). The loss is the training objective: cross-entropy + MoE balancing terms, and
        with mtp_depth D, + mtp_lambda * mean of the D MTP cross-entropies + the MTP blocks'
        balancing terms (models/mtp.py). The logits are the main model's either way."""
        logits, ce, aux, h0 = self._main(idx, targets)
        losses = None
        if ce is not None:
            total, mtp = ce + aux, None
            if self.mtp is not None:
                from models.mtp import mtp_losses
                mtp, mtp_aux = mtp_losses(self, h0, idx, targets)
                total = total + self.cfg.mtp_lambda * mtp + mtp_aux
            losses = Losses(ce, aux, mtp, total)
        loss = losses.total if losses is not None else None
        return (logits, loss, losses) if parts else (logits, loss)

    @torch.no_grad()
    def next_logits(self, idx: torch.Tensor, cache: KVCache | None = None,
                    start: int | torch.Tensor = 0, last: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Logits (B, V) for the last position (or, with `last` (B,), for position last[b] of
        row b: a right-padded batch). With a cache, idx are the tokens at positions start..
        (an int, or per-row starts (B,), see models/attention/cache.py), written to the cache."""
        h, _ = self._trunk(idx, cache, start, last)
        return self._last_logits(h, last)

    @torch.no_grad()
    def decode_step(self, idx: torch.Tensor, cache: KVCache, pos: torch.Tensor,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row with static shapes: idx (B, 1) at positions pos (B,) (each <
        block_size, in the window: models/context.py) -> logits (B, V). Writes the cache in
        place and attends over all its slots with masks built from pos, so one traced graph
        serves every step (models/decode.py compiles it). Rows with valid[b] False write
        nothing (padding rows); their logits are meaningless. No host sync, no checks: the
        caller knows the positions. Does not touch cache.length."""
        x = self.wte(idx)                                           # (B, 1, C)
        if self.pos is not None:
            x = x + self.pos(pos.unsqueeze(1))                      # (B, 1, C)
        for block, layer_cache in zip(self.blocks, cache.layers):
            x = block.decode(x, layer_cache, pos, valid)
        return self.lm_head(self.ln_f(x[:, 0]))                     # (B, V)

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
                 vocab_limit: int | None = None, speculative: bool = False,
                 decode: str | None = None) -> torch.Tensor:
        """models.generation.generate (decode: the step's mode, models/decode.py); speculative (greedy only, mtp_depth >= 1): the MTP module
        drafts and the model verifies (models/speculative.py): the same tokens, fewer passes."""
        if speculative:
            from models.sampling import SamplingParams
            from models.speculative import speculative_generate
            SamplingParams(max_new_tokens, temperature, top_k, top_p)      # ValueError if bad
            if temperature != 0 or not use_cache:
                raise ValueError("speculative=True is greedy decoding with the KV cache: "
                                 "temperature must be 0 and use_cache True")
            return speculative_generate(self, idx, max_new_tokens, eos_id=eos_id,
                                        vocab_limit=vocab_limit)[0]
        from models.generation import generate
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_id=eos_id, use_cache=use_cache, generator=generator,
                        vocab_limit=vocab_limit, decode=decode)

    # --- accounting -----------------------------------------------------------------------------
    def num_params(self) -> ParamCount:
        """Every parameter (MTP modules included: they are trained); active leaves out the MoE
        experts a token does not use (in the MTP blocks too)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for b in self.cfg.layers + (self.cfg.layers[-1],) * self.cfg.mtp_depth:
            f = b.ffn
            if f.moe:
                per_expert = self.cfg.n_embd * f.up_dim * (2 if f.gated else 1) + f.up_dim * self.cfg.n_embd
                inactive += (f.n_routed - f.top_k) * per_expert
        return ParamCount(total, total - inactive)

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): 6 * active non-embedding params
        (the tied LM head counts, position tables do not) plus each layer's attention term
        over a full block_size context (PaLM appendix B convention). With mtp_depth D, a
        training token also passes the D MTP modules: their active parameters (in
        num_params), D more LM-head matmuls (D * vocab * n_embd) and D more attention terms of
        the last layer's kind, counted as if every position had a target at every depth."""
        n = self.num_params().active
        if self.pos is not None and self.pos.kind == "learn":
            n -= self.pos.wpe.weight.numel()
        if not self.cfg.tie_embeddings:                             # the lookup table does no matmul
            n -= self.wte.weight.numel()
        blocks = list(self.blocks) + ([m.block for m in self.mtp] if self.mtp is not None else [])
        attn = sum(b.attn.attn_flops_per_token(self.cfg.block_size) for b in blocks)
        n += self.cfg.mtp_depth * self.lm_head.weight.numel()      # the shared head, once per depth
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

    def _named_moes(self) -> list[tuple[str, nn.Module]]:
        """("layer{i}", MoE) per MoE layer, then ("mtp{k}", MoE) per MTP block with one."""
        named = [(f"layer{i}", moe) for i, moe in self.moe_layers()]
        if self.mtp is not None and self.cfg.layers[-1].ffn.moe:
            named += [(f"mtp{k}", m.block.ffn) for k, m in enumerate(self.mtp, start=1)]
        return named

    def update_moe_biases(self) -> None:
        """Call once per optimizer step: aux-free bias updates (loads all-reduced under DDP)."""
        for _, moe in self._named_moes():
            moe.update_bias()

    def moe_stats(self) -> dict[str, dict]:
        """Per MoE layer (and MTP block): expert load fractions and MaxVio of the last
        completed step."""
        return {name: moe.load_stats() for name, moe in self._named_moes()}
