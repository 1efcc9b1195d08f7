"""Where the peer workloads live, and the machine's load: shared by the benchmark scripts.

The peers sit beside the repository (``../shared/peers``), or two levels up from a
worktree; ``$FLOWER_PEER_DIR`` overrides the Flower ones. Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def flower_peer_dir() -> Path:
    """``$FLOWER_PEER_DIR``, else the nearest ``shared/peers/flower`` above the repository,
    else ``../shared/peers/flower`` (which may not exist: the scripts that run a peer say so
    when they need it; importing them never fails)."""
    if os.environ.get("FLOWER_PEER_DIR"):
        return Path(os.environ["FLOWER_PEER_DIR"])
    for parent in REPO.parents:
        if (parent / "shared" / "peers" / "flower").is_dir():
            return parent / "shared" / "peers" / "flower"
    return REPO.parent / "shared" / "peers" / "flower"


def load() -> str:
    """The 1, 5 and 15 minute load averages (as ``uptime`` prints them)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
