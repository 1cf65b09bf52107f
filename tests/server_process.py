"""Start the real render server as a subprocess on an ephemeral port (for tests and benches).

    with ServerProcess("--backend", "preview") as server:
        client = Client(server.host, server.port)

The server prints ``listening on HOST:PORT`` when ready; its stderr (one line per request)
goes to a temporary file, readable with ``log()``, so a chatty server never blocks on a full
pipe.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 120.0       # first start compiles the preview renderer's kernels


class ServerProcess:
    def __init__(self, *args: str, env: dict | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT):
        self.args = ["--port", "0", *args]
        self.env = env
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.host, self.port = "", 0
        self._log = tempfile.TemporaryFile(mode="w+b")

    def start(self) -> "ServerProcess":
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "server", *self.args], cwd=REPO,
                                     env=env, stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.DEVNULL)
        line = self._read_line(self.startup_timeout)
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"server did not start: stdout {line!r}\n{self.log()}")
        self.host, port = line[len("listening on "):].rsplit(":", 1)
        self.host = self.host.strip("[]")
        self.port = int(port)
        return self

    def _read_line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return ""
        return self.proc.stdout.readline().decode().strip()

    def log(self) -> str:
        """Everything the server wrote to stderr so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.terminate()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.proc.stdout.close()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()
