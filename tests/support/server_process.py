"""The real render server as a subprocess on an ephemeral port, for tests and benches:

    with ServerProcess("--backend", "preview") as server:
        client = Client(server.host, server.port)

The same class the ``portrait-rig`` command uses (``portrait_rig_cli.local_server``).
"""

from pathlib import Path

from portrait_rig_cli.local_server import LocalServer as ServerProcess

REPO = Path(__file__).resolve().parents[2]

__all__ = ["REPO", "ServerProcess"]
