"""The Trainer: one worker's training run, its methods in the order they happen.

    trainer = Trainer(plan.worker_config, worker_context(run_dir, keep), hooks=[...])
    summary = trainer.run()      # build, restore, distribute, open_logs, then the loop:
                                 # step -> (log_metrics, evaluate, record -> checkpoint)

Per worker: build the model from the resolved config (with LoRA adapters, the only parameters
the optimizer holds, when lora_rank is set); restore the latest checkpoint (Ray's, else
`resume_from`) *before* the loop so step, optimizer, scaler, data position and RNG continue,
or, in a fresh fine-tuning run, load the `init_from` weights (chimera.train.finetune); wrap for DDP (the context's prepare_model); grad accumulation with `no_sync()` on all but the
last micro-step; AdamW (fused on CUDA, decay on >=2-D weights only); warmup + cosine lr;
clipping; bf16 autocast on CUDA (fp16 + GradScaler without bf16), fp32 on CPU. Metrics every
log_interval (`loss`: the main next-token loss + MoE terms, also with mtp_depth, whose MTP
cross-entropy is `mtp_loss` beside it; the optimizer sees both, see models/mtp.py), eval every eval_interval (cross-entropy without the MoE terms, which are reported
apart with MaxVio per MoE layer, and the same losses in bits per byte of text: val_bpb,
train_bpb), checkpoints every ckpt_interval, at a new best val loss (also copied to
<run>/<file_name>_best) and at the end. Rank 0 prints, writes <run>/metrics.jsonl
(appended locally; rewritten at evals on object storage: context.MetricsLog) and logs to W&B.

What costs time besides compute (look for `# sync:` and `# report:`): log_metrics() waits for
the device and reads loss and grad norm (all-reduced over workers); evaluate() reads its sums;
checkpoint() gathers every rank's RNG state. Under Ray Train every `ray.train.report` is a
barrier over the workers through an actor (and a line in the log), so the Trainer reports to
Ray only what Ray needs: each checkpoint (resume and fault tolerance) and, when `report_evals`
is set (a sweep trial on Ray Train workers, whose Tune scheduler reads the metric there), every
eval row. Every row still goes to metrics.jsonl, the rank-0 log line and W&B, and the last one
to <run>/result.json, which `fit` returns (Ray's result holds only a checkpoint's metrics).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from chimera import checkpoint as ckpt
from chimera.data.loader import ShardLoader
from chimera.data.tokenizers import TokenizerError, token_bytes
from chimera.train.config import TrainConfig
from chimera.train.context import RESULT, MetricsLog, checkpoint_at, copy_dir, write_run_file
from chimera.train.hooks import Hook
from chimera.train.measure import all_mean, eval_losses, peak_flops, state_hash
from chimera.train.schedule import lr_at
from models import LLM, ModelConfig, lora


class Trainer:
    def __init__(self, config: dict[str, Any], ctx, hooks: Sequence[Hook] = (),
                 report: Callable[[dict], None] | None = None):
        """`config`: RunPlan.worker_config. `ctx`: chimera.train.context (UnderRayTrain or
        InProcess). `report(metrics)` (in-process runs, e.g. a Tune trial) is called at every
        eval with the cumulative metrics: the latest value of every key."""
        self.tc = TrainConfig.from_dict(config["train"])
        self.mc = ModelConfig.from_dict(config["model_config"])
        self.tokenizer = config["tokenizer"]
        self.run_dir, self.accum = config["run_dir"], int(config["grad_accum"])
        self.local_run = "://" not in self.run_dir
        self.ctx, self.hooks, self.report = ctx, list(hooks), report
        self.report_evals = bool(config.get("report_evals", False))
        self.rank, self.world = ctx.rank, ctx.world
        if self.tc.min_workers is not None:        # elastic: this attempt's world size decides
            from chimera.train.plan import grad_accum
            self.accum = grad_accum(self.tc, self.mc.block_size, self.world, elastic=True)
        self.iter_num, self.best_val, self.resumed_from = 0, math.inf, None
        self.init: dict[str, str] = {}                 # init_from, base_sha256 (fine-tuning)
        self.lora_targets: tuple[str, ...] = ()
        self.history: list[dict] = []
        self.last: dict[str, Any] = {}                 # the latest value of every metric
        self.last_checkpoint: str | None = None
        self.wb = None

    # --- the run, top to bottom ------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to max_iters; the summary: step, metrics (latest of each), history (the rows),
        last and best checkpoint paths, the step it resumed from."""
        tc = self.tc
        self.build()
        self.restore()
        self.distribute()
        self.open_logs()
        if tc.eval and self.iter_num == 0:                 # the untrained model's losses
            m, _ = self.evaluate()
            self.record({"step": 0, **m})
        self.raw.train()
        self.start_timer()
        while self.iter_num < tc.max_iters:
            for h in self.hooks:
                h.before_step(self, self.iter_num)
            self.step()                                    # iter_num += 1
            step = self.iter_num                           # a row when anything is due
            do_log = step % tc.log_interval == 0 or step == tc.max_iters
            do_eval = tc.eval and (step % tc.eval_interval == 0 or step == tc.max_iters)
            periodic = step % tc.ckpt_interval == 0 or step == tc.max_iters
            row: dict[str, Any] = {}
            if do_log or do_eval or (tc.save_model and periodic):
                metrics: dict[str, Any] = {"step": step}
                if do_log:
                    metrics.update(self.log_metrics())
                improved = False
                if do_eval:
                    m, improved = self.evaluate()
                    metrics.update(m)
                if step == tc.max_iters:
                    metrics.update(self.final_metrics())
                if self.resumed_from is not None:
                    metrics["resumed_from_step"] = self.resumed_from
                row = self.record(metrics, best=improved, periodic=periodic)
                if do_log:
                    self.start_timer()
            for h in self.hooks:
                h.on_step(self, step, row)
        if self.wb is not None:
            self.wb.finish()
        best = (f"{self.run_dir}/{tc.file_name}_best" if tc.save_model and self.best_val < math.inf
                else None)
        summary = {"step": self.iter_num, "metrics": self.last, "last_checkpoint": self.last_checkpoint,
                   "best_checkpoint": best, "resumed_from_step": self.resumed_from,
                   **({"init_from": tc.init_from} if tc.init_from else {})}
        if self.rank == 0 and self.history:              # a run resumed at its end adds nothing
            write_run_file(self.run_dir, RESULT, json.dumps(summary, default=str) + "\n")
        return {**summary, "history": self.history}

    def build(self) -> None:
        """Model, AdamW, GradScaler and the loaders on this worker's device."""
        tc, mc = self.tc, self.mc
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        self.device = device = self.ctx.device(tc.use_gpu)
        self.cuda = cuda = device.type == "cuda"
        bf16 = cuda and torch.cuda.is_bf16_supported()
        self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        torch.manual_seed(tc.seed)                   # same init everywhere; DDP broadcasts anyway
        self.raw = raw = LLM(mc).to(device)
        if tc.lora_rank:                             # the base freezes; adapters train
            self.lora_targets = lora.apply_lora(raw, tc.lora_rank, tc.lora_alpha, tc.lora_targets)
        params = [p for p in raw.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=tc.learning_rate, betas=(tc.beta1, tc.beta2),
                                     **({"fused": True} if cuda else {}))
        self.scaler = torch.amp.GradScaler("cuda" if cuda else "cpu", enabled=cuda and not bf16)
        T, rank, world = mc.block_size, self.rank, self.world
        self.train_loader = ShardLoader(tc.data_dir, "train", tc.batch_size, T, rank=rank,
                                        world_size=world, seed=tc.seed, device=device)
        self.eval_loaders = {
            "val": ShardLoader(tc.data_dir, "val", tc.batch_size, T, rank=rank, world_size=world,
                               device=device),
            "train": ShardLoader(tc.data_dir, "train", tc.batch_size, T, rank=rank,
                                 world_size=world, seed=tc.seed + 1, shuffle=True, device=device)}
        # UTF-8 bytes per token id, for the evals' bits per byte (gpt2 reads its BPE files)
        self.token_bytes = None
        if tc.eval:
            try:
                self.token_bytes = torch.tensor(token_bytes(self.tokenizer), device=device)
            except TokenizerError as e:
                raise TokenizerError(f"the evals' bits per byte need the bytes of every token: {e}") from None

    def restore(self) -> None:
        """Ray's latest checkpoint of this run first, else --resume_from: weights, optimizer,
        scaler, step, best val loss, data position and this rank's RNG."""
        source = self.ctx.latest_checkpoint()
        if source is None and self.tc.resume_from:
            source = checkpoint_at(self.tc.resume_from)
        if source is None:
            if self.tc.init_from:                    # a fresh fine-tuning run: step 0
                from chimera.train.finetune import load_init
                self.init = load_init(self.raw, self.tc.init_from)
                self.print0(f"initialised from {self.tc.init_from} (weights sha256 "
                            f"{self.init['base_sha256'][:16]})")
            return
        with source.as_directory() as d:
            ckpt.load_weights(self.raw, d, self.device)
            st = ckpt.load_train_state(d)
            adapter = ckpt.read_adapter(d)
        if adapter is not None:                      # the base it adapts, as first loaded
            self.init = {"init_from": adapter["base"], "base_sha256": adapter["base_sha256"]}
        self.opt.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        self.iter_num, self.best_val = int(st["step"]), float(st["best_val"])
        self.resumed_from = int(st["step"])
        try:
            note = self.train_loader.load_state_dict(st["loader"])
            if note:                     # an elastic resize: the next epoch, re-partitioned
                self.print0(f"note: {note}")
        except ValueError as e:          # another stream (data, seed, ...): start it afresh
            self.print0(f"note: data position not restored ({e})")
        rngs = st["rng"]
        ckpt.set_rng_state(rngs[self.rank] if len(rngs) == self.world else rngs[0])
        self.print0(f"resumed from step {self.iter_num} ({source.path})")

    def distribute(self) -> None:
        """self.model: the context's prepare_model (DDP), then torch.compile if asked."""
        self.model = self.ctx.prepare_model(self.raw)
        ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        self.ddp = self.model if ddp else None
        if self.tc.compile and hasattr(torch, "compile"):
            self.model = torch.compile(self.model)

    def open_logs(self) -> None:
        """The run's facts (in every row), W&B (rank 0), the run dir, the model line."""
        tc, mc, raw = self.tc, self.mc, self.raw
        self.fpt = raw.flops_per_token()
        self.peak = peak_flops(self.device, tc.peak_flops)
        counts = raw.num_params()
        self.facts = {"world_size": self.world, "params_total": counts.total,
                      "params_active": counts.active, "flops_per_token": self.fpt,
                      "kv_bytes_per_token": raw.kv_cache_bytes_per_token(
                          self.amp_dtype if self.cuda else torch.float32)}
        if tc.wandb_log and self.rank == 0:
            import wandb
            wb_dir = os.environ.get("WANDB_DIR") or (self.run_dir if self.local_run else None)
            self.wb = wandb.init(project=tc.wandb_project, name=tc.wandb_run_name or tc.run_name,
                                 id=tc.run_name, resume="allow",
                                 config={**tc.to_dict(), "model": mc.to_dict()}, dir=wb_dir)
        if self.local_run and self.rank == 0:
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        self.metrics_log = MetricsLog(self.run_dir) if self.rank == 0 else None
        self.print0(f"model {mc.summary()}  params {raw.num_params().total:,}  "
                    f"world {self.world}  grad_accum {self.accum}  "
                    f"tokens/step {tc.total_batch_size:,}  device {self.device}")

    # --- one optimizer step ---------------------------------------------------------------------
    def step(self) -> None:
        """lr, grad accumulation (DDP all-reduces on the last micro-step only), unscale, clip,
        AdamW, GradScaler update, MoE bias update; iter_num += 1."""
        tc, opt, scaler, accum = self.tc, self.opt, self.scaler, self.accum
        self.lr = lr_at(self.iter_num, tc.learning_rate, tc.warmup_steps, tc.max_iters)
        for g in opt.param_groups:
            g["lr"] = self.lr
        for micro in range(accum):
            x, y = self.train_loader.next_batch()                        # (B, T) each
            sync = self.ddp is None or micro == accum - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self.amp():
                    _, loss, parts = self.model(x, y, parts=True)
                self.loss_sum += parts.main.detach().float()            # stays on the device
                if parts.mtp is not None:                               # reported apart
                    self.mtp_sum += parts.mtp.detach().float()
                scaler.scale(loss / accum).backward()
        scaler.unscale_(opt)
        self.gnorm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(),
                                                    tc.grad_clip if tc.grad_clip > 0 else math.inf)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if not self.tc.lora_rank:                    # LoRA: the base (and its biases) stays frozen
            self.raw.update_moe_biases()
        self.iter_num += 1
        self.steps_since += 1

    def amp(self):
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.cuda else contextlib.nullcontext()

    # --- measuring ------------------------------------------------------------------------------
    def start_timer(self) -> None:
        self.t0, self.steps_since = time.perf_counter(), 0
        self.loss_sum = torch.zeros((), device=self.device)
        self.mtp_sum = torch.zeros((), device=self.device)

    def log_metrics(self) -> dict[str, Any]:
        """Loss (mean over the steps since the last log and over workers), lr, grad norm,
        throughput, MFU, step time; printed on rank 0."""
        tc, step = self.tc, self.iter_num
        if self.cuda:
            torch.cuda.synchronize()                                   # sync: wait for the device
        dt = (time.perf_counter() - self.t0) / self.steps_since
        loss = all_mean(self.loss_sum / (self.steps_since * self.accum), self.world)
        loss_avg = loss.item()                                         # sync: all-reduce, read
        gnorm = self.gnorm.item()                                      # sync: read
        tps = tc.total_batch_size / dt
        m = {"loss": loss_avg, "lr": self.lr, "grad_norm": gnorm, "tokens_per_s": tps,
             "mfu": self.fpt * tps / (self.peak * self.world), "step_time_s": dt}
        if self.mc.mtp_depth:                # the main LM loss stays `loss`; the MTP one beside it
            m["mtp_loss"] = all_mean(self.mtp_sum / (self.steps_since * self.accum),
                                     self.world).item()                 # sync: all-reduce, read
        self.print0(f"step {step}/{tc.max_iters}  loss {loss_avg:.4f}  lr {self.lr:.2e}  "
                    f"gnorm {gnorm:.3f}  {tps:,.0f} tok/s  mfu {100 * m['mfu']:.1f}%  "
                    f"{1000 * dt:.0f} ms/step"
                    + (f"  mtp {m['mtp_loss']:.4f}" if "mtp_loss" in m else ""))
        return m

    def evaluate(self) -> tuple[dict[str, Any], bool]:
        """Val and train losses (and MoE aux terms) averaged over workers, the same in bits per
        byte, MaxVio per MoE layer, best val loss so far; printed on rank 0.
        Returns (metrics, improved)."""
        m = eval_losses(self.raw, self.eval_loaders, self.tc.eval_iters, self.amp, self.world,
                        self.token_bytes)
        for layer, s in self.raw.moe_stats().items():
            m[f"moe/{layer}/maxvio"] = s["maxvio"]
        vios = [s["maxvio"] for s in self.raw.moe_stats().values()]
        if vios:
            m["moe_maxvio"] = max(vios)
        improved = m["val_loss"] < self.best_val
        self.best_val = min(self.best_val, m["val_loss"])
        m["best_val_loss"] = self.best_val
        self.print0(f"step {self.iter_num}: val {m['val_loss']:.4f}  train {m['train_loss']:.4f}  "
                    f"val bpb {m['val_bpb']:.4f}  train bpb {m['train_bpb']:.4f}  "
                    f"aux {m['val_aux']:.4g}" + ("  (best)" if improved else ""))
        return m, improved

    def final_metrics(self) -> dict[str, Any]:
        """Per rank: parameter hash (DDP kept them in sync) and Ray node id (where it ran)."""
        mine = (state_hash(self.raw), self.ctx.node_id())
        gathered = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(gathered, mine)                     # sync: once, at the end
        else:
            gathered = [mine]
        return {"param_hashes": [h for h, _ in gathered], "node_ids": [n for _, n in gathered],
                "done": True}

    # --- recording ------------------------------------------------------------------------------
    def record(self, metrics: dict[str, Any], best: bool = False, periodic: bool = False) -> dict:
        """The row: history, <run>/metrics.jsonl (rank 0), W&B, then one report
        (with a checkpoint when one is due) and, at evals, the in-process `report`."""
        tc = self.tc
        row = {**metrics, "tokens": metrics["step"] * tc.total_batch_size, **self.facts}
        self.history.append(row)
        self.last.update(row)
        if self.metrics_log is not None:
            self.metrics_log.append(row)
            if "val_loss" in row or best or periodic or row.get("done"):
                self.metrics_log.flush()             # object storage: one PUT per eval
        if self.wb is not None:
            self.wb.log({k: v for k, v in row.items() if isinstance(v, (int, float))},
                        step=self.iter_num)
        # reports carry the latest value of every metric, so each one has the val loss
        if tc.save_model and (best or periodic):
            self.checkpoint(best, periodic, self.needs_report(row))   # report: with a checkpoint
        elif self.needs_report(row):
            self.ctx.report(dict(self.last))                 # report: the row's metrics
        if self.report is not None and "val_loss" in row:    # at evals: every key is fresh
            self.report(dict(self.last))
        return row

    def needs_report(self, row: dict[str, Any]) -> bool:
        """A row Ray must see without a checkpoint: an eval (or the last row) with report_evals."""
        return self.report_evals and ("val_loss" in row or bool(row.get("done")))

    def checkpoint(self, best: bool, periodic: bool, report: bool = True) -> None:
        """Every rank calls this (RNG states are gathered); rank 0 writes it to a temporary dir,
        copies it to <run>/<file_name>_best when `best`, and the context reports it as
        <run>/checkpoint_NNNNNN when `periodic` (else the metrics alone, when `report`)."""
        tc, rank, world = self.tc, self.rank, self.world
        metrics = dict(self.last)
        rng = ckpt.rng_state()
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng)                          # sync: every checkpoint
        else:
            rngs = [rng]
        state = {"step": self.iter_num, "optimizer": self.opt.state_dict(),
                 "scaler": self.scaler.state_dict(), "loader": self.train_loader.state_dict(),
                 "rng": rngs, "best_val": self.best_val}
        name = f"checkpoint_{self.iter_num:06d}"
        tmp = tempfile.mkdtemp(prefix="chimera_ckpt_") if rank == 0 else None
        if rank == 0:
            ckpt.save_checkpoint(tmp, self.raw, model_config=self.mc.to_dict(),
                                 tokenizer=self.tokenizer, train_state=state,
                                 meta={**metrics, "run_name": tc.run_name,
                                       **({"init_from": tc.init_from} if tc.init_from else {})},
                                 adapter=self.adapter_info())
            if best:
                copy_dir(tmp, f"{self.run_dir}/{tc.file_name}_best")
        if periodic:
            self.ctx.report(metrics, checkpoint=tmp, name=name)       # report: with it
            self.last_checkpoint = f"{self.run_dir}/{name}"
        elif report:
            self.ctx.report(metrics)                                  # report: the row alone
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    def adapter_info(self) -> dict | None:
        """adapter.json of a LoRA run's checkpoints (None without LoRA)."""
        tc = self.tc
        if not tc.lora_rank:
            return None
        return {"rank": tc.lora_rank, "alpha": tc.lora_alpha, "targets": list(self.lora_targets),
                "base": self.init.get("init_from", tc.init_from),
                "base_sha256": self.init.get("base_sha256")}

    def print0(self, *a) -> None:
        if self.rank == 0:
            print(*a, flush=True)
