"""The engine's model runner: forward passes on the KV cache, rows chosen by the scheduler.

    runner = ModelRunner(model, max_batch=16)
    logits = runner.run(decode, prefill)      # (len(decode) + len(prefill), V), in row order
    runner.move_rows(moves)                   # the scheduler's RowMoves: copy cached rows

One run is at most three passes: one decode pass for the running rows 0..d-1 (one token each,
per-row positions, so rows of different lengths share the batch), one prefill pass for the
newcomers in rows d.. (right-padded, per-row positions; see models/attention/cache.py), and,
for rows whose sequence no longer fits in block_size, one pass re-prefilling their windows in
a scratch cache. A newcomer that asked for its prompt to be scored (echo) also gets the
log-probabilities of every prompt token from the same prefill pass. Which tokens each row feeds is the context-window rule of models/context.py,
the rule model.generate follows.
"""
from __future__ import annotations

import torch

from serve.logprobs import prompt_scores
from serve.scheduler import RowMove
from serve.sequence import Sequence


class ModelRunner:
    def __init__(self, model, max_batch: int):
        self.model = model.eval()
        self.block = model.cfg.block_size
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(max_batch)
        self._scratch = None                # cache rows for windows re-prefilled past block_size

    @torch.no_grad()
    def run(self, decode: list[Sequence], prefill: list[Sequence]) -> torch.Tensor:
        """Logits (n, V) of the next token of every running row: decode rows 0..d-1 (running
        already), then prefill rows d.. (newcomers)."""
        logits = []
        if decode:
            logits.append(self._decode(decode))
        if prefill:
            logits.append(self._prefill(prefill, len(decode)))
        return torch.cat(logits)

    def move_rows(self, moves: list[RowMove]) -> None:
        for m in moves:
            self.cache.copy_row(m.src, m.dst, m.length)

    def _prefill(self, seqs: list[Sequence], row0: int) -> torch.Tensor:
        """Prefill newcomers into cache rows row0.. (one right-padded batch) -> (m, V)."""
        windows = [s.tokens[s.feed(self.block).lo:] for s in seqs]   # all start at 0
        lens = [len(w) for w in windows]
        T = max(lens)
        idx = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            idx[i, :lens[i]] = torch.tensor(windows[i])
            s.cached = lens[i]
        idx = idx.to(self.device)
        view = self.cache.rows(row0, row0 + len(seqs))
        if len(set(lens)) == 1:             # no padding: the plain path of models.generation
            start, last = 0, None
        else:
            lens_t = torch.tensor(lens, device=self.device)
            start, last = torch.zeros_like(lens_t), lens_t - 1
        scored = [i for i, s in enumerate(seqs) if s.prompt_logprobs is not None]
        if not scored:
            return self.model.next_logits(idx, view, start, last=last)
        logits, hidden = self.model.next_logits_and_hidden(idx, view, start, last, scored,
                                                           [lens[i] for i in scored])  # (m, V), [(T, C)]
        for i, h in zip(scored, hidden):
            seqs[i].prompt_scores = prompt_scores(h, self.model.lm_head, windows[i],
                                                  seqs[i].prompt_logprobs)
        return logits

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each running row (rows 0..n-1) -> (n, V)."""
        feeds = [s.feed(self.block) for s in seqs]
        over = [i for i, f in enumerate(feeds) if f.start == 0]    # the window slid
        # a row in the cache feeds its newest token at its next position; a row past
        # block_size decodes a dummy position here, its logits come from its window
        start = torch.tensor([f.start or self.block - 1 for f in feeds], device=self.device)
        idx = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)     # (n, 1)
        logits = self.model.next_logits(idx, self.cache.rows(0, len(seqs)), start)  # (n, V)
        if over:
            if self._scratch is None:
                self._scratch = self.model.new_cache(self.max_batch)
            win = torch.tensor([seqs[i].tokens[feeds[i].lo:] for i in over],
                               device=self.device)                  # (len(over), block_size)
            logits[over] = self.model.next_logits(win, self._scratch.rows(0, len(over)), 0)
        for s, f in zip(seqs, feeds):
            s.cached = s.cached + 1 if f.start else 0     # a slid row's own cache row is unused
        return logits
