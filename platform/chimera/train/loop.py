"""The training loop: `train_fn_per_worker(config)` (one per Ray Train worker) and `fit(plan)`.

    from chimera.train.config import load_train_config

    from chimera.train.plan import plan_run
    plan = plan_run(load_train_config({"max_iters": 50, "n_embd": 64, "data_dir": "..."}))
    summary = train_fn_per_worker(plan.worker_config)     # in-process, world size 1, no Ray
    summary = fit(plan)                                  # TorchTrainer on plan.train.num_workers

Per worker: build the model from the resolved config; restore the latest checkpoint (Ray's
`get_checkpoint()`, else `resume_from`) *before* the loop so step, optimizer, scaler, data
position and RNG continue; wrap for DDP (Ray's prepare_model: gloo on CPU, NCCL on GPU);
grad accumulation with `no_sync()` on all but the last micro-step; AdamW (fused on CUDA,
decay on >=2-D weights only); warmup + cosine lr; clipping; bf16 autocast on CUDA (fp16 +
GradScaler without bf16), fp32 on CPU. Metrics every log_interval, eval every eval_interval
(cross-entropy without the MoE terms, which are reported apart with MaxVio per MoE layer),
checkpoints every ckpt_interval, at a new best val loss (also copied to <run>/<file_name>_best)
and at the end. Rank 0 prints, writes <run>/metrics.jsonl (local storage) and logs to W&B.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from chimera import checkpoint as ckpt
from chimera.data.loader import ShardLoader
from chimera.train.schedule import lr_at
from chimera.train.config import TrainConfig
from chimera.train.plan import RunPlan

# peak dense FLOP/s per worker for MFU when --peak_flops is not given
GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
            "V100": 125e12, "T4": 65e12}
CPU_PEAK_PER_THREAD = 1e11          # ~32 fp32 FLOP/cycle (AVX2 FMA x2) at ~3 GHz


def _print0(rank: int, *a) -> None:
    if rank == 0:
        print(*a, flush=True)


def _ray_context():
    """Ray Train's context inside a TorchTrainer worker, else None."""
    try:
        import ray.train
        ctx = ray.train.get_context()
        ctx.get_world_size()
        return ctx
    except Exception:
        return None


def _node_id() -> str | None:
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def peak_flops(device: torch.device, given: float | None) -> float:
    if given:
        return given
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK.items() if k in name), 100e12)
    return CPU_PEAK_PER_THREAD * torch.get_num_threads()


def _all_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
        t = t / world
    return t


def state_hash(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (MoE biases included)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def evaluate(raw, loaders: dict[str, ShardLoader], iters: int, amp, world: int) -> dict[str, float]:
    raw.eval()
    out: dict[str, float] = {}
    for name, ld in loaders.items():
        ld.reset()
        acc = torch.zeros(2, dtype=torch.float64, device=next(raw.parameters()).device)
        for _ in range(iters):
            x, y = ld.next_batch()
            with amp():
                _, ce, aux = raw.forward_with_aux(x, y)
            acc += torch.stack([ce.double(), aux.double()])
        acc = _all_mean(acc / iters, world)
        out[f"{name}_loss"], out[f"{name}_aux"] = acc[0].item(), acc[1].item()
    raw.train()
    return out


def _copy_dir(src: str, dst: str) -> None:
    """Replace dst (local path or pyarrow URI) by a copy of local dir src."""
    if "://" in dst:
        import pyarrow.fs as pafs
        fs, path = pafs.FileSystem.from_uri(dst)
        with contextlib.suppress(Exception):
            fs.delete_dir(path)
        pafs.copy_files(src, dst)
    else:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def train_fn_per_worker(config: dict[str, Any], report=None) -> dict[str, Any]:
    """One worker's training run. `report(metrics)` (in-process runs only, e.g. a Tune trial)
    is called at every record with the cumulative metrics: the latest value of every key."""
    from models import LLM, ModelConfig

    tc = TrainConfig.from_dict(config["train"])
    mc = ModelConfig.from_dict(config["model_config"])
    run_dir, accum = config["run_dir"], int(config["grad_accum"])
    local_run = "://" not in run_dir
    ctx = _ray_context()
    rank, world = (ctx.get_world_rank(), ctx.get_world_size()) if ctx else (0, 1)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if ctx is not None:
        import ray.train.torch
        device = ray.train.torch.get_device()
    else:
        device = torch.device("cuda" if tc.use_gpu and torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    amp_dtype = torch.bfloat16 if bf16 else torch.float16

    def amp():
        return torch.autocast("cuda", dtype=amp_dtype) if cuda else contextlib.nullcontext()

    torch.manual_seed(tc.seed)                       # same init everywhere; DDP broadcasts anyway
    raw = LLM(mc).to(device)
    decay = [p for p in raw.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.learning_rate, betas=(tc.beta1, tc.beta2),
                            **({"fused": True} if cuda else {}))
    scaler = torch.amp.GradScaler("cuda" if cuda else "cpu", enabled=cuda and not bf16)
    T = mc.block_size
    train = ShardLoader(tc.data_dir, "train", tc.batch_size, T, rank=rank, world_size=world,
                        seed=tc.seed, device=device)
    evals = {"val": ShardLoader(tc.data_dir, "val", tc.batch_size, T, rank=rank, world_size=world,
                                device=device),
             "train": ShardLoader(tc.data_dir, "train", tc.batch_size, T, rank=rank,
                                  world_size=world, seed=tc.seed + 1, shuffle=True, device=device)}

    # --- resume: Ray's latest checkpoint of this run first, else --resume_from -------------------
    step, best_val, resumed_from = 0, math.inf, None
    source = None
    if ctx is not None:
        import ray.train
        source = ray.train.get_checkpoint()
    if source is None and tc.resume_from:
        from ray.train import Checkpoint
        source = Checkpoint(tc.resume_from)
    if source is not None:
        with source.as_directory() as d:
            ckpt.load_weights(raw, d, device)
            st = ckpt.load_train_state(d)
        opt.load_state_dict(st["optimizer"])
        scaler.load_state_dict(st["scaler"])
        step, best_val, resumed_from = int(st["step"]), float(st["best_val"]), int(st["step"])
        try:
            train.load_state_dict(st["loader"])
        except ValueError as e:          # e.g. another world size: start that stream afresh
            _print0(rank, f"note: data position not restored ({e})")
        rngs = st["rng"]
        ckpt.set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
        _print0(rank, f"resumed from step {step} ({source.path})")

    model = raw
    if ctx is not None:
        import ray.train.torch
        model = ray.train.torch.prepare_model(raw)
    ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
    if tc.compile and hasattr(torch, "compile"):
        model = torch.compile(model)

    fpt = raw.flops_per_token()
    peak = peak_flops(device, tc.peak_flops)
    counts = raw.num_params()
    facts = {"world_size": world, "params_total": counts.total, "params_active": counts.active, "flops_per_token": fpt,
             "kv_bytes_per_token": raw.kv_cache_bytes_per_token(
                 amp_dtype if cuda else torch.float32)}
    wb = None
    if tc.wandb_log and rank == 0:
        import wandb
        wb = wandb.init(project=tc.wandb_project, name=tc.wandb_run_name or tc.run_name,
                        id=tc.run_name, resume="allow", config={**tc.to_dict(), "model": mc.to_dict()},
                        dir=os.environ.get("WANDB_DIR") or (run_dir if local_run else None))
    if local_run and rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    _print0(rank, f"model {mc.summary()}  params {raw.num_params().total:,}  world {world}  "
                  f"grad_accum {accum}  tokens/step {tc.total_batch_size:,}  device {device}")

    def save(metrics: dict, best: bool, periodic: bool) -> str | None:
        """Every rank calls this (RNG states are gathered); rank 0 writes. Returns the path."""
        rng = ckpt.rng_state()
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        state = {"step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                 "loader": train.state_dict(), "rng": rngs, "best_val": best_val}
        name = f"checkpoint_{step:06d}"
        tmp = tempfile.mkdtemp(prefix="chimera_ckpt_") if rank == 0 else None
        if rank == 0:
            ckpt.save_checkpoint(tmp, raw, model_config=mc.to_dict(), tokenizer=config["tokenizer"],
                                 train_state=state, meta={**metrics, "run_name": tc.run_name})
            if best:
                _copy_dir(tmp, f"{run_dir}/{tc.file_name}_best")
        path = f"{run_dir}/{name}"
        if ctx is not None:
            import ray.train
            if periodic:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp)
                                 if rank == 0 else None, checkpoint_dir_name=name)
            else:
                ray.train.report(metrics)
        elif periodic:
            _copy_dir(tmp, path)
            ckpt.prune(run_dir, tc.keep_checkpoints)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        return path if periodic else None

    history: list[dict] = []
    last: dict[str, Any] = {}
    last_ckpt = None

    def record(metrics: dict, best: bool, periodic: bool) -> None:
        nonlocal last_ckpt
        metrics = {**metrics, "tokens": metrics["step"] * tc.total_batch_size, **facts}
        history.append(metrics)
        last.update(metrics)
        if rank == 0 and local_run:
            with open(Path(run_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if wb is not None:
            wb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        # reports carry the latest value of every metric, so each one has the val loss
        if tc.save_model and (best or periodic):
            p = save(dict(last), best, periodic)
            last_ckpt = p or last_ckpt
        elif ctx is not None:
            import ray.train
            ray.train.report(dict(last))
        if report is not None and "val_loss" in metrics:      # at evals: every key is fresh
            report(dict(last))

    def eval_metrics() -> tuple[dict, bool]:
        nonlocal best_val
        m = evaluate(raw, evals, tc.eval_iters, amp, world)
        for layer, s in raw.moe_stats().items():
            m[f"moe/{layer}/maxvio"] = s["maxvio"]
        vios = [s["maxvio"] for s in raw.moe_stats().values()]
        if vios:
            m["moe_maxvio"] = max(vios)
        improved = m["val_loss"] < best_val
        best_val = min(best_val, m["val_loss"])
        m["best_val_loss"] = best_val
        _print0(rank, f"step {step}: val {m['val_loss']:.4f}  train {m['train_loss']:.4f}  "
                      f"aux {m['val_aux']:.4g}" + ("  (best)" if improved else ""))
        return m, improved

    if tc.eval and step == 0:
        m, _ = eval_metrics()
        record({"step": 0, **m}, best=False, periodic=False)

    raw.train()
    t0, steps_since, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
    while step < tc.max_iters:
        if (tc.crash_at_step and step == tc.crash_at_step and rank == world - 1 and local_run):
            marker = Path(run_dir) / f".crashed_at_{step}"
            if not marker.exists():                       # crash once per run (test hook)
                marker.touch()
                print(f"rank {rank}: injected crash at step {step}", flush=True)
                os._exit(1)
        lr = lr_at(step, tc.learning_rate, tc.warmup_steps, tc.max_iters)
        for g in opt.param_groups:
            g["lr"] = lr
        for micro in range(accum):
            x, y = train.next_batch()
            sync = ddp is None or micro == accum - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                with amp():
                    _, loss = model(x, y)
                loss_sum += loss.detach().float()
                scaler.scale(loss / accum).backward()
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(),
                                               tc.grad_clip if tc.grad_clip > 0 else math.inf)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        raw.update_moe_biases()
        step += 1
        steps_since += 1

        do_log = step % tc.log_interval == 0 or step == tc.max_iters
        do_eval = tc.eval and (step % tc.eval_interval == 0 or step == tc.max_iters)
        periodic = step % tc.ckpt_interval == 0 or step == tc.max_iters
        if not (do_log or do_eval or (tc.save_model and periodic)):
            continue
        metrics: dict[str, Any] = {"step": step}
        if do_log:
            if cuda:
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / steps_since
            loss_avg = _all_mean(loss_sum / (steps_since * accum), world).item()
            tps = tc.total_batch_size / dt
            metrics.update(loss=loss_avg, lr=lr, grad_norm=gnorm.item(), tokens_per_s=tps,
                           mfu=fpt * tps / (peak * world), step_time_s=dt)
            _print0(rank, f"step {step}/{tc.max_iters}  loss {loss_avg:.4f}  lr {lr:.2e}  "
                          f"gnorm {gnorm.item():.3f}  {tps:,.0f} tok/s  mfu {100 * metrics['mfu']:.1f}%  "
                          f"{1000 * dt:.0f} ms/step")
        improved = False
        if do_eval:
            m, improved = eval_metrics()
            metrics.update(m)
        if step == tc.max_iters:
            # per rank: parameter hash (DDP kept them in sync) and Ray node id (where it ran)
            mine = (state_hash(raw), _node_id() if ctx is not None else None)
            gathered = [None] * world
            if world > 1:
                dist.all_gather_object(gathered, mine)
            else:
                gathered = [mine]
            metrics.update(param_hashes=[h for h, _ in gathered],
                           node_ids=[n for _, n in gathered], done=True)
        if resumed_from is not None:
            metrics["resumed_from_step"] = resumed_from
        record(metrics, best=improved, periodic=periodic)
        if do_log:
            t0, steps_since, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)

    if wb is not None:
        wb.finish()
    best_path = f"{run_dir}/{tc.file_name}_best" if tc.save_model and best_val < math.inf else None
    return {"step": step, "metrics": last, "history": history, "last_checkpoint": last_ckpt,
            "best_checkpoint": best_path, "resumed_from_step": resumed_from}


def fit(plan: RunPlan, callbacks: list | None = None) -> dict[str, Any]:
    """Run train_fn_per_worker on plan.train.num_workers Ray Train workers; a summary dict.
    `callbacks`: Ray Train user callbacks (a sweep trial passes Tune's TuneReportCallback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = plan.train
    per_worker = {"CPU": max(1, tc.num_threads), **({"GPU": 1} if tc.use_gpu else {})}
    trainer = TorchTrainer(
        train_fn_per_worker, train_loop_config=plan.worker_config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        run_config=RunConfig(name=plan.run_name, storage_path=plan.storage_path,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
                             callbacks=callbacks,
                             # W&B settings of the driver (WANDB_MODE, WANDB_DIR, ...) reach rank 0
                             worker_runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                                              if k.startswith("WANDB_")}}))
    result = trainer.fit()
    m = dict(result.metrics or {})
    best = f"{plan.run_dir}/{tc.file_name}_best" if tc.save_model and m.get("best_val_loss") else None
    return {"step": m.get("step"), "metrics": m, "last_checkpoint":
            result.checkpoint.path if result.checkpoint else None, "best_checkpoint": best,
            "resumed_from_step": m.get("resumed_from_step")}
