"""Continuous-batching generation engine: pure PyTorch, no Ray (jobs/sample.py, the serving
deployment and the benchmark's in-process baseline all run this one class).

    engine = Engine(model, tokenizer, max_batch=16)
    engine.add("a", prompt_ids, SamplingParams(max_new_tokens=32, temperature=0.0))
    while engine.has_work():
        for out in engine.step():            # Output(request_id, token_ids, text, finish_reason)
            ...
    engine.run({"a": (ids, params), ...})   # the same, to completion: {id: Completion}

Iteration-level scheduling. The KV cache has `max_batch` rows; running requests occupy rows
0..n-1. Each `step()`:
  1. drops cancelled requests (their rows are freed at once);
  2. admits waiting requests into free rows, as many as fit in `max_prefill_tokens`, and
     prefills them together (right-padded, per-row positions; see models/attention/cache.py)
     -> each newcomer's first token;
  3. decodes one token for every request that was already running, with per-row positions:
     rows of different lengths share the batch;
  4. samples each row with its own temperature/top-k/top-p and torch.Generator (seeded from
     `seed`), applies its stop conditions, and frees finished rows by moving the last row
     into the gap (so running rows stay a contiguous prefix and every pass is a cache view).
A request joins between two decode steps and leaves as soon as it is done: short requests
never wait for long ones (`@serve.batch` would hold the whole group).

Context policy = models/generation.py: a prompt longer than block_size keeps its last
block_size tokens; past block_size a row re-prefills its last block_size tokens every step.
So each row's tokens equal `model.generate()` for that request alone (greedy, or seeded
sampling with the same seed), whatever its batch mates — tests/test_serve_engine.py.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from models.sampling import SamplingParams, limit_vocab, sample_next


class Output(NamedTuple):
    """What one step produced for one request: new token ids, the new text that is safe to
    show (held back while it may still become a stop string), and why it finished (None while
    running; 'stop', 'length', 'abort' or 'error')."""
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class Completion(NamedTuple):
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int


class TextStream:
    """Incremental detokenisation with stop strings: decodes all generated tokens and emits
    the new suffix, holding back a trailing partial UTF-8 character (U+FFFD) and any tail that
    could still grow into a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tok, self.stop, self.ids, self.sent = tokenizer, stop, [], 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text, whether a stop string completed)."""
        if self.tok is None:
            return "", False
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if self.stop:
            lo = max(0, self.sent - max(map(len, self.stop)))
            hits = [i for i in (text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                out, self.sent = text[self.sent:cut], max(self.sent, cut)
                return out, True
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        hold = 0                                # longest tail that is a prefix of a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.sent), hold, -1):
                if text[end - k:end] == s[:k]:
                    hold = k
                    break
        end -= hold
        out, self.sent = text[self.sent:end], max(self.sent, end)
        return out, False

    def flush(self) -> str:
        if self.tok is None:
            return ""
        text = self.tok.decode(self.ids)
        out, self.sent = text[self.sent:], len(text)
        return out


@dataclass
class _Seq:
    rid: str
    params: SamplingParams
    tokens: list[int]                   # the (window of the) prompt, then generated tokens
    prompt_tokens: int
    gen: torch.Generator
    stream: TextStream
    cached: int = 0                     # positions of this row held in the KV cache
    generated: list[int] = field(default_factory=list)
    done: str | None = None
    first: bool = False                 # jump the queue (health checks)


class Engine:
    def __init__(self, model, tokenizer=None, max_batch: int = 16,
                 max_prefill_tokens: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tok = tokenizer
        self.eot = getattr(tokenizer, "eot_id", None)
        self.block = model.cfg.block_size
        self.vocab = model.cfg.vocab_size
        # sample only ids the tokenizer can decode (the embedding may be padded past them)
        self.vocab_limit = getattr(tokenizer, "vocab_size", None)
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens or max(self.block, 2048)
        p = next(model.parameters())
        self.device = p.device
        self.cache = model.new_cache(max_batch)
        self._scratch = None                # cache rows for windows re-prefilled past block_size
        self.running: list[_Seq] = []       # running[i] holds cache row i
        self.waiting: list[_Seq] = []
        self._lock = threading.Lock()       # add()/cancel() may come from another thread
        self._new: list[_Seq] = []
        self._cancel: set[str] = set()

    # --- requests -----------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return self.tok.encode(prompt)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
            first: bool = False) -> None:
        """Queue a request (thread-safe); `first` puts it at the head of the queue (health
        checks). Prompt ids must be in [0, vocab); a prompt longer than block_size keeps its
        last block_size tokens."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab:
            raise ValueError(f"prompt holds token ids outside [0, vocab_size={self.vocab})")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        seq = _Seq(request_id, params, ids[-self.block:], len(ids), gen,
                   TextStream(self.tok, params.stop), first=first)
        with self._lock:
            self._new.append(seq)

    def cancel(self, request_id: str) -> None:
        """Stop a request (thread-safe); its row is free after the next step starts."""
        with self._lock:
            self._cancel.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.running or self.waiting or self._new or self._cancel)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._new)

    # --- one iteration ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Output]:
        with self._lock:
            self.waiting = ([s for s in self._new if s.first] + self.waiting
                            + [s for s in self._new if not s.first])
            self._new, cancel, self._cancel = [], self._cancel, set()
        outs: list[Output] = []
        if cancel:
            for s in self.running + self.waiting:
                if s.rid in cancel:
                    s.done = "abort"
                    outs.append(self._output(s, [], ""))
            self.waiting = [s for s in self.waiting if not s.done]
            self._compact()
        old = len(self.running)
        new = self._admit()
        logits = []
        if old:
            logits.append(self._decode(self.running[:old]))
        if new:
            logits.append(self._prefill(new, old))
        if logits:
            rows = self.running
            for s, tok in zip(rows, self._sample(torch.cat(logits), rows)):
                outs.append(self._append(s, tok))
            self._compact()
        return outs

    def _admit(self) -> list[_Seq]:
        new, budget = [], self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_batch:
            n = len(self.waiting[0].tokens)
            if new and n > budget:
                break
            budget -= n
            s = self.waiting.pop(0)
            self.running.append(s)
            new.append(s)
        return new

    def _prefill(self, seqs: list[_Seq], row0: int) -> torch.Tensor:
        """Prefill newcomers into cache rows row0.. (one right-padded batch) -> (m, V)."""
        lens = [len(s.tokens) for s in seqs]
        T = max(lens)
        idx = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            idx[i, :lens[i]] = torch.tensor(s.tokens)
            s.cached = lens[i]
        idx = idx.to(self.device)
        view = self.cache.rows(row0, row0 + len(seqs))
        if len(set(lens)) == 1:             # no padding: the plain path of models.generation
            return self.model.next_logits(idx, view, 0)
        lens_t = torch.tensor(lens, device=self.device)
        return self.model.next_logits(idx, view, torch.zeros_like(lens_t), last=lens_t - 1)

    def _decode(self, seqs: list[_Seq]) -> torch.Tensor:
        """One token for each running row (rows 0..n-1) -> (n, V)."""
        over = [i for i, s in enumerate(seqs) if len(s.tokens) > self.block]
        # a row past block_size decodes a dummy position here; its logits come from its window
        start = torch.tensor([min(s.cached, self.block - 1) for s in seqs], device=self.device)
        idx = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        logits = self.model.next_logits(idx, self.cache.rows(0, len(seqs)), start)
        if over:
            if self._scratch is None:
                self._scratch = self.model.new_cache(self.max_batch)
            win = torch.tensor([seqs[i].tokens[-self.block:] for i in over], device=self.device)
            logits[over] = self.model.next_logits(win, self._scratch.rows(0, len(over)), 0)
        for s in seqs:
            s.cached += 1
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        logits = limit_vocab(logits, self.vocab_limit)
        out = [0] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                out[i] = t
        for i, s in enumerate(seqs):
            p = s.params
            if p.temperature != 0:
                out[i] = int(sample_next(logits[i:i + 1], p.temperature, p.top_k, p.top_p, s.gen))
        return out

    def _append(self, s: _Seq, tok: int) -> Output:
        s.tokens.append(tok)
        s.generated.append(tok)
        text, stopped = "", False
        if self.eot is not None and tok == self.eot:
            s.done = "stop"
        else:
            text, stopped = s.stream.push(tok)
            if stopped:
                s.done = "stop"
        if not s.done and len(s.generated) >= s.params.max_new_tokens:
            s.done = "length"
        if s.done and not stopped:              # release text held back for stop strings
            text += s.stream.flush()
        return self._output(s, [tok], text)

    def _output(self, s: _Seq, toks: list[int], text: str) -> Output:
        return Output(s.rid, toks, text, s.done, s.prompt_tokens, len(s.generated))

    def _compact(self) -> None:
        """Remove finished rows; the last running row moves into each gap."""
        i = 0
        while i < len(self.running):
            if not self.running[i].done:
                i += 1
                continue
            last = self.running.pop()
            if i < len(self.running):
                if not last.done and len(last.tokens) <= self.block:
                    self.cache.copy_row(len(self.running), i, last.cached)
                self.running[i] = last

    def fail_all(self, reason: str = "error") -> list[Output]:
        """Finish every request (after an exception in step): the engine stays usable."""
        with self._lock:
            self.waiting += self._new
            self._new, self._cancel = [], set()
        outs = []
        for s in self.running + self.waiting:
            s.done = reason
            outs.append(self._output(s, [], ""))
        self.running, self.waiting = [], []
        return outs

    # --- convenience: run to completion ---------------------------------------------------------
    def run(self, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, Completion]:
        for rid, (ids, params) in requests.items():
            self.add(rid, ids, params)
        toks: dict[str, list[int]] = {rid: [] for rid in requests}
        text: dict[str, str] = {rid: "" for rid in requests}
        done: dict[str, Completion] = {}
        while len(done) < len(requests):
            for o in self.step():
                toks[o.request_id] += o.token_ids
                text[o.request_id] += o.text
                if o.finish_reason:
                    done[o.request_id] = Completion(toks[o.request_id], text[o.request_id],
                                                    o.finish_reason, o.prompt_tokens)
        return {rid: done[rid] for rid in requests}
