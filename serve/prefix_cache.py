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
prompt (echo), the final hidden states (B, C) of its positions and its prompt scores of the
block's tokens 1..B-1 (with its k). A later request scored with the same k reuses those
scores; a block's last position predicts the next block's first token, which its key does not
cover, so that one score (and every score, for another k) is computed from the stored hidden
states with the LM head, as if the request had prefilled them (only the pass that produced
the hidden states differs, so the scores agree to float rounding). A scored request only
reuses blocks that hold hidden states.

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

from serve.logprobs import MAX_LOGPROBS, TokenLogprob

DEFAULT_BLOCK_TOKENS = 16


@dataclass(eq=False)
class Block:
    kv: list[dict[str, torch.Tensor]]      # per layer: name -> (B, *per-position shape)
    hidden: torch.Tensor | None            # (B, C) final hidden states, when it was scored
    nbytes: int
    scores: tuple[int, list[TokenLogprob]] | None = None   # (k, scores of its tokens 1..B-1)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _score_bytes(block_tokens: int, k: int) -> int:
    """What a block's stored prompt scores count against the budget: the numbers they hold
    (token, logprob and k+1 (id, logprob) pairs per token, 8 bytes each), not Python's
    object overhead."""
    return (block_tokens - 1) * (2 + 2 * (k + 1)) * 8


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
        self.block_bytes = (block_tokens * (per_tok + hidden_dim) * t0.element_size()
                            + _score_bytes(block_tokens, MAX_LOGPROBS))
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

    def expected_hit(self, keys: list[bytes], n: int, coming: set[bytes]) -> int:
        """Prompt tokens of a window of n tokens that a prefill will likely not feed: its
        leading blocks cached now or in `coming` (stored by earlier newcomers of the same
        step). An estimate for the scheduler's prefill budget (no LRU touch)."""
        m = 0
        while m < len(keys) and (keys[m] in self.blocks or keys[m] in coming):
            m += 1
        return min(m * self.B, n - 1)

    def count(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit

    def load(self, blocks: list[Block], cache, row: int, n: int, k: int | None = None
             ) -> tuple[torch.Tensor | None, list[TokenLogprob | None] | None]:
        """Copy positions [0, n) of the chain `blocks` into row `row` of `cache`. Returns their
        hidden states (n, C) when every block holds them (else None) and, for a prompt scored
        with k, the stored score of token t+1 for each position t < n (None where a block did
        not store it with this k, and at each block's last position: its target lies past the
        block)."""
        for i, layer in enumerate(cache.layers):
            for name, t in layer.items():
                t[row, :n] = torch.cat([b.kv[i][name] for b in blocks])[:n]
        if not all(b.hidden is not None for b in blocks):
            return None, None
        known: list[TokenLogprob | None] = []
        for b in blocks:
            got = b.scores[1] if b.scores is not None and b.scores[0] == k else [None] * (self.B - 1)
            known += got + [None]
        return torch.cat([b.hidden for b in blocks])[:n], known[:n]

    def insert(self, keys: list[bytes], cache, row: int, hidden: torch.Tensor | None = None,
               scores: tuple[int, list] | None = None) -> None:
        """Store the full blocks of row `row` (prefilled: positions [0, len(keys) * B) hold its
        window) that are missing, or that lack hidden states `hidden` (T, C) can give, with
        its prompt scores (k, [None, score of token 1, ...]) when it was scored. Room is
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
            sc = None if scores is None else (scores[0], scores[1][a + 1:b])
            blk = Block(kv, h, sum(_nbytes(t) for d in kv for t in d.values()) + _nbytes(h)
                        + (0 if sc is None else _score_bytes(self.B, sc[0])), sc)
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
