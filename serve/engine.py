"""Continuous-batching generation engine: pure PyTorch, no Ray (jobs/sample.py, the serving
deployment, the sweep's decode measurement and the serve benchmark's in-process baseline all
run this one class).

    engine = Engine(model, tokenizer, max_batch=16)
    engine.add("a", prompt_ids, SamplingParams(max_new_tokens=32, temperature=0.0))
    while engine.has_work():
        for out in engine.step():            # Output(request_id, token_ids, text, finish_reason, ...)
            ...
    engine.run({"a": (ids, params), ...})   # the same, to completion: {id: Completion}

Each `step()` is schedule -> run -> postprocess, one role per file:
  1. serve/scheduler.py     drops cancelled requests (their rows are freed at once), admits
                            waiting ones into free KV-cache rows;
  2. serve/model_runner.py  decodes one token for every running row and prefills the newcomers
                            (-> logits); serve/sampler.py draws each row's token with its own
                            temperature/top-k/top-p and torch.Generator (seeded from `seed`);
  3. here                   appends the tokens, turns them into text (serve/detokenizer.py:
                            stop strings, held-back partial matches), applies the stop
                            conditions, and frees finished rows.
serve/driver.py runs `step()` from asyncio for the server.

Prefix caching (`prefix_cache_bytes` > 0, serve/prefix_cache.py): a newcomer whose prompt
window starts with blocks an earlier request prefilled gets their KV entries copied into its
row and prefills only the rest; tokens and logprobs (echo's prompt logprobs included) equal
those without it, to float rounding (tests/test_prefix_cache.py).

The context-window rule is model.generate's, models/context.py: a prompt longer than
block_size keeps its last block_size tokens; past block_size a row re-prefills its last
block_size tokens every step. So each row's tokens equal `model.generate()` for that request
alone (greedy, or seeded sampling with the same seed), whatever its batch mates —
tests/test_serve_engine.py.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from models.sampling import SamplingParams
from serve.detokenizer import Detokenizer
from serve.logprobs import TokenLogprob, score
from serve.model_runner import ModelRunner
from serve.prefix_cache import DEFAULT_BLOCK_TOKENS, PrefixCache
from serve.prefix_cache import supports as prefix_cache_supports
from serve.sampler import Sampler
from serve.scheduler import Scheduler
from serve.sequence import Sequence


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
    logprobs: TokenLogprob | None = None        # the new token's score, when asked for
    prompt_logprobs: list | None = None         # once, with the first output, when asked for
    queue_s: float | None = None                # arrival -> a batch row (None: never admitted)


class Completion(NamedTuple):
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int


class Engine:
    def __init__(self, model, tokenizer=None, max_batch: int = 16,
                 max_prefill_tokens: int | None = None, prefix_cache_bytes: int = 0,
                 prefix_block_tokens: int = DEFAULT_BLOCK_TOKENS, decode: str | None = None):
        """`prefix_cache_bytes` > 0 keeps prompt blocks of `prefix_block_tokens` tokens for
        later requests that share them (serve/prefix_cache.py), within that many bytes; 0 is
        off. A model with a sliding-window layer never uses it (`prefix_cache_off` says why).
        `decode`: the decode step's mode (models/decode.py; None: the device's default)."""
        block = model.cfg.block_size
        if isinstance(prefix_cache_bytes, bool) or not isinstance(prefix_cache_bytes, int) \
                or prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be an int >= 0 (0: off), "
                             f"got {prefix_cache_bytes!r}")
        self.scheduler = Scheduler(max_batch, max_prefill_tokens or max(block, 2048), block)
        self.runner = ModelRunner(model, max_batch, decode=decode)
        self.prefix_cache_off = None if prefix_cache_bytes else "prefix_cache_bytes=0"
        if prefix_cache_bytes:
            self.prefix_cache_off = prefix_cache_supports(model)
            pc = PrefixCache(self.runner.cache, prefix_cache_bytes, prefix_block_tokens,
                             model.cfg.n_embd)         # checks the values even when bypassed
            if self.prefix_cache_off is None:
                self.runner.prefix = self.scheduler.prefix = pc
        self.sampler = Sampler(getattr(tokenizer, "vocab_size", None))
        self.tok = tokenizer
        self.eot = getattr(tokenizer, "eot_id", None)
        self.vocab = model.cfg.vocab_size

    # --- requests (thread-safe) -----------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
            first: bool = False, logprobs: int | None = None, prompt_logprobs: int | None = None,
            generate: bool = True) -> None:
        """Queue a request; `first` puts it at the head of the queue (health checks). Prompt
        ids must be in [0, vocab); a prompt longer than block_size keeps its last block_size
        tokens. `logprobs` k scores every generated token (serve/logprobs.py), `prompt_logprobs`
        k every prompt token (the prompt must fit in block_size); `generate=False` only scores
        the prompt (it finishes with 'length' after the prefill, no token generated)."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab:
            raise ValueError(f"prompt holds token ids outside [0, vocab_size={self.vocab})")
        if prompt_logprobs is not None and len(ids) > self.runner.block:
            raise ValueError(f"a scored prompt must fit in block_size={self.runner.block}, "
                             f"got {len(ids)} tokens")
        if not generate and prompt_logprobs is None:
            raise ValueError("generate=False needs prompt_logprobs (there is nothing else to do)")
        keys = []
        if self.runner.prefix is not None:
            keys = self.runner.prefix.keys(ids[max(0, len(ids) - self.runner.block):])
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        gen = torch.Generator(device=self.runner.device).manual_seed(seed)
        self.scheduler.add(Sequence(request_id, params, ids, len(ids), gen,
                                    Detokenizer(self.tok, params.stop), first=first,
                                    logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                    generate=generate, prefix_keys=keys))

    def cancel(self, request_id: str) -> None:
        """Stop a request; its row is free after the next step starts."""
        self.scheduler.cancel(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The prefix cache in use (None: off or bypassed)."""
        return self.runner.prefix

    def prefix_cache_counts(self) -> tuple[int, int]:
        """(prompt tokens looked up, of them served from the prefix cache) so far."""
        pc = self.runner.prefix
        return (0, 0) if pc is None else (pc.queries, pc.hits)

    # --- one iteration --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Output]:
        plan = self.scheduler.schedule()                             # 1. schedule
        self.runner.move_rows(plan.moves)
        outs = [self._output(s, [], "") for s in plan.aborted]
        if plan.rows:
            logits = self.runner.run(plan.decode, plan.prefill)      # 2. run: (n, V)
            tokens = self.sampler(logits, plan.rows)
            scores = self._scores(logits, plan.rows, tokens)
            outs += [self._postprocess(s, t, lp)                        # 3. postprocess
                     for s, t, lp in zip(plan.rows, tokens, scores)]
            self.runner.move_rows(self.scheduler.free_finished())
        return outs

    @staticmethod
    def _scores(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]
                ) -> list[TokenLogprob | None]:
        """The raw model's log-probabilities of the drawn tokens, for rows that asked."""
        asked = [i for i, s in enumerate(seqs) if s.logprobs is not None and s.generate]
        out: list[TokenLogprob | None] = [None] * len(seqs)
        if asked:
            for i, lp in zip(asked, score(logits[asked], [tokens[i] for i in asked],
                                          [seqs[i].logprobs for i in asked])):
                out[i] = lp
        return out

    def _postprocess(self, s: Sequence, tok: int, lp: TokenLogprob | None = None) -> Output:
        """Append a token; text and stop conditions: end-of-text, a stop string, max tokens."""
        prompt = s.prompt_scores
        s.prompt_scores = None                  # sent once
        if not s.generate:                      # scored at prefill: done, nothing generated
            s.done = "length"
            return self._output(s, [], "", prompt=prompt)
        s.tokens.append(tok)
        s.generated.append(tok)
        text, stopped = "", False
        if self.eot is not None and tok == self.eot:
            s.done = "stop"
        else:
            text, stopped = s.detok.push(tok)
            if stopped:
                s.done = "stop"
        if not s.done and len(s.generated) >= s.params.max_new_tokens:
            s.done = "length"
        if s.done and not stopped:              # release text held back for stop strings
            text += s.detok.flush()
        return self._output(s, [tok], text, lp, prompt)

    def _output(self, s: Sequence, toks: list[int], text: str, lp: TokenLogprob | None = None,
                prompt: list | None = None) -> Output:
        queue = None if s.admitted is None else s.admitted - s.arrived
        return Output(s.rid, toks, text, s.done, s.prompt_tokens, len(s.generated), lp, prompt,
                      queue)

    def fail_all(self, reason: str = "error") -> list[Output]:
        """Finish every request (after an exception in step): the engine stays usable."""
        return [self._output(s, [], "") for s in self.scheduler.fail_all(reason)]

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
