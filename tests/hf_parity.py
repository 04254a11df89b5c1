"""Helpers for the Hugging Face interop tests: random-but-not-trivial weights, and the two
parity checks every conversion must pass (fp32 logits, greedy tokens with the KV cache)."""
from __future__ import annotations

import torch

TOL = 1e-4              # max abs logit difference allowed (fp32)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Every parameter random: norm weights 1 + noise, biases and matrices N(0, std). Zero biases
    or unit norms would let a wrong mapping of them pass; larger weights than the usual 0.02
    keep the greedy argmax away from ties."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        p.copy_(1 + noise if ("norm" in name or "ln" in name) and p.dim() == 1 and not
                name.endswith("bias") else noise)
    return model.eval()


@torch.no_grad()
def max_logit_diff(hf_model, chimera_model, vocab: int, T: int = 24, seed: int = 1) -> float:
    """Max |HF logits - Chimera logits| over a random (2, T) batch."""
    ids = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))
    a = hf_model(ids).logits
    b, _ = chimera_model(ids)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@torch.no_grad()
def greedy_both(hf_model, chimera_model, vocab: int, n: int = 24, seed: int = 2
                ) -> tuple[list[int], list[int], list[int]]:
    """(HF greedy, Chimera greedy with the KV cache, Chimera greedy without it) for one prompt."""
    prompt = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(seed))
    hf = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
    cached = chimera_model.generate(prompt, n, temperature=0.0)
    uncached = chimera_model.generate(prompt, n, temperature=0.0, use_cache=False)
    return hf[0].tolist(), cached[0].tolist(), uncached[0].tolist()
