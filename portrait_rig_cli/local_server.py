"""A render server subprocess on an ephemeral loopback port, for the length of a ``with``.

    with LocalServer("--backend", "preview", "--quiet") as server:
        print(server.host, server.port)

It runs ``python -m server --port 0 ARGS`` with this interpreter and reads the port from the
one line the server prints when it listens (``listening on HOST:PORT``). Its stderr goes to a
temporary file (``log()``), so a chatty server never blocks on a full pipe. The demo command,
the benchmarks and the tests all start their servers through this class.
"""

from __future__ import annotations

import importlib.util
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

STARTUP_TIMEOUT_S = 180.0     # the first start compiles the preview renderer's kernels


class LocalServer:
    def __init__(self, *args: str, env: dict | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT_S):
        self.args = ["--port", "0", *args]
        self.env = env
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.host, self.port = "", 0
        self._log = tempfile.TemporaryFile(mode="w+b")

    def start(self) -> "LocalServer":
        spec = importlib.util.find_spec("server")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the render server is not installed: pip install "
                               "'portrait-rig[server]'")
        # The child must import the same ``server`` package, installed or not.
        packages = str(Path(next(iter(spec.submodule_search_locations))).resolve().parent)
        path = os.pathsep.join(p for p in (packages, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "server", *self.args], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._log)
        ready, _, _ = select.select([self.proc.stdout], [], [], self.startup_timeout)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the render server did not start within "
                               f"{self.startup_timeout:g} s (stdout {line!r}):\n{self.log()}")
        host, port = line[len("listening on "):].rsplit(":", 1)
        self.host, self.port = host.strip("[]"), int(port)
        return self

    def log(self) -> str:
        """What the server wrote to stderr so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """``terminate``, then SIGKILL if it does not exit within ``timeout``."""
        if self.proc is None:
            return
        try:
            self.terminate(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.proc.stdout.close()

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()
