"""KV cache: one preallocated buffer set per layer, shared by every layer of the model.

Each attention module says what it caches (`cache_shapes`): GQA/MQA/MHA keep K and V per KV
head, MLA keeps its compressed latent c_kv and the shared RoPE key. A layer's buffers hold
`max_len` positions (the model's block_size), or fewer for a sliding-window layer (its
`cache_len`, below), so the allocated bytes are exactly
`batch * max_len * model.kv_cache_bytes_per_token(dtype)`.

Ring buffers. A sliding-window layer with window W < block_size keeps only its last W positions:
buffers of W slots per row, position p in slot p % W. A pass reads the ring as it was before
the pass (`ring_positions` says which position each slot holds; empty slots are negative),
attends over those keys plus its own fresh ones, then `ring_write` stores the last W of its
fresh positions (only positions before `ends`, for a right-padded prefill: pads never evict
a kept entry).

Positions. A forward pass with T new tokens writes them at `start`, which is either
  * an int shared by the whole batch (models/generation.py): the cache holds positions
    [0, length) and a pass writes [length, length + T), then advances `length`; or
  * per-row starts, a (B,) integer tensor (continuous batching, serve/model_runner.py): row b writes
    positions start[b] .. start[b]+T-1 and its queries see keys 0 .. their own position only
    (a per-row causal mask), so rows of different lengths share one batch. Keys a row has not
    written yet (stale entries of a previous request, padding) sit after its queries and are
    masked; a right-padded prefill writes pads there, which later tokens overwrite.
Sliding past block_size is the context-window rule's concern (models/context.py): it resets the cache
and re-prefills the window.

Static-shape decoding (models/decode.py): one token per row at positions pos (B,) is stored with
`write_slots` (an in-place index_put_, no slicing, no host sync) and then attends over every slot
of the buffer with a mask built from pos, so every step has the same shapes.
"""
from __future__ import annotations

import torch

from models.positions import position_ids


class KVCache:
    def __init__(self, layer_shapes: list[dict[str, tuple[int, ...]]], batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str | None = None,
                 layer_lens: list[int] | None = None):
        self.batch, self.max_len = batch, max_len
        # layer_shapes[i][name] is the per-(batch, position) shape, e.g. {"k": (n_kv, hd)};
        # layer_lens[i] the positions layer i keeps (default max_len; fewer: a ring buffer)
        lens = layer_lens if layer_lens is not None else [max_len] * len(layer_shapes)
        self.layers: list[dict[str, torch.Tensor]] = [
            {name: torch.zeros((batch, n, *shape), dtype=dtype, device=device)
             for name, shape in shapes.items()}
            for shapes, n in zip(layer_shapes, lens)
        ]
        self.length: int | torch.Tensor = 0

    def reset(self) -> None:
        """Forget the cached positions (the buffers are reused, not reallocated)."""
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    def rows(self, lo: int, hi: int) -> "KVCache":
        """A cache over rows [lo, hi) that shares this cache's buffers (writes go through)."""
        view = KVCache.__new__(KVCache)
        view.batch, view.max_len, view.length = hi - lo, self.max_len, 0
        view.layers = [{k: t[lo:hi] for k, t in layer.items()} for layer in self.layers]
        return view

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy positions [0, length) of row src into row dst (compacting a batch); a ring
        buffer of W slots holds them in slots [0, min(length, W))."""
        for layer in self.layers:
            for t in layer.values():
                n = min(length, t.size(1))
                t[dst, :n] = t[src, :n]

    @staticmethod
    def write(buf: torch.Tensor, new: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Store new (B, T, ...) at positions start.. of buf; return buf[:, :end] where end is
        one past the last position written (the largest over rows for per-row starts)."""
        T = new.size(1)
        if isinstance(start, torch.Tensor):
            pos = position_ids(start, T, buf.device)                # (B, T)
            end = int(pos.max()) + 1
            if int(pos.min()) < 0 or end > buf.size(1):
                raise ValueError(f"KV cache overflow: positions up to {end - 1} do not fit "
                                 f"in a cache of {buf.size(1)} positions")
            buf[torch.arange(buf.size(0), device=buf.device).unsqueeze(1), pos] = new
            return buf[:, :end]
        if start + T > buf.size(1):
            raise ValueError(f"KV cache overflow: positions {start}..{start + T - 1} do not fit "
                             f"in a cache of {buf.size(1)} positions")
        buf[:, start:start + T] = new
        return buf[:, :start + T]


def write_slots(buf: torch.Tensor, new: torch.Tensor, slot: torch.Tensor,
                valid: torch.Tensor | None = None) -> None:
    """Store new (B, ...) at slot[b] of row b of buf (B, S, ...), in place, with no host sync;
    a row with valid[b] False keeps its entry (a padding row of a bucketed batch)."""
    rows = torch.arange(buf.size(0), device=buf.device)                     # (B,)
    if valid is not None:
        keep = valid.view(-1, *([1] * (new.dim() - 1)))
        new = torch.where(keep, new, buf[rows, slot])
    buf.index_put_((rows, slot), new)


def _row_starts(start: int | torch.Tensor, batch: int, device) -> torch.Tensor:
    if isinstance(start, torch.Tensor):
        return start.to(device)
    return torch.full((batch,), start, dtype=torch.long, device=device)


def ring_positions(start: int | torch.Tensor, slots: int, device) -> torch.Tensor:
    """The position each slot of a ring of `slots` holds before a pass writing at `start`: the
    newest p < start with p % slots == s, i.e. positions start-slots .. start-1; negative = empty.
    (slots,) for an int start, (B, slots) for per-row starts."""
    st = torch.as_tensor(start, device=device).unsqueeze(-1)                # (1,) or (B, 1)
    s = torch.arange(slots, device=device)
    return st - 1 - torch.remainder(st - 1 - s, slots)


def ring_write(buf: torch.Tensor, new: torch.Tensor, start: int | torch.Tensor,
               ends: torch.Tensor | None = None) -> None:
    """Store new (B, T, ...), the entries of positions start..start+T-1, in the ring buf
    (B, W, ...): of each row's positions before ends[b] (default start+T) only the last W, at
    slot p % W. One vectorised select, no host sync: slot s takes the newest such position
    p, if the pass wrote it (p >= start), and keeps its entry otherwise."""
    B, W = buf.shape[:2]
    T = new.size(1)
    st = _row_starts(start, B, buf.device)                                  # (B,)
    end = st + T if ends is None else ends.to(buf.device)                   # (B,)
    p = ring_positions(end, W, buf.device)                                  # (B, W) newest < end
    j = p - st.unsqueeze(1)                                                 # index into new
    take = (j >= 0).view(B, W, *([1] * (buf.dim() - 2)))
    rows = torch.arange(B, device=buf.device).unsqueeze(1)
    buf.copy_(torch.where(take, new[rows, j.clamp(0, T - 1)], buf))


def causal_mask(T: int, start: int | torch.Tensor, device) -> torch.Tensor | None:
    """Boolean mask for T queries at positions start.. over keys 0..end-1: (T, start+T) for an
    int start, (B, 1, T, end) for per-row starts (end = max over rows, broadcast over heads).

    None when no mask is needed (a single query sees everything before it) or when plain
    `is_causal` applies (start == 0); SDPA's is_causal aligns top-left, so a prefix needs this.
    Per-row starts always get a mask: a row must not see keys past its own position.
    """
    if isinstance(start, torch.Tensor):
        q = position_ids(start, T, device)                                 # (B, T)
        k = torch.arange(int(q.max()) + 1, device=device)                  # (S,)
        return (k <= q.unsqueeze(-1)).unsqueeze(1)                         # (B, 1, T, S)
    if T == 1 or start == 0:
        return None
    q = torch.arange(start, start + T, device=device).unsqueeze(1)       # (T, 1)
    k = torch.arange(start + T, device=device).unsqueeze(0)              # (1, S)
    return k <= q
