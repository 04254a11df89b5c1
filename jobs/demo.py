"""The whole platform in one command (`make demo`): data -> Ray Train -> checkpoint -> Ray Serve.

    python jobs/demo.py                                       # Tiny Shakespeare from its public URL
    python jobs/demo.py --source ../shared/data/tinyshakespeare/input.txt     # offline
    make demo SOURCE=../shared/data/tinyshakespeare/input.txt

Prepares Tiny Shakespeare (char tokens), starts a private local Ray cluster with `ray start
--head` (token authentication on), submits training of the heterogeneous stack in
configs/hetero.jsonl with `ray job submit` (2 workers), serves the best checkpoint with
jobs/serve.py on Ray Serve, sends a real HTTP request, prints the text and where everything is,
then stops what it started: the server and every process of its Ray cluster (also on Ctrl-C;
other Ray clusters on the machine are left alone).
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import urllib.request


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/demo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="Tiny Shakespeare text file or URL (default: the public URL)")
    p.add_argument("--data_dir", help="prepared data (default <repo>/data/demo_shakespeare_char, "
                                      "the demo's own: re-prepared when --source changes)")
    p.add_argument("--storage_path", help="where the run goes (default <repo>/runs)")
    p.add_argument("--max_iters", type=int, default=200, help="training steps")
    p.add_argument("--prompt", default="ROMEO:\n", help="prompt of the HTTP request")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--num_cpus", type=int, default=2, help="CPUs of the local Ray cluster (>= 2)")
    return p


def main(argv: list[str] | None = None) -> int:
    from _paths import setup
    repo = setup()
    args = build_parser().parse_args(argv)
    for k, lo in (("max_iters", 1), ("max_new_tokens", 1), ("num_cpus", 2)):
        if getattr(args, k) < lo:
            print(f"error: --{k}={getattr(args, k)} must be >= {lo}", file=sys.stderr)
            return 2
    from chimera.localcluster import LocalCluster, free_port
    from chimera.data.prepare import prepare
    from chimera.paths import resolve_storage_path

    data_dir = args.data_dir or str(repo / "data" / "demo_shakespeare_char")
    storage = resolve_storage_path(args.storage_path)
    run_name = time.strftime("demo-%Y%m%d-%H%M%S")
    t0 = time.time()
    print(f"[1/4] preparing Tiny Shakespeare (char) -> {data_dir}", flush=True)
    try:
        prepare("shakespeare", out=data_dir, sources=[args.source] if args.source else None,
                tokenizer="char", progress=False, overwrite=args.data_dir is None)
    except Exception as e:                    # DataError, network errors: say what and how
        print(f"error: {e}\n(offline? pass --source PATH, e.g. make demo "
              f"SOURCE=../shared/data/tinyshakespeare/input.txt)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    cluster, server = LocalCluster(num_cpus=args.num_cpus), None
    try:
        print("[2/4] starting a local Ray cluster (ray start --head, token auth on)", flush=True)
        cluster.start()
        print(f"      dashboard {cluster.dashboard_url}  (RAY_AUTH_MODE=token clients)", flush=True)
        print("[3/4] ray job submit: training on 2 workers", flush=True)
        train = [cluster.ray_bin, "job", "submit", "--address", cluster.dashboard_url,
                 "--working-dir", str(repo), "--", sys.executable, "jobs/train.py",
                 "--data_dir", str(data_dir), "--storage_path", storage, "--run_name", run_name,
                 "--layer_configs_jsonl", "configs/hetero.jsonl", "--n_embd", "64",
                 "--block_size", "64", "--batch_size", "8", "--total_batch_size_str", "2*8*64",
                 "--num_workers", "2", "--max_iters", str(args.max_iters), "--learning_rate", "3e-3",
                 "--warmup_steps", "20", "--eval", "--eval_interval", str(max(1, args.max_iters // 4)),
                 "--eval_iters", "10", "--log_interval", "25", "--save_model"]
        if subprocess.run(train, env=cluster.env, cwd=repo).returncode != 0:
            print("error: the training job failed (its log is above)", file=sys.stderr)
            return 1
        run_dir = f"{storage}/{run_name}"
        port = free_port()
        print(f"[4/4] serving {run_dir} on Ray Serve", flush=True)
        server = subprocess.Popen([sys.executable, str(repo / "jobs" / "serve.py"), "--checkpoint",
                                   run_dir, "--port", str(port)], env=cluster.env, cwd=repo,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in server.stdout:
            if line.startswith(("serving ", "error")) or "Traceback" in line:
                print("      " + line.rstrip(), flush=True)
            if line.startswith("serving "):
                break
        else:
            print("error: the server stopped before serving", file=sys.stderr)
            return 1
        import threading                                 # keep draining its log (no full pipe)
        threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()
        body = json.dumps({"prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
                           "temperature": 0.8, "top_k": 40, "seed": 1337}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
        print(f"      curl -s http://127.0.0.1:{port}/generate -H 'Content-Type: application/json' "
              f"-d '{body.decode()}'", flush=True)
        with urllib.request.urlopen(req, timeout=300) as r:
            out = json.loads(r.read())
        print("\n" + args.prompt + out["text"] + "\n")
        t = out["timings"]
        print(f"generated {out['completion_tokens']} tokens ({out['finish_reason']}), first token "
              f"after {1000 * t['ttft_s']:.0f} ms, {t['tokens_per_s']:.0f} tok/s")
        from chimera.checkpoint import read_config
        from models import ModelConfig
        print(f"model        {ModelConfig.from_dict(read_config(f'{run_dir}/llm_model_best')).summary()}")
        print(f"checkpoint   {run_dir}/llm_model_best  (config.json, model.safetensors, tokenizer.json)")
        print(f"metrics      {run_dir}/metrics.jsonl")
        print(f"total time   {time.time() - t0:.0f} s; shutting down the server and the cluster")
        return 0
    except KeyboardInterrupt:
        print("interrupted: shutting down", file=sys.stderr)
        return 130
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)           # jobs/serve.py shuts Serve down
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        cluster.stop()
        left = cluster.processes()
        print(f"Ray processes of the demo left: {len(left)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
