"""MoE layer: parity with a naive per-token reference, the two balancers, and the bias sync
across data-parallel ranks (two gloo processes).

Run: .venv/bin/python -m pytest tests/test_moe.py -q
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.config import FFNConfig
from models.ffn.activations import activation
from models.ffn.moe import MoE, _count

C = 16


def make(aux_free: bool, n_shared: int = 1, act: str = "gelu", n_exp: int = 6, n_act: int = 3,
         up_dim: int = 8, seed: int = 0, std: float = 0.5, **bal) -> MoE:
    """A float64 MoE with O(1) weights, so routing decisions are clear and outputs not tiny."""
    if aux_free:
        bal = {"alpha": 0.01, "gamma": 0.01, **bal}
    else:
        bal = {"coeff": 0.02, **bal}
    cfg = FFNConfig(moe=True, up_dim=up_dim, non_linearity=act, n_exp=n_exp, n_shared=n_shared,
                    n_act=n_act, aux_free=aux_free, **bal)
    torch.manual_seed(seed)
    m = MoE(C, cfg).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, std)
    return m


# --- the naive reference: a loop over tokens and the experts each one picked -------------------
def naive(m: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, _ = x.shape
    E, k = m.n_routed, m.top_k
    act = activation(m.cfg.non_linearity)
    expert = lambda v, up, down: act(v @ up) @ down                        # noqa: E731
    rows, picks, probs = [], [], []
    for b in range(B):
        for t in range(T):
            v = x[b, t]
            logits = m.router.weight @ v                                    # (E,)
            if m.aux_free:
                s = torch.sigmoid(logits)
                key = (s + m.bias).tolist()                                 # bias: choice only
            else:
                s = torch.softmax(logits, dim=0)
                key = s.tolist()
            sel = sorted(range(E), key=lambda i: -key[i])[:k]
            y = torch.zeros_like(v)
            for j in range(m.n_shared):
                y = y + expert(v, m.shared_up[j], m.shared_down[j])
            norm = sum(s[i] for i in sel)
            for i in sel:
                y = y + (s[i] / norm) * expert(v, m.w_up[i], m.w_down[i])
            rows.append(y)
            picks.append(sel)
            probs.append(s)
    return torch.stack(rows).view_as(x), naive_aux(m, picks, probs, B, T)


def naive_aux(m: MoE, picks: list[list[int]], probs: list[torch.Tensor], B: int, T: int):
    E, k = m.n_routed, m.top_k
    if not m.aux_free:        # Switch: coeff * E * sum_i f_i P_i over the whole batch
        total = 0.0
        for i in range(E):
            f_i = sum(sel.count(i) for sel in picks) / (len(picks) * k)
            p_i = sum(s[i] for s in probs) / len(probs)
            total = total + f_i * p_i
        return m.cfg.coeff * E * total
    seqs = []                 # DeepSeek-V3 sequence-wise loss, averaged over sequences
    for b in range(B):
        sl = range(b * T, (b + 1) * T)
        total = 0.0
        for i in range(E):
            f_i = E / (k * T) * sum(picks[n].count(i) for n in sl)
            p_i = sum(probs[n][i] / probs[n].sum() for n in sl) / T
            total = total + f_i * p_i
        seqs.append(total)
    return m.cfg.alpha * sum(seqs) / B


def _loss_and_grads(m: MoE, fn, x: torch.Tensor, gy: torch.Tensor):
    y, aux = fn(m, x)
    loss = (y * gy).sum() + 3.0 * aux
    params = [x] + list(m.parameters())
    return y, aux, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("n_shared", [0, 2])
@pytest.mark.parametrize("aux_free", [False, True])
def test_matches_naive_reference_values_and_grads(aux_free, n_shared, act):
    m = make(aux_free, n_shared=n_shared, act=act, n_exp=n_shared + 5, n_act=n_shared + 2).train()
    if aux_free:   # a bias large enough to change some choices, so "bias picks only" is tested
        m.bias.copy_(torch.randn(m.n_routed, generator=torch.Generator().manual_seed(1)) * 0.3)
    torch.manual_seed(2)
    x = torch.randn(2, 5, C, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 5, C, dtype=torch.float64)
    if aux_free:   # the bias really changed some choices
        idx_b = m.route(x.detach().view(-1, C))[0]
        s = torch.sigmoid(x.detach().view(-1, C) @ m.router.weight.t())
        assert not torch.equal(idx_b.sort(1).values, s.topk(m.top_k, 1).indices.sort(1).values)
    y, aux, grads = _loss_and_grads(m, lambda mod, v: mod(v), x, gy)
    y_ref, aux_ref, grads_ref = _loss_and_grads(m, naive, x, gy)
    assert y.shape == (2, 5, C) and aux.shape == ()
    assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(aux, torch.as_tensor(aux_ref, dtype=aux.dtype), rtol=1e-10, atol=1e-14)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12), name


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
@pytest.mark.parametrize("act", ["relu", "glu"])
def test_grouped_kernel_matches_loop_kernel(act):
    """The torch._grouped_mm path (used on CUDA) computes the same numbers as the loop path."""
    m = make(False, n_shared=1, act=act, n_exp=7, n_act=3, std=0.3).float()
    x = torch.randn(3, 6, C, requires_grad=True)
    gy = torch.randn(3, 6, C)
    out = {}
    for impl in ("loop", "grouped"):
        m.impl = impl
        out[impl] = _loss_and_grads(m, lambda mod, v: mod(v), x, gy)
    (y0, a0, g0), (y1, a1, g1) = out["loop"], out["grouped"]
    assert torch.allclose(y0, y1, atol=1e-5) and torch.allclose(a0, a1)
    for p, q in zip(g0, g1):
        assert torch.allclose(p, q, atol=1e-5)


def test_shapes_backward_and_standalone_init():
    cfg = FFNConfig(moe=True, up_dim=24, non_linearity="swiglu", n_exp=5, n_shared=1, n_act=3,
                    aux_free=False, coeff=0.01)
    torch.manual_seed(0)
    m = MoE(C, cfg, dropout=0.1).train()
    assert m.w_up.shape == (4, C, 48) and m.w_down.shape == (4, 24, C)          # stacked
    assert m.shared_up.shape == (1, C, 48) and m.router.weight.shape == (4, C)
    for name in MoE._residual_params:        # the GPT-2 init looks these attributes up
        assert isinstance(getattr(m, name), torch.nn.Parameter)
    assert abs(m.w_up.std().item() - 0.02) < 0.002
    x = torch.randn(2, 5, C, requires_grad=True)
    y, aux = m(x)
    assert y.shape == (2, 5, C) and aux.shape == () and aux.requires_grad
    (y.square().sum() + aux).backward()
    assert x.grad.shape == x.shape
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    m0 = MoE(C, FFNConfig(moe=True, up_dim=8, non_linearity="relu", n_exp=3, n_shared=0,
                          n_act=1, aux_free=True, alpha=0.0, gamma=0.1))
    assert m0.shared_up is None and m0.shared_down is None
    assert set(m0.state_dict()) == {"w_up", "w_down", "bias", "router.weight"}


# --- loss-free balancing: the bias ---------------------------------------------------------------
def one_hot_router(gamma: float = 0.25) -> MoE:
    """4 routed experts, top-1: token e_j (a basis vector) always picks expert j."""
    m = make(True, n_shared=0, n_exp=4, n_act=1, gamma=gamma, alpha=0.0).train()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[:, :4] = 10.0 * torch.eye(4)
    return m


def tokens(*experts: int) -> torch.Tensor:
    """One sequence whose t-th token routes to experts[t] under one_hot_router()."""
    x = torch.zeros(1, len(experts), C, dtype=torch.float64)
    for t, e in enumerate(experts):
        x[0, t, e] = 1.0
    return x


def test_idle_experts_get_exact_zero_grads():
    m = one_hot_router()
    m(tokens(0, 1, 1, 0))[0].square().sum().backward()        # experts 2 and 3 get no token
    for name in ("w_up", "w_down"):
        g = getattr(m, name).grad
        assert torch.equal(g[2:], torch.zeros_like(g[2:])) and g[:2].abs().sum() > 0, name


def test_autocast_bf16_runs_in_bf16_and_stays_close():
    m = make(False, n_shared=1, act="swiglu", n_exp=5, n_act=3, std=0.2).float()
    x = torch.randn(2, 6, C, requires_grad=True)
    y32, _ = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, aux = m(x)
    assert y16.dtype == torch.bfloat16 and aux.dtype == torch.float32   # routing stays fp32
    assert torch.allclose(y16.float(), y32, atol=0.05 * y32.abs().max().item())
    y16.float().square().sum().backward()
    assert m.w_up.grad.dtype == torch.float32 and torch.isfinite(m.w_up.grad).all()


def test_update_bias_rule_on_hand_made_load():
    m = one_hot_router(gamma=0.25)
    m._load_acc = torch.tensor([10, 2, 3, 5])          # mean 5: expert 0 overloaded
    m.update_bias()
    assert m.bias.tolist() == [-0.25, 0.25, 0.25, 0.0]
    st = m.load_stats()
    assert st["load"] == pytest.approx([0.5, 0.1, 0.15, 0.25])
    assert st["maxvio"] == pytest.approx((10 - 5) / 5)
    m.update_bias()                                    # accumulator was reset: nothing to do
    assert m.bias.tolist() == [-0.25, 0.25, 0.25, 0.0]
    assert m.load_stats()["load"] == pytest.approx([0.5, 0.1, 0.15, 0.25])   # last real step's


def test_stats_before_any_step_and_counts_match_bincount():
    m = one_hot_router(gamma=0.25)
    assert m.load_stats() == {"load": [], "maxvio": 0.0}
    m.update_bias()                                    # no forward yet: zero loads, no change
    assert m.bias.tolist() == [0.0] * 4 and m.load_stats() == {"load": [], "maxvio": 0.0}
    ids = torch.randint(0, 7, (500,))
    assert torch.equal(_count(ids, 9), torch.bincount(ids, minlength=9))


def test_update_uses_all_micro_batches_since_last_step():
    m = one_hot_router(gamma=0.25)
    before = m.bias.clone()
    m(tokens(0, 0, 0, 0))                              # micro-batch 1: loads [4, 0, 0, 0]
    m(tokens(1, 1, 2, 3))                              # micro-batch 2: loads [0, 2, 1, 1]
    assert torch.equal(m.bias, before)                 # forward never moves the bias
    m.eval()
    m(tokens(3, 3, 3, 3))                              # eval forwards are not counted
    m.update_bias()
    # summed loads [4, 2, 1, 1], mean 2 (the last micro-batch alone would give [+, -, 0, 0])
    assert m.bias.tolist() == [-0.25, 0.0, 0.25, 0.25]
    assert m.load_stats() == {"load": [0.5, 0.25, 0.125, 0.125], "maxvio": 1.0}


def test_bias_changes_choice_never_gate_values():
    m = make(True, n_shared=1, n_exp=7, n_act=3).eval()
    x = torch.randn(2, 5, C, dtype=torch.float64)
    idx0, gates0, scores = m.route(x.view(-1, C))
    y0, _ = m(x)
    m.bias.fill_(5.0)                                  # same shift for all: same choices
    idx1, gates1, _ = m.route(x.view(-1, C))
    y1, _ = m(x)
    assert torch.equal(idx0, idx1) and torch.equal(gates0, gates1) and torch.equal(y0, y1)
    m.bias.zero_()
    m.bias[0] = 10.0                                   # now every token picks expert 0 ...
    idx2, gates2, _ = m.route(x.view(-1, C))
    assert (idx2 == 0).any(dim=1).all() and not torch.equal(m(x)[0], y0)
    # ... but its gate is its raw affinity share, with no trace of the +10
    s_sel = scores.gather(1, idx2)
    assert torch.allclose(gates2, s_sel / s_sel.sum(1, keepdim=True))


def test_activation_recompute_doubles_counts_without_changing_update():
    from torch.utils.checkpoint import checkpoint
    x = torch.randn(2, 5, C, dtype=torch.float64, requires_grad=True)
    plain, recomp = make(True, gamma=0.1), make(True, gamma=0.1)
    plain(x)[0].sum().backward()
    checkpoint(lambda v: recomp(v)[0], x, use_reentrant=False).sum().backward()
    assert torch.equal(recomp._load_acc, 2 * plain._load_acc)
    plain.update_bias()
    recomp.update_bias()
    assert torch.equal(plain.bias, recomp.bias) and plain.bias.abs().sum() > 0
    assert plain.load_stats() == recomp.load_stats()


# --- aux values and stats -----------------------------------------------------------------------
def test_aux_loss_mode_formula_and_stats():
    m = make(False, n_shared=1, n_exp=7, n_act=3, coeff=0.05).train()
    x = torch.randn(4, 6, C, dtype=torch.float64)
    _, aux = m(x)
    E, k, N = 6, 2, 24
    p = torch.softmax(x.view(N, C) @ m.router.weight.t(), dim=-1)          # (N, E)
    picked = torch.zeros(N, E, dtype=torch.float64).scatter_(1, p.topk(k, dim=1).indices, 1.0)
    f = picked.sum(0) / (N * k)
    assert torch.allclose(aux, 0.05 * E * (f * p.mean(0)).sum())
    assert not hasattr(m, "bias")
    m.update_bias()                                    # aux-loss mode: only publishes stats
    load = picked.sum(0)
    st = m.load_stats()
    assert st["load"] == pytest.approx((load / load.sum()).tolist())
    assert st["maxvio"] == pytest.approx(((load.max() - load.mean()) / load.mean()).item())


def test_aux_free_sequence_loss_formula_and_zero_alpha():
    m = make(True, n_shared=0, n_exp=5, n_act=2, alpha=0.3).train()
    x = torch.randn(3, 4, C, dtype=torch.float64)
    _, aux = m(x)
    s = torch.sigmoid(x @ m.router.weight.t())                             # (B, T, E)
    picked = torch.zeros_like(s).scatter_(2, (s + m.bias).topk(2, dim=2).indices, 1.0)
    f = picked.sum(1) * 5 / (2 * 4)                                        # (B, E)
    P = (s / s.sum(2, keepdim=True)).mean(1)
    assert torch.allclose(aux, 0.3 * (f * P).sum(1).mean())
    m0 = make(True, n_shared=0, n_exp=5, n_act=2, alpha=0.0)
    _, aux0 = m0(x)
    assert aux0.shape == () and aux0.item() == 0.0


def test_bad_configs_are_rejected_with_clear_messages():
    base = dict(moe=True, up_dim=8, non_linearity="gelu", aux_free=False, coeff=0.01)
    with pytest.raises(ValueError, match=r"n_act=1 must be > n_shared=1"):
        FFNConfig(**base, n_exp=4, n_shared=1, n_act=1)
    with pytest.raises(ValueError, match=r"n_exp=1 must be >= 2"):
        FFNConfig(**base, n_exp=1, n_shared=0, n_act=1)
    with pytest.raises(ValueError, match=r"n_act=5 must be .* <= n_exp=4"):
        FFNConfig(**base, n_exp=4, n_shared=0, n_act=5)
    with pytest.raises(ValueError, match=r"aux_free moe uses alpha and gamma"):
        FFNConfig(moe=True, up_dim=8, n_exp=4, n_shared=0, n_act=2, aux_free=True, coeff=0.1)
    with pytest.raises(ValueError, match=r"MoE needs an FFNConfig with moe=True"):
        MoE(C, FFNConfig(up_dim=8))


# --- data parallel: every rank ends with the same bias --------------------------------------------
DIST_STEPS, DIST_MICRO, GAMMA = 4, 2, 0.05


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        cfg = FFNConfig(moe=True, up_dim=8, non_linearity="gelu", n_exp=9, n_shared=1, n_act=3,
                        aux_free=True, alpha=0.001, gamma=GAMMA)
        torch.manual_seed(0)                           # same weights on both ranks
        m = MoE(C, cfg).train()
        with torch.no_grad():
            m.router.weight.normal_(0.0, 1.0)          # decisive, unbalanced routing
        gen = torch.Generator().manual_seed(100 + rank)    # different data on each rank
        loads, biases = [], []
        for _ in range(DIST_STEPS):
            for _ in range(DIST_MICRO):
                m(torch.randn(2, 8, C, generator=gen))[0].sum().backward()
            loads.append(m._load_acc.clone())          # this rank's own counts for the step
            m.update_bias()
            biases.append(m.bias.clone())
        torch.save({"loads": loads, "biases": biases}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_bias_identical_across_gloo_ranks(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    bias = torch.zeros(8)
    local_would_differ = False
    for step in range(DIST_STEPS):
        assert torch.equal(r0["biases"][step], r1["biases"][step])
        summed = (r0["loads"][step] + r1["loads"][step]).double()
        bias += (GAMMA * torch.sign(summed.mean() - summed)).float()
        assert torch.allclose(r0["biases"][step], bias)
        local = [torch.sign(r["loads"][step].double().mean() - r["loads"][step]) for r in (r0, r1)]
        local_would_differ |= not torch.equal(local[0], local[1])
    assert bias.abs().sum() > 0
    assert local_would_differ        # without the all-reduce the ranks would have drifted apart
    assert int(r0["loads"][0].sum()) == DIST_MICRO * 2 * 8 * 2   # micro x B x T x top-k
