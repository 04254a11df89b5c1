"""A private local Ray cluster started with `ray start --head` (token auth on), and stopped
without touching any other Ray cluster on the machine.

    with LocalCluster(num_cpus=2) as c:          # ray start --head in its own temp dir, free ports
        c.env                                    # RAY_ADDRESS, RAY_AUTH_MODE=token and the
                                                 # cluster's token file for clients
        c.dashboard_url                          # `ray job submit --address` takes it
    # left: every process of this cluster killed (also on Ctrl-C)

Token authentication from nothing: Ray 2.60's `ray start --head` never creates a token (only
`ray.init()` of a new local cluster and `ray get-auth-token --generate` do, in ~/.ray), and
turns authentication on only when one exists. So the cluster gets its own token, generated
here into its temp dir (mode 0600) and passed to `ray start` and to every client through
RAY_AUTH_TOKEN_PATH: it works on a machine where Ray never ran, and it neither reads nor
writes the user's ~/.ray.

`ray stop` would kill every Ray process of the user (other clusters, a test session's), so
stop() kills only the processes whose command line names this cluster's temp dir or ports,
and their children (the worker processes).
"""
from __future__ import annotations

import os
import secrets
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
        # Ray's socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay < 108
        base = tempfile.gettempdir()
        self.temp_dir = tempfile.mkdtemp(prefix="chimera_ray_", dir=base if len(base) <= 32 else "/tmp")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.ports = [self.gcs_port, self.dashboard_port, free_port(), free_port()]
        self.token_path = str(Path(self.temp_dir) / "auth_token")
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
        """The environment of a client (and of `ray start`): this cluster, its token, auth on."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}   # it would win
        return {**env, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": self.token_path}

    def _write_token(self) -> None:
        # the format of Ray's own generator (256 random bits, hex); private to this cluster
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))

    def start_command(self) -> list[str]:
        """`ray start --head` of this cluster (a subclass adds its own flags)."""
        return [self.ray_bin, "start", "--head", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
                "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-agent-listen-port={self.ports[2]}",
                f"--ray-client-server-port={self.ports[3]}", "--disable-usage-stats"]

    def start_env(self) -> dict[str, str]:
        """The environment of `ray start`: every process of the cluster inherits it."""
        return {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}

    def start(self) -> "LocalCluster":
        cmd = self.start_command()
        self.started = True          # from here on stop() must run, even if start fails
        self._write_token()
        env = self.start_env()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
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
