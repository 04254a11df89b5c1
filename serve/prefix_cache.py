"""Prefix caching for the serving engine: KV entries of prompt blocks that earlier requests
prefilled, reused by later requests whose prompts start with the same tokens.

    pc = PrefixCache(runner.cache, max_bytes=64 << 20, block_tokens=16, hidden_dim=n_embd)
    keys = pc.keys(window)                       # one chained key per full block of the window
    blocks = pc.match(keys, need_hidden=False)   # the cached blocks the window starts with
    pc.load(blocks, cache, row, n)               # their first n positions -> that cache row
    ...                                          # prefill the rest of the window at position n
    pc.insert(keys, cache, row, hidden)          # its full blocks, for the next requests

Keys. Block i of a window covers tokens [i*B, (i+1)*B); its key is sha256(key of block i-1 +
the block's tokens), so a key stands for the whole prefix 0..(i+1)*B (a 256-bit hash: a
collision, which would serve another prefix's entries, is not a practical concern).

What a block holds: for every layer, the entries models/attention/cache.py keeps per position
(GQA/MQA/MHA: k and v, (B, K, D) each; MLA: the latent c_kv (B, Lkv) and the rope key (B, R)),
copied out of a cache row after its prefill; and, when the request that prefilled it scored its
prompt (echo), the final hidden states (B, C) of its positions, from which a later scored
request computes the prefix's prompt logprobs with the LM head exactly as if it had prefilled
them (the LM head and log-softmax run on the same rows; only the pass that produced the hidden
states differs, so the scores agree to float rounding). A scored request only reuses blocks
that hold hidden states.

Why reuse is exact: with full (non-windowed) attention the entry of position p depends only on
tokens 0..p and on p itself, whatever the position type — RoPE rotates keys by their own
position, learned/sinusoidal embeddings add the position's vector before the first layer, and
ALiBi's bias lives in the mask, not in the cache. A sliding-window (ring-buffer) layer keeps
only its last W positions after a prefill, so a row cannot hand on the entries of a block that
left its ring, and a ring's slot layout depends on the prompt's length: a model with ANY
windowed layer does not use the prefix cache (`supports` says why; the engine bypasses it).

Budget: the blocks' tensors (and hidden states) count against `max_bytes`; inserting past it
evicts the least recently used blocks first. A match touches its chain from the last block to
the first, so a prefix's deeper blocks are evicted before the blocks they extend.

Counters (vLLM's): `queries` prompt tokens looked up, `hits` of them served from the cache.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

DEFAULT_BLOCK_TOKENS = 16


@dataclass(eq=False)
class Block:
    kv: list[dict[str, torch.Tensor]]      # per layer: name -> (B, *per-position shape)
    hidden: torch.Tensor | None            # (B, C) final hidden states, when it was scored
    nbytes: int


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def supports(model) -> str | None:
    """None if the prefix cache can serve this model, else why not (a windowed layer)."""
    windowed = [i for i, b in enumerate(model.blocks) if b.attn.cache_len < model.cfg.block_size]
    if windowed:
        return (f"layers {windowed} use sliding-window ring buffers, whose entries of a prefix "
                f"are not all kept after a prefill")
    return None


def waves(keys: list[list[bytes]]) -> list[int]:
    """Newcomers of one step in the order they prefill: 0 for a row whose first block no
    earlier newcomer shares, 1 for the others (they prefill after wave 0 has stored its
    blocks, and find them). The scheduler puts wave 0 first, so each wave is one run of rows."""
    first: set[bytes] = set()
    out = []
    for k in keys:
        out.append(1 if k and k[0] in first else 0)
        if k:
            first.add(k[0])
    return out


class PrefixCache:
    def __init__(self, cache, max_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 hidden_dim: int = 0):
        """`cache`: the engine's KVCache (its layout, dtype and device); `hidden_dim`: n_embd."""
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"prefix_block_tokens must be an int >= 1, got {block_tokens!r}")
        if block_tokens > cache.max_len:
            raise ValueError(f"prefix_block_tokens={block_tokens} exceeds block_size={cache.max_len}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"prefix_cache_bytes must be an int >= 1 (0 turns the prefix cache "
                             f"off in the engine), got {max_bytes!r}")
        t0 = cache.layers[0][next(iter(cache.layers[0]))]
        per_tok = sum(t[0, 0].numel() for layer in cache.layers for t in layer.values())
        self.block_bytes = block_tokens * (per_tok + hidden_dim) * t0.element_size()
        if max_bytes < self.block_bytes:
            raise ValueError(f"prefix_cache_bytes={max_bytes} holds no block: one block of "
                             f"{block_tokens} tokens takes up to {self.block_bytes} bytes")
        self.B, self.max_bytes = block_tokens, max_bytes
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()   # least recently used first
        self.nbytes = 0
        self.queries = self.hits = 0       # prompt tokens looked up / served from the cache
        self.evictions = 0                 # blocks dropped for the budget

    def keys(self, tokens: list[int]) -> list[bytes]:
        """The chained key of every full block of `tokens`."""
        out, prev = [], b""
        for a in range(0, len(tokens) - self.B + 1, self.B):
            h = hashlib.sha256(prev)
            h.update(array("q", tokens[a:a + self.B]).tobytes())
            prev = h.digest()
            out.append(prev)
        return out

    def match(self, keys: list[bytes], need_hidden: bool = False) -> list[Block]:
        """The cached blocks that `keys` start with (all holding hidden states if asked)."""
        got = []
        for k in keys:
            b = self.blocks.get(k)
            if b is None or (need_hidden and b.hidden is None):
                break
            got.append(b)
        for k in reversed(keys[:len(got)]):            # the chain's first block most recent
            self.blocks.move_to_end(k)
        return got

    def count(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit

    @staticmethod
    def load(blocks: list[Block], cache, row: int, n: int) -> torch.Tensor | None:
        """Copy positions [0, n) of the chain `blocks` into row `row` of `cache`; returns their
        hidden states (n, C) when every block holds them (else None)."""
        for i, layer in enumerate(cache.layers):
            for name, t in layer.items():
                t[row, :n] = torch.cat([b.kv[i][name] for b in blocks])[:n]
        if all(b.hidden is not None for b in blocks):
            return torch.cat([b.hidden for b in blocks])[:n]
        return None

    def insert(self, keys: list[bytes], cache, row: int, hidden: torch.Tensor | None = None) -> None:
        """Store the full blocks of row `row` (prefilled: positions [0, len(keys) * B) hold its
        window) that are missing, or that lack hidden states `hidden` (T, C) can give. Room is
        made by evicting other prefixes' blocks, least recently used first, never this chain's
        own: past the budget its deeper blocks are not stored."""
        mine = set(keys)
        for i, k in enumerate(keys):
            old = self.blocks.get(k)
            if old is not None and (old.hidden is not None or hidden is None):
                continue
            a, b = i * self.B, (i + 1) * self.B
            kv = [{name: t[row, a:b].clone() for name, t in layer.items()} for layer in cache.layers]
            h = None if hidden is None else hidden[a:b].clone()
            blk = Block(kv, h, sum(_nbytes(t) for d in kv for t in d.values()) + _nbytes(h))
            if old is not None:
                self._drop(k)
            while self.nbytes + blk.nbytes > self.max_bytes:
                lru = next((x for x in self.blocks if x not in mine), None)
                if lru is None:             # only this chain is left: keep its first blocks
                    break
                self._drop(lru)
                self.evictions += 1
            if self.nbytes + blk.nbytes > self.max_bytes:
                break
            self.blocks[k] = blk
            self.nbytes += blk.nbytes
        present = [k for k in keys if k in self.blocks]
        for k in reversed(present):
            self.blocks.move_to_end(k)

    def _drop(self, key: bytes) -> None:
        self.nbytes -= self.blocks.pop(key).nbytes
