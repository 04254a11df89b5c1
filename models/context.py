"""The context-window rule, in one place: what the next forward pass of a sequence feeds, and
where in the KV cache it goes. model.generate (models/generation.py) and the serving engine
(serve/model_runner.py, serve/scheduler.py) both ask `next_input`, so cached, uncached and
served decoding condition on the same tokens.

    feed = next_input(length=len(tokens), cached=cache_positions, block_size=cfg.block_size)
    logits = model.next_logits(tokens[feed.lo:], cache, feed.start)

The model always conditions on the last block_size tokens (a prompt longer than that keeps its
last block_size tokens). With the cache:
  * while the sequence fits in block_size, a pass feeds only what the cache lacks (the whole
    prompt first, then the newest token) at the next free position;
  * once it no longer fits, every pass rebuilds the cache: it feeds the last block_size tokens
    from position 0. That keeps cached decoding exactly equal to uncached decoding, for every
    attention and position type: when the window slides, every kept token's hidden states
    change (its oldest context is gone, and absolute positions shift), so no cached entry
    stays valid. Cost: past block_size each new token costs one block_size-token prefill —
    the same as uncached decoding — instead of one token's worth of work.
Without a cache, `next_input(length, 0, block_size)` is the window every pass feeds.
"""
from __future__ import annotations

from typing import NamedTuple


class Feed(NamedTuple):
    lo: int         # feed tokens[lo:length]
    start: int      # at cache positions start.. ; 0 = the cache is (re)built from scratch


def fits(length: int, block_size: int) -> bool:
    """A sequence of `length` tokens sits in the cache as it is (its window has not slid)."""
    return length <= block_size


def next_input(length: int, cached: int, block_size: int) -> Feed:
    """The next pass of a sequence of `length` tokens, `cached` of them already in its cache
    (0: a new sequence, or no cache)."""
    if fits(length, block_size):
        return Feed(cached, cached)             # only what the cache lacks
    return Feed(length - block_size, 0)         # the window slid: re-prefill it
