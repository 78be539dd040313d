"""``start_server``: run ``hybridpar serve`` in the background, from a notebook cell or a test.

::

    server = start_server(tensor_parallel_size=2)          # returns once /health answers 200
    client = openai.OpenAI(base_url=server.base_url, api_key="none")
    ...
    server.stop()                                          # SIGTERM: drain, end the ranks

The server is a child process (``python -m hybridpar serve ...``), not a thread of the caller:
its log goes to a file instead of the notebook's outputs, a crash in it cannot take the kernel
down, and ``stop`` is the same SIGTERM an operator sends. If the caller dies, Linux sends the
server SIGTERM (parent-death signal), and the server's ranks die with it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridpar.distributed.launcher import free_port, set_parent_death_signal


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message ends with its log."""


@dataclass
class ServerHandle:
    """A running server: ``url`` (``http://host:port``), ``base_url`` (``.../v1``, for the openai client),
    ``pid``, ``log_path``; ``stop()`` ends it (also on garbage collection and at interpreter exit)."""

    url: str
    process: subprocess.Popen
    log_path: Path
    api_key: str | None = None
    _finalizer: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._finalizer = weakref.finalize(self, _terminate, self.process, 30.0)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to ``timeout`` s for the drain, then SIGKILL; returns the exit status."""
        self._finalizer.detach()
        return _terminate(self.process, timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_server(model: str | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                 api_key: str | None = None, start_timeout: float = 300.0, **engine_args: Any) -> ServerHandle:
    """Start ``hybridpar serve`` with ``engine_args`` as its flags (``tensor_parallel_size=2`` ->
    ``--tensor-parallel-size 2``; ``True`` -> a bare flag) and wait until it is healthy."""
    port = port or free_port()
    argv = [sys.executable, "-m", "hybridpar", "serve"] + ([model] if model else [])
    argv += ["--host", host, "--port", str(port)] + (["--api-key", api_key] if api_key else [])
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    log = Path(tempfile.mkstemp(prefix="hybridpar-serve-", suffix=".log")[1])
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM),
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    handle = ServerHandle(f"http://{host}:{port}", process, log, api_key)
    end = time.monotonic() + start_timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise ServerStartError(f"hybridpar serve exited with status {process.returncode}:\n{handle.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{handle.url}/health", timeout=2) as r:
                if r.status == 200:
                    return handle
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    handle.stop(5.0)
    raise ServerStartError(f"hybridpar serve was not healthy after {start_timeout:g} s:\n{handle.log()[-3000:]}")


def _terminate(process: subprocess.Popen, timeout: float) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
