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

With a prefix cache (serve/prefix_cache.py), a newcomer's row first receives the cached blocks
its window starts with and the prefill feeds only the rest, from that position (per-row
starts); newcomers sharing a first block with an earlier one prefill in a second pass, after
the first has stored its blocks, and rows whose starts plus rests would pass block_size in one
right-padded batch go in further passes. A scored row's prompt logprobs are computed from the
cached blocks' hidden states followed by its own.
The decode pass runs the step of `decode` (models/decode.py: eager, static or compiled;
None: the device's default), the same as model.generate's.
"""
from __future__ import annotations

import torch

from models.decode import batch_bucket, check_decode, decode_step
from serve.logprobs import CHUNK, TokenLogprob, prompt_scores, score
from serve.prefix_cache import PrefixCache, waves
from serve.scheduler import RowMove
from serve.sequence import Sequence


class ModelRunner:
    def __init__(self, model, max_batch: int, prefix_cache: PrefixCache | None = None,
                 decode: str | None = None):
        self.model = model.eval()
        self.prefix = prefix_cache          # serve/prefix_cache.py; None: off
        self.block = model.cfg.block_size
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.decode = check_decode(decode, self.device)
        self.step = decode_step(model, self.decode)
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
        """Prefill newcomers into cache rows row0.. -> (m, V). With the prefix cache, each row
        first takes its cached prefix (serve/prefix_cache.py) and prefills only the rest; rows
        that share a first block with an earlier newcomer of this step prefill after it (a
        second wave), so that they find its blocks."""
        if self.prefix is None:
            return self._pass(seqs, row0, [0] * len(seqs), [(None, None)] * len(seqs))[0]
        logits: list[torch.Tensor | None] = [None] * len(seqs)
        order = waves([s.prefix_keys for s in seqs])
        for w in sorted(set(order)):
            for run in _runs([i for i, x in enumerate(order) if x == w]):
                for a, b, starts, cached in self._with_prefixes([seqs[i] for i in run],
                                                                 row0 + run[0]):
                    part = [seqs[i] for i in run[a:b]]
                    out, hidden = self._pass(part, row0 + run[a], starts, cached)
                    for j, (s, h) in enumerate(zip(part, hidden)):
                        logits[run[a] + j] = out[j:j + 1]
                        sc = None if h is None else (s.prompt_logprobs, s.prompt_scores)
                        self.prefix.insert(s.prefix_keys, self.cache, row0 + run[a] + j, h, sc)
        return torch.cat(logits)

    def _with_prefixes(self, seqs: list[Sequence], row0: int):
        """Copy each row's cached prefix into its row; yield (a, b, starts, hidden) per group
        seqs[a:b] that one pass can prefill: its rows start at their prefix's end, and the
        group's largest start plus its longest rest fits in block_size."""
        B = self.prefix.B
        starts, cached, rests = [], [], []
        for j, s in enumerate(seqs):
            n = len(s.tokens) - s.feed(self.block).lo                # the window's length
            blocks = self.prefix.match(s.prefix_keys, s.prompt_logprobs is not None)
            p = min(len(blocks) * B, n - 1)                          # one token is always fed
            cached.append(self.prefix.load(blocks, self.cache, row0 + j, p, s.prompt_logprobs)
                          if p else (None, None))
            self.prefix.count(n, p)
            starts.append(p)
            rests.append(n - p)
        a = 0
        for b in range(1, len(seqs) + 1):
            if b == len(seqs) or max(starts[a:b + 1]) + max(rests[a:b + 1]) > self.block:
                yield a, b, starts[a:b], cached[a:b]
                a = b

    def _pass(self, seqs: list[Sequence], row0: int, starts: list[int], cached: list[tuple]
              ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """One right-padded prefill pass over rows row0.. : row i feeds its window from
        position starts[i] (its cache row holds the positions before) -> logits (m, V) and, for
        rows that score their prompt, the hidden states (window, C) of the whole window (the
        cached prefix's then this pass's; cached[i] = (prefix hidden, prefix scores known))."""
        windows = [s.tokens[s.feed(self.block).lo:] for s in seqs]
        feeds = [w[p:] for w, p in zip(windows, starts)]
        lens = [len(f) for f in feeds]
        T = max(lens)
        idx = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            idx[i, :lens[i]] = torch.tensor(feeds[i])
            s.cached = len(windows[i])
        idx = idx.to(self.device)
        view = self.cache.rows(row0, row0 + len(seqs))
        if len(set(lens)) == 1 and not any(starts):   # the plain path of models.generation
            start, last = 0, None
        else:
            start = torch.tensor(starts, device=self.device)
            last = torch.tensor(lens, device=self.device) - 1
        scored = [i for i, s in enumerate(seqs) if s.prompt_logprobs is not None]
        hidden: list[torch.Tensor | None] = [None] * len(seqs)
        if not scored:
            return self.model.next_logits(idx, view, start, last=last), hidden
        logits, fresh = self.model.next_logits_and_hidden(idx, view, start, last, scored,
                                                          [lens[i] for i in scored])  # (m, V), [(T, C)]
        for i, h in zip(scored, fresh):
            k = seqs[i].prompt_logprobs
            if not starts[i]:
                hidden[i] = h
                seqs[i].prompt_scores = prompt_scores(h, self.model.lm_head, windows[i], k)
            else:
                hidden[i] = torch.cat([cached[i][0], h])
                seqs[i].prompt_scores = self._scores(hidden[i], windows[i], k, cached[i][1])
        return logits, hidden

    def _scores(self, hidden: torch.Tensor, ids: list[int], k: int,
                known: list[TokenLogprob | None]) -> list[TokenLogprob | None]:
        """serve/logprobs.py prompt_scores' list for a window whose first positions' scores
        are partly known (the prefix cache's): only the others go through the LM head."""
        out = known + [None] * (len(ids) - 1 - len(known))            # out[t]: token t+1
        todo = [t for t in range(len(ids) - 1) if out[t] is None]
        for a in range(0, len(todo), CHUNK):
            pos = todo[a:a + CHUNK]
            rows = hidden[torch.tensor(pos, device=hidden.device)]     # (len(pos), C)
            for t, sc in zip(pos, score(self.model.lm_head(rows), [ids[t + 1] for t in pos],
                                        [k] * len(pos))):
                out[t] = sc
        return [None] + out

    def _static_decode(self, seqs, feeds, over) -> torch.Tensor:
        """The static step over the first `batch_bucket` rows; slid rows and padding rows write
        nothing (valid False) and their logits are dropped or replaced."""
        n = len(seqs)
        nb = batch_bucket(n, self.max_batch, self.decode, self.device)
        pad = nb - n
        idx = torch.tensor([[s.tokens[-1]] for s in seqs] + [[0]] * pad, device=self.device)
        pos = torch.tensor([f.start for f in feeds] + [0] * pad, device=self.device)     # (nb,)
        valid = None
        if over or pad or self.decode == "compiled":   # compiled: always a mask, one graph
            valid = torch.tensor([f.start > 0 for f in feeds] + [False] * pad, device=self.device)
        cache = self.cache if nb == self.max_batch else self.cache.rows(0, nb)
        return self.step(idx, cache, pos, valid)[:n]                # (n, V)

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each running row (rows 0..n-1) -> (n, V)."""
        feeds = [s.feed(self.block) for s in seqs]
        over = [i for i, f in enumerate(feeds) if f.start == 0]    # the window slid
        if self.step is None:
            # a row in the cache feeds its newest token at its next position; a row past
            # block_size decodes a dummy position here, its logits come from its window
            start = torch.tensor([f.start or self.block - 1 for f in feeds], device=self.device)
            idx = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)     # (n, 1)
            logits = self.model.next_logits(idx, self.cache.rows(0, len(seqs)), start)  # (n, V)
        else:
            logits = self._static_decode(seqs, feeds, over)
        if over:
            if self._scratch is None:
                self._scratch = self.model.new_cache(self.max_batch)
            win = torch.tensor([seqs[i].tokens[feeds[i].lo:] for i in over],
                               device=self.device)                  # (len(over), block_size)
            logits[over] = self.model.next_logits(win, self._scratch.rows(0, len(over)), 0)
        for s, f in zip(seqs, feeds):
            s.cached = s.cached + 1 if f.start else 0     # a slid row's own cache row is unused
        return logits


def _runs(rows: list[int]) -> list[list[int]]:
    """Split increasing row indices into runs of consecutive ones (one cache view each)."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and runs[-1][-1] == r - 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs
