"""A private local Ray cluster started with `ray start --head` (token auth on), and stopped
without touching any other Ray cluster on the machine.

    with LocalCluster(num_cpus=2) as c:          # ray start --head in its own temp dir, free ports
        c.env                                    # RAY_ADDRESS / RAY_AUTH_MODE=token for clients
        c.dashboard_url                          # `ray job submit --address` takes it
    # left: every process of this cluster killed (also on Ctrl-C)

`ray stop` would kill every Ray process of the user (other clusters, a test session's), so
stop() kills only the processes whose command line names this cluster's temp dir or ports,
and their children (the worker processes).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, num_cpus: int = 2, log=print):
        self.num_cpus = num_cpus
        self.log = log
        self.temp_dir = tempfile.mkdtemp(prefix="chimera_ray_")     # short: socket paths < 108
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.ports = [self.gcs_port, self.dashboard_port, free_port(), free_port()]
        self.started = False

    @property
    def ray_bin(self) -> str:
        return str(Path(sys.executable).with_name("ray"))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}

    def start(self) -> "LocalCluster":
        cmd = [self.ray_bin, "start", "--head", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               "--node-ip-address=127.0.0.1",
               f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}",
               f"--dashboard-agent-listen-port={self.ports[2]}",
               f"--ray-client-server-port={self.ports[3]}", "--disable-usage-stats"]
        self.started = True          # from here on stop() must run, even if start fails
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                             env={**os.environ, "RAY_AUTH_MODE": "token"})
        if out.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        deadline = time.time() + 60               # the job server answers once the dashboard is up
        import urllib.request
        while True:
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
                break
            except Exception as e:
                if getattr(e, "code", None) is not None:       # 401 without a token: it is up
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"the Ray dashboard at {self.dashboard_url} did not come up") from None
                time.sleep(0.5)
        return self

    def processes(self) -> list:
        """This cluster's processes: command lines naming its temp dir or its ports, + children."""
        import psutil
        marks = [self.temp_dir] + [f"={p}" for p in self.ports] + [f":{self.gcs_port}"]
        found = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                line = " ".join(p.info["cmdline"] or [])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if p.pid != os.getpid() and any(m in line for m in marks) and "ray" in line:
                found[p.pid] = p
                try:
                    for c in p.children(recursive=True):
                        found[c.pid] = c
                except psutil.NoSuchProcess:
                    pass
        return list(found.values())

    def stop(self) -> None:
        if not self.started:
            return
        import psutil
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.started = False

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
