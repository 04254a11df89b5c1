"""Serve trained checkpoints over HTTP on Ray Serve (KV-cached, continuously batched).

    python jobs/serve.py --checkpoint runs/my_run                  # a run dir: its best checkpoint
    python jobs/serve.py --checkpoint small=runs/a --checkpoint big=runs/b/checkpoint_002000
    python jobs/serve.py --from_sweep sweeps/s1 --top_k 3 --host 0.0.0.0 --port 8000
    python jobs/serve.py --checkpoint runs/base --adapter runs/my_lora   # base + LoRA, merged
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/serve.py --checkpoint ...
    serve run serve.app:build_app checkpoint=runs/my_run            # the same app, Serve's CLI
    CHIMERA_API_KEY=$(cat key.txt) python jobs/serve.py --checkpoint runs/my_run   # keys required
    python jobs/serve.py --checkpoint runs/my_run --api_key_file keys.txt --num_replicas 2

API keys never belong on a command line (`ps` shows it, and `ray job submit` records its
entrypoint): give --api_key_file (on the cluster, a path on the head node, where the job's
entrypoint runs) or CHIMERA_API_KEY in this process's environment.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /tokenizer_info, POST /tokenize,
POST /detokenize, POST /generate, GET /v1/models, GET /health (see README).
Binds 127.0.0.1 unless --host says otherwise; serves until interrupted (Ctrl-C, SIGINT, SIGTERM),
then shuts Serve down. Every flag is checked before Ray starts (exit code 2).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

def build_parser() -> argparse.ArgumentParser:
    from _paths import setup
    setup()
    from chimera.paramdocs import DocDefaultsFormatter
    p = argparse.ArgumentParser(prog="jobs/serve.py", description=__doc__,
                                formatter_class=DocDefaultsFormatter)
    from serve.app import add_app_arguments
    add_app_arguments(p)                      # the application's flags: serve.app.AppArgs
    a = p.add_argument
    a("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    a("--port", type=int, default=8000, help="HTTP port of Serve's proxy")
    a("--app_name", default="chimera", help="name of the Serve application")
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    from _paths import setup
    setup()
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from serve.app import AppArgs, build_app, resolve_keys, resolve_models, resolve_templates
    try:
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        app_args = AppArgs(**{k: v for k, v in vars(args).items()
                              if k not in ("host", "port", "app_name")})
        models = resolve_models(app_args)
        resolve_templates(app_args, [n for n, _ in models])
        keys = resolve_keys(app_args)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(x) for x in err["loc"])
        print(f"error: {'--' + loc + ': ' if loc else ''}{err['msg']}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from ray import serve

    from chimera.runtime import init_ray
    init_ray()
    # SIGTERM and SIGINT both stop it cleanly; SIGINT explicitly, since a background job of a
    # shell (`python jobs/serve.py ... &`) inherits SIGINT as ignored
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(app_args), name=args.app_name, route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        print(f"serving {', '.join(n for n, _ in models)} at {url}  (Ctrl-C to stop)", flush=True)
        print(f"  API keys: {len(keys.digests)} (every route but /health needs one)" if keys.required
              else "  API keys: none (anyone who reaches the port may call it)", flush=True)
        for name, path in models:
            print(f"  {name}: {path}" + (f" + adapter {app_args.adapter}" if app_args.adapter else ""),
                  flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
