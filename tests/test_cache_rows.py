"""Per-row cache positions (continuous batching): rows of one batch at different lengths,
a right-padded batched prefill, and per-row decoding give each row exactly the logits of its
own full forward pass — for every attention x position type, a heterogeneous stack, and
sliding-window (ring-buffer) layers, whose right-padded prefill must not keep the pads."""
from __future__ import annotations

import pytest
import torch

from models.attention.cache import causal_mask
from test_generation import CASES, KNOBS, V, BLOCK, build, build_knob, hetero, local_global


def _padded_prefill_then_decode(m, seqs, prefix_lens):
    """Prefill row b with seqs[b][:prefix_lens[b]] (right-padded batch, per-row starts 0),
    then decode the rest one token per step with per-row starts; returns the logits per row
    per position (list of lists of (V,) tensors), from position prefix_len-1 on."""
    B = len(seqs)
    cache = m.new_cache(B)
    T = max(prefix_lens)
    idx = torch.zeros(B, T, dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, prefix_lens)):
        idx[b, :n] = s[:n]
    lens = torch.tensor(prefix_lens)
    logits = m.next_logits(idx, cache, torch.zeros(B, dtype=torch.long), last=lens - 1)
    got = [[logits[b]] for b in range(B)]
    pos = lens.clone()
    while True:
        live = [b for b in range(B) if pos[b] < len(seqs[b])]
        if not live:
            return got
        # rows that are done keep decoding a dummy token at a valid position (ignored)
        start = torch.tensor([min(int(pos[b]), BLOCK - 1) for b in range(B)])
        tok = torch.tensor([[int(seqs[b][pos[b]]) if b in live else 0] for b in range(B)])
        out = m.next_logits(tok, cache, start)
        for b in live:
            got[b].append(out[b])
            pos[b] += 1


@pytest.mark.parametrize("attn,pos_emb", CASES)
def test_per_row_positions_match_full_forward(attn, pos_emb):
    m = build(attn=attn, pos_emb=pos_emb)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in (BLOCK, 9, 13)]
    got = _padded_prefill_then_decode(m, seqs, [3, 7, 1])
    for b, s in enumerate(seqs):
        full = m(s.unsqueeze(0))[0][0]                              # (T, V)
        first = [3, 7, 1][b] - 1
        torch.testing.assert_close(torch.stack(got[b]), full[first:])


@pytest.mark.parametrize("pos_emb", ["rope", "sin"])
def test_per_row_positions_heterogeneous(pos_emb):
    m = hetero(pos_emb)
    g = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in (11, 16, 5)]
    got = _padded_prefill_then_decode(m, seqs, [2, 10, 5])
    for b, s in enumerate(seqs):
        full = m(s.unsqueeze(0))[0][0]
        torch.testing.assert_close(torch.stack(got[b]), full[[2, 10, 5][b] - 1:])


def test_stale_entries_of_a_reused_row_are_not_seen():
    """A row that held a longer sequence before is reused for a shorter one: its old keys
    past the new row's position must be masked out."""
    m = build(attn="gqa")
    g = torch.Generator().manual_seed(1)
    old, new = torch.randint(0, V, (1, 12), generator=g), torch.randint(0, V, (1, 4), generator=g)
    cache = m.new_cache(1)
    m.next_logits(old, cache, torch.zeros(1, dtype=torch.long))
    got = m.next_logits(new, cache, torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(got, m(new)[0][:, -1])


def test_rows_view_shares_buffers_and_copy_row_moves_a_row():
    m = build(attn="mla")
    cache = m.new_cache(3)
    x = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(2))
    m.next_logits(x, cache.rows(2, 3), torch.zeros(1, dtype=torch.long))
    cache.copy_row(2, 0, 6)
    nxt = torch.tensor([[5]])
    got = m.next_logits(nxt, cache.rows(0, 1), torch.tensor([6]))
    torch.testing.assert_close(got, m(torch.cat([x, nxt], 1))[0][:, -1])


def test_per_row_mask_shape_and_errors():
    mask = causal_mask(2, torch.tensor([0, 3]), "cpu")
    assert mask.shape == (2, 1, 2, 5)
    assert mask[0, 0].tolist() == [[True, False, False, False, False], [True, True, False, False, False]]
    assert mask[1, 0, 1].tolist() == [True] * 5
    m = build(attn="gqa")
    with pytest.raises(ValueError, match="exceeds block_size"):
        m.next_logits(torch.zeros(2, 2, dtype=torch.long), m.new_cache(2), torch.tensor([0, BLOCK - 1]))
    with pytest.raises(ValueError, match="per-row starts need a cache"):
        m.next_logits(torch.zeros(2, 1, dtype=torch.long), None, torch.tensor([0, 1]))


@pytest.mark.parametrize("model", ["window3_gqa", "window4_mqa_alibi", "local_global_rope",
                                   "local_global_alibi"])
def test_per_row_positions_windows(model):
    """Prompts longer than the window, padded past it (row 2: 1 token + 6 pads over a ring of 3)."""
    m = local_global(model.rsplit("_", 1)[1]) if model.startswith("local") else build_knob(model)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in (BLOCK, 9, 13)]
    got = _padded_prefill_then_decode(m, seqs, [3, 7, 1])
    for b, s in enumerate(seqs):
        full = m(s.unsqueeze(0))[0][0]
        torch.testing.assert_close(torch.stack(got[b]), full[[3, 7, 1][b] - 1:])


def test_copy_row_moves_a_ring_row():
    m = build_knob("window3_gqa")
    cache = m.new_cache(3)
    assert cache.layers[0]["k"].shape[1] == 3                       # W slots, not block_size
    x = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(2))
    m.next_logits(x, cache.rows(2, 3), torch.zeros(1, dtype=torch.long))
    cache.copy_row(2, 0, 6)
    nxt = torch.tensor([[5]])
    got = m.next_logits(nxt, cache.rows(0, 1), torch.tensor([6]))
    torch.testing.assert_close(got, m(torch.cat([x, nxt], 1))[0][:, -1])
