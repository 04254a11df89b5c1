"""KV cache: one preallocated buffer set per layer, shared length for the whole model.

Each attention module says what it caches (`cache_shapes`): GQA/MQA/MHA keep K and V per KV
head, MLA keeps its compressed latent c_kv and the shared RoPE key. Buffers hold `max_len`
positions (the model's block_size), so the allocated bytes are exactly
`batch * max_len * model.kv_cache_bytes_per_token(dtype)`.

The cache holds positions [0, length). A forward pass with T new tokens writes positions
[length, length + T) and then advances `length`. Sliding past block_size is the model's
concern (see models/generation.py): it resets the cache and re-prefills the window.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layer_shapes: list[dict[str, tuple[int, ...]]], batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        self.batch, self.max_len = batch, max_len
        # layer_shapes[i][name] is the per-(batch, position) shape, e.g. {"k": (n_kv, hd)}
        self.layers: list[dict[str, torch.Tensor]] = [
            {name: torch.zeros((batch, max_len, *shape), dtype=dtype, device=device)
             for name, shape in shapes.items()}
            for shapes in layer_shapes
        ]
        self.length = 0

    def reset(self) -> None:
        """Forget the cached positions (the buffers are reused, not reallocated)."""
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    @staticmethod
    def write(buf: torch.Tensor, new: torch.Tensor, start: int) -> torch.Tensor:
        """Store new (B, T, ...) at positions [start, start+T) of buf; return buf[:, :start+T]."""
        T = new.size(1)
        if start + T > buf.size(1):
            raise ValueError(f"KV cache overflow: positions {start}..{start + T - 1} do not fit "
                             f"in a cache of {buf.size(1)} positions")
        buf[:, start:start + T] = new
        return buf[:, :start + T]


def causal_mask(T: int, start: int, device) -> torch.Tensor | None:
    """Boolean (T, start+T) mask for T queries at positions start.. over keys 0..start+T-1.

    None when no mask is needed (a single query sees everything before it) or when plain
    `is_causal` applies (start == 0); SDPA's is_causal aligns top-left, so a prefix needs this.
    """
    if T == 1 or start == 0:
        return None
    q = torch.arange(start, start + T, device=device).unsqueeze(1)       # (T, 1)
    k = torch.arange(start + T, device=device).unsqueeze(0)              # (1, S)
    return k <= q
