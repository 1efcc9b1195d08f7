"""sim_bench.py's ClientApp and ServerApp, imported from ``shared/peers/flower``.

Its ServerApp reads a module global ``ARGS`` (``--clients``, ``--rounds``) that only its
``__main__`` sets; the ServerApp here sets it from the run config and then runs
sim_bench's own ``main`` unchanged.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp


def _sim_bench() -> ModuleType:
    """``$FLOWER_PEER_DIR/sim_bench.py``, else the nearest ``shared/peers/flower`` above."""
    found = sys.modules.get("sim_bench")
    if found is not None:
        return found
    env = os.environ.get("FLOWER_PEER_DIR")
    candidates = [Path(env)] if env else []
    candidates += [p / "shared" / "peers" / "flower" for p in Path(__file__).resolve().parents]
    for directory in candidates:
        path = directory / "sim_bench.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location("sim_bench", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules["sim_bench"] = module
            spec.loader.exec_module(module)
            return module
    raise ImportError("shared/peers/flower/sim_bench.py not found: set FLOWER_PEER_DIR")


sim_bench = _sim_bench()
client_app = sim_bench.client_app
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """sim_bench's ``main`` with the ``ARGS`` its command line would give."""
    sim_bench.ARGS = SimpleNamespace(
        clients=int(context.run_config["num-clients"]),
        rounds=int(context.run_config["num-server-rounds"]),
        cpus_per_client=1,
        out="",
    )
    sim_bench.main(grid, context)
