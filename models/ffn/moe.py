"""Mixture-of-experts FFN: shared + routed experts, aux-loss or auxiliary-loss-free balancing.

`MoE(n_embd, cfg)` maps (B, T, C) -> ((B, T, C), aux). The first `n_shared` of the `n_exp`
experts see every token (weight 1); the router scores the other `n_routed` and each token goes
to its top-k of them, weighted by gates that sum to 1 (`norm_topk_prob`; else the raw scores),
times `routed_scaling_factor`. With `n_group` > 1 the routed experts form groups of consecutive
experts and a token chooses inside its best `topk_group` groups (DeepSeek's group-limited
routing: a group scores its best expert under softmax routing, its best two under sigmoid).
Each expert is an MLP of width `up_dim` with the layer's activation (gated ones use a 2*up_dim
up-projection, see activations.py).

Balancing (cfg.aux_free):
  False: softmax router, Switch-Transformer aux loss coeff * n_routed * sum_i f_i P_i.
  True:  sigmoid affinities + a per-expert selection bias nudged by `update_bias()` after every
         optimizer step (arXiv 2408.15664, DeepSeek-V3), plus the small sequence-wise loss alpha.

Dispatch is vectorized: the N*k (token, expert) assignments are sorted by expert (argsort,
counts by a scatter-add) so each expert owns a contiguous slice of rows; there is no Python loop
over tokens. Two kernels compute the experts (attribute `impl`, "auto" picks):
  loop    (CPU, float64, fp32 CUDA): a loop over EXPERTS inside two autograd Functions; each
          expert multiplies its own gathered rows and scatter-adds its (gate-scaled) output.
  grouped (CUDA bf16, sm90+): gather all rows once, two torch._grouped_mm calls, index_add_.
On CPU the loop measured faster than both gather-all + torch._grouped_mm and padding to
(E, capacity, C) for torch.bmm: those touch several fresh (N*k, C) buffers per step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from models.config import FFNConfig
from models.ffn.activations import activation, is_gated


# --- expert computation ----------------------------------------------------------------------
# CPU path: one loop over experts (not tokens) inside two autograd Functions. Each expert
# gathers its own rows and scatters its own output, so the (N*k, C) gathered inputs/outputs and
# their gradients are never materialised: on CPU, touching that much fresh memory every step
# (page faults) costs more than the matmuls saved. Weight gradients are written straight into
# their (E, ...) slots, so there is no stack/cat of per-expert pieces either.
class _ExpertsUp(torch.autograd.Function):
    """h[rows of e] = x[tok[rows of e]] @ w[e]; rows sorted by expert, counts[e] rows each."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, tok: Tensor, counts: list[int]) -> Tensor:
        h = x.new_empty(tok.shape[0], w.shape[2])                           # (N*k, W)
        for te, we, he in zip(tok.split(counts), w.unbind(0), h.split(counts)):
            if te.shape[0]:
                torch.mm(x.index_select(0, te), we, out=he)
        ctx.counts = counts
        ctx.save_for_backward(x, w, tok)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, gh: Tensor):
        x, w, tok = ctx.saved_tensors
        gh = gh.contiguous()
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        for e, (te, we, ge) in enumerate(zip(tok.split(ctx.counts), w.unbind(0),
                                             gh.split(ctx.counts))):
            if te.shape[0] == 0:                                         # expert got no rows
                if gw is not None:
                    gw[e].zero_()
                continue
            if gw is not None:
                torch.mm(x.index_select(0, te).t(), ge, out=gw[e])
            if gx is not None:
                gx.index_add_(0, te, ge @ we.t())
        return gx, gw, None, None


class _ExpertsDown(torch.autograd.Function):
    """out[tok[r]] += gate[r] * (a[r] @ w[e]) for the rows r of each expert e: -> (n_tok, C).

    The gate is applied here, per expert on cache-sized pieces, on the narrower side of the
    matmul: a separate (N*k, H) gated copy and its gradients cost more in memory traffic.
    """

    @staticmethod
    def forward(ctx, a: Tensor, gates: Tensor, w: Tensor, tok: Tensor, counts: list[int],
                n_tok: int) -> Tensor:
        out = a.new_zeros(n_tok, w.shape[2])                                # (N, C)
        narrow_h = w.shape[1] <= w.shape[2]
        for te, ae, ge, we in zip(tok.split(counts), a.split(counts), gates.split(counts),
                                  w.unbind(0)):
            if te.shape[0]:
                ge = ge.unsqueeze(1)
                out.index_add_(0, te, (ae * ge) @ we if narrow_h else (ae @ we) * ge)
        ctx.counts = counts
        ctx.save_for_backward(a, gates, w, tok)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor):
        a, gates, w, tok = ctx.saved_tensors
        ga, gg = torch.empty_like(a), torch.empty_like(gates)
        gw = torch.empty_like(w) if ctx.needs_input_grad[2] else None
        narrow_h = w.shape[1] <= w.shape[2]
        for e, (te, ae, ge, we, gae, gge) in enumerate(zip(
                tok.split(ctx.counts), a.split(ctx.counts), gates.split(ctx.counts), w.unbind(0),
                ga.split(ctx.counts), gg.split(ctx.counts))):
            if te.shape[0] == 0:
                if gw is not None:
                    gw[e].zero_()                                        # expert got no rows
                continue
            ge = ge.unsqueeze(1)
            gye = gy.index_select(0, te)                                     # (n, C)
            t = gye @ we.t()                                 # (n, H): d loss / d (gate * a)
            torch.sum(t * ae, dim=1, out=gge)
            torch.mul(t, ge, out=gae)
            if gw is not None:
                if narrow_h:
                    torch.mm((ae * ge).t(), gye, out=gw[e])
                else:
                    torch.mm(ae.t(), gye * ge, out=gw[e])
        return ga, gg, gw, None, None, None


def _native_grouped_mm_ok(x: Tensor, w: Tensor) -> bool:
    """Whether torch._grouped_mm (one fused kernel, no host sync) covers this case: bf16 on
    sm90+ CUDA with 16-byte aligned rows. Elsewhere the per-expert loop is used."""
    return (hasattr(torch, "_grouped_mm") and x.device.type == "cuda"
            and x.dtype == w.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and x.shape[1] % 8 == 0 and w.shape[2] % 8 == 0)


def _count(ids: Tensor, n: int) -> Tensor:
    """(M,) int64 in [0, n) -> (n,) occurrences of each. torch.bincount, but without its host
    sync on CUDA (bincount reads ids.max() to size its output)."""
    return torch.zeros(n, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def _grouped_mm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """(M, K) rows sorted by expert x (E, K, N) -> (M, N) via torch._grouped_mm."""
    return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))


# --- the layer ------------------------------------------------------------------------------
class MoE(nn.Module):
    """(B, T, C) -> ((B, T, C), aux scalar). See the module docstring for the two balancers."""

    # parameters holding residual-stream projections: GPT-2 init scales them by 1/sqrt(2 n_layer)
    _residual_params = ("w_down", "shared_down")

    def __init__(self, n_embd: int, cfg: FFNConfig, dropout: float = 0.0):
        super().__init__()
        if not cfg.moe:
            raise ValueError("MoE needs an FFNConfig with moe=True")
        self.cfg = cfg
        self.n_routed, self.n_shared, self.top_k = cfg.n_routed, cfg.n_shared, cfg.top_k
        self.aux_free = bool(cfg.aux_free)
        H = cfg.up_dim
        W = H * (2 if is_gated(cfg.non_linearity) else 1)        # up-projection width
        self.act = activation(cfg.non_linearity)
        self.router = nn.Linear(n_embd, self.n_routed, bias=False)
        self.w_up = nn.Parameter(torch.empty(self.n_routed, n_embd, W))      # (E, C, W)
        self.w_down = nn.Parameter(torch.empty(self.n_routed, H, n_embd))    # (E, H, C)
        if self.n_shared:
            self.shared_up = nn.Parameter(torch.empty(self.n_shared, n_embd, W))
            self.shared_down = nn.Parameter(torch.empty(self.n_shared, H, n_embd))
        else:
            self.register_parameter("shared_up", None)
            self.register_parameter("shared_down", None)
        if self.aux_free:
            # selection-only bias, identical on every rank: saved with the weights
            self.register_buffer("bias", torch.zeros(self.n_routed), persistent=True)
        self.drop = nn.Dropout(dropout)
        # expert kernels: "auto" = torch._grouped_mm where it has a fast kernel (bf16, sm90+),
        # else the per-expert loop; "grouped"/"loop" force one (tests, benchmarks)
        self.impl = "auto"
        # Per-expert routed-assignment counts since the last update_bias(). A plain attribute,
        # not a buffer: DDP broadcasts buffers from rank 0 every forward, which would overwrite
        # the other ranks' counts before they are all-reduced.
        self._load_acc: Tensor | None = None
        self._last_load: Tensor | None = None      # (n_routed,) loads of the last step
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Standalone init (normal, std 0.02); the model re-inits with its GPT-2 scheme."""
        for p in (self.router.weight, self.w_up, self.w_down, self.shared_up, self.shared_down):
            if p is not None:
                p.normal_(0.0, 0.02)
        if self.aux_free:
            self.bias.zero_()
        self._load_acc = None
        self._last_load = None

    # --- routing ---
    def route(self, x2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, C) -> expert ids (N, k), gates (N, k), scores (N, E_routed).

        scores are softmax probabilities (aux-loss mode) or sigmoid affinities (aux-free);
        gates are the chosen scores, renormalised to sum 1 when cfg.norm_topk_prob, times
        cfg.routed_scaling_factor.
        """
        # route in >= fp32 even under autocast: top-k on bf16 scores ties and flips easily
        dt = torch.promote_types(x2.dtype, torch.float32)
        with torch.autocast(x2.device.type, enabled=False):
            logits = F.linear(x2.to(dt), self.router.weight.to(dt))          # (N, E)
        if self.aux_free:
            scores = torch.sigmoid(logits)
            # the bias only decides WHICH experts are picked; gate values never see it
            choice = scores.detach() + self.bias
        else:
            scores = logits.softmax(dim=-1)
            choice = scores.detach()
        if self.cfg.n_group > 1:
            choice = self._limit_groups(choice)
        idx = torch.topk(choice, self.top_k, dim=-1).indices
        gates = scores.gather(-1, idx)                                       # (N, k)
        if self.cfg.norm_topk_prob:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        if self.cfg.routed_scaling_factor != 1.0:
            gates = gates * self.cfg.routed_scaling_factor
        return idx, gates, scores

    def _limit_groups(self, choice: Tensor) -> Tensor:
        """(N, E) selection scores -> the same with every expert outside the token's best
        topk_group groups set to -inf. A group's score: its best expert (softmax routing,
        DeepSeek-V2) or the sum of its best two (sigmoid routing, DeepSeek-V3)."""
        N, E = choice.shape
        G = self.cfg.n_group
        grouped = choice.view(N, G, E // G)                                  # (N, G, E/G)
        if self.aux_free:
            score = grouped.topk(min(2, E // G), dim=-1).values.sum(dim=-1)  # (N, G)
        else:
            score = grouped.max(dim=-1).values
        keep = torch.zeros_like(score, dtype=torch.bool)
        keep.scatter_(1, score.topk(self.cfg.topk_group, dim=-1).indices, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(N, E)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, C = x.shape
        N, k, E = B * T, self.top_k, self.n_routed
        x2 = x.reshape(N, C)
        idx, gates, scores = self.route(x2)

        # group the N*k (token, expert) assignments by expert
        flat = idx.reshape(-1)                                   # (N*k,) expert of assignment
        order = flat.argsort(stable=True)                        # assignments sorted by expert
        counts = _count(flat, E)                                 # (E,) rows per expert
        tok = order // k                                         # (N*k,) token of each row
        g = gates.reshape(-1).index_select(0, order)             # (N*k,) gate of each row

        # autocast does not see inside the expert kernels: cast by hand, as it would a Linear
        dev = x.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2c, w_up, w_down = x2.to(cdt), self.w_up.to(cdt), self.w_down.to(cdt)
        with torch.autocast(dev, enabled=False):
            if self.impl == "grouped" or (self.impl == "auto" and _native_grouped_mm_ok(x2c, w_up)):
                y = self._experts_grouped(x2c, w_up, w_down, tok, counts, g.to(cdt))
            else:
                cl = counts.tolist()
                h = _ExpertsUp.apply(x2c, w_up, tok, cl)                     # (N*k, W)
                y = _ExpertsDown.apply(self.act(h), g.to(cdt), w_down, tok, cl, N)   # (N, C)

        if self.n_shared:
            y = y + self._shared(x2)
        if self.training:
            self._accumulate(counts)
        return self.drop(y.view(B, T, C)), self._aux(flat, counts, scores, B, T)

    def decode(self, x: Tensor) -> Tensor:
        """The decode step's MoE (models/decode.py): (B, 1, C) -> (B, 1, C), static shapes and
        no host sync (forward's per-expert loop reads counts on the host). With fewer (token,
        expert) pairs than experts it gathers the chosen experts' weights (a batch-1 step reads
        only top_k experts); otherwise every expert runs on every token with zero gates."""
        B, T, C = x.shape
        x2 = x.reshape(B * T, C)
        idx, gates, _ = self.route(x2)                                       # (N, k)
        N, k, E = x2.size(0), self.top_k, self.n_routed
        if N * k < E:
            h = torch.einsum("nc,nkcw->nkw", x2, self.w_up[idx])             # (N, k, W)
            a = self.act(h) * gates.unsqueeze(-1).to(h.dtype)                # (N, k, H)
            y = torch.einsum("nkh,nkhc->nc", a, self.w_down[idx])            # (N, C)
        else:
            g = gates.new_zeros(N, E).scatter_(1, idx, gates).to(x2.dtype)   # (N, E)
            h = torch.einsum("nc,ecw->new", x2, self.w_up)                   # (N, E, W)
            y = torch.einsum("neh,ehc->nc", self.act(h) * g.unsqueeze(-1), self.w_down)
        if self.n_shared:
            y = y + self._shared(x2)
        return y.view(B, T, C)

    def _experts_grouped(self, x2, w_up, w_down, tok, counts, g) -> Tensor:
        """GPU path: gather the (N*k, C) rows once, two grouped matmuls, scatter-add back."""
        xs = x2.index_select(0, tok)                                         # (N*k, C)
        a = self.act(_grouped_mm(xs, w_up, counts))                          # (N*k, H)
        ys = _grouped_mm(a * g.unsqueeze(1), w_down, counts)                 # (N*k, C)
        return ys.new_zeros(x2.shape).index_add_(0, tok, ys)                 # (N, C)

    def _shared(self, x2: Tensor) -> Tensor:
        """The n_shared always-on experts as one MLP of width n_shared*up_dim: (N, C) -> (N, C).

        Same numbers as n_shared separate experts: the activation acts per expert on the
        (N, S, W) view, so gated activations split each expert's own value/gate halves.
        """
        S, C, W = self.shared_up.shape
        h = x2 @ self.shared_up.permute(1, 0, 2).reshape(C, S * W)          # (N, S*W)
        a = self.act(h.view(-1, S, W))                                       # (N, S, H)
        return a.reshape(a.shape[0], -1) @ self.shared_down.reshape(-1, C)   # (N, C)

    # --- balancing ---
    def _aux(self, flat: Tensor, counts: Tensor, scores: Tensor, B: int, T: int) -> Tensor:
        E, k = self.n_routed, self.top_k
        if not self.aux_free:
            # Switch: f_i = share of the N*k assignments, P_i = mean router probability
            f = counts.to(scores.dtype) / flat.numel()
            return self.cfg.coeff * E * (f * scores.mean(dim=0)).sum()
        if self.cfg.alpha == 0.0:
            return scores.new_zeros(())
        # DeepSeek-V3 sequence-wise loss, per sequence b, averaged over the batch:
        #   f_bi = E/(k T) * #tokens of b picking i,  P_bi = mean_t s_bti / sum_j s_btj
        seq = torch.arange(flat.numel(), device=flat.device) // (k * T)     # (N*k,) sequence
        cnt = _count(seq * E + flat, B * E).view(B, E).to(scores.dtype)
        f = cnt * (E / (k * T))
        p = (scores / scores.sum(dim=-1, keepdim=True)).view(B, T, E).mean(dim=1)   # (B, E)
        return self.cfg.alpha * (f * p).sum(dim=-1).mean()

    @torch.no_grad()
    def _accumulate(self, counts: Tensor) -> None:
        # Activation recomputation (checkpointing) runs this forward twice per micro-batch; that
        # doubles every count alike, which changes neither sign(mean - load_i) nor MaxVio.
        if self._load_acc is None or self._load_acc.device != counts.device:
            prev = self._load_acc
            self._load_acc = torch.zeros(self.n_routed, dtype=torch.long, device=counts.device)
            if prev is not None:
                self._load_acc += prev.to(counts.device)
        self._load_acc += counts

    @torch.no_grad()
    def update_bias(self) -> None:
        """Once per OPTIMIZER step (not per micro-batch), on every rank: a collective when
        torch.distributed is initialized.

        Sums the loads accumulated since the last call over all data-parallel ranks, moves
        each aux-free bias by gamma toward balance (bias_i += gamma * sign(mean - load_i)), then
        publishes load fractions and MaxVio for load_stats() and resets the accumulator.
        In aux-loss mode it only publishes the stats.
        """
        load = self._load_acc
        if load is None:
            load = torch.zeros(self.n_routed, dtype=torch.long, device=self.router.weight.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, op=dist.ReduceOp.SUM)          # identical bias on every rank
        self._load_acc = None
        # no host sync here (a step with no training forward, total 0, changes nothing); the
        # stats stay on the device until load_stats() reads them at an eval
        load = load.double()
        total = load.sum()
        mean = total / self.n_routed
        if self.aux_free:
            step = self.cfg.gamma * torch.sign(mean - load)      # overloaded down, underloaded up
            self.bias += step.to(self.bias.dtype)
        last = self._last_load
        self._last_load = load if last is None else torch.where(total > 0, load, last)

    def load_stats(self) -> dict:
        """{"load": fraction of routed assignments per routed expert, "maxvio": (max-mean)/mean},
        over the last step completed by update_bias() ({"load": [], "maxvio": 0.0} before)."""
        load = self._last_load
        if load is None or load.sum().item() == 0:                 # sync: read (at evals)
            return {"load": [], "maxvio": 0.0}
        total = load.sum()
        mean = total / self.n_routed
        return {"load": (load / total).tolist(), "maxvio": ((load.max() - mean) / mean).item()}
