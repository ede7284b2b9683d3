"""The client library is the library alone: importing ``client`` (every module outside
client/cli/) loads no broker, worker or command-line code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIBRARY = sorted(f"client.{p.stem}" for p in (REPO / "client").glob("*.py") if p.stem != "__init__")

# Run in a fresh interpreter, from the repository root (so that it imports this tree).
PROBE = """
import importlib, json, sys
for name in ["client", *sys.argv[1:]]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def _forbidden(name: str) -> bool:
    # By package, not by string prefix: client.client starts with "client.cli" but is the library.
    return name.split(".")[0] in ("broker", "worker") or name == "client.cli" or name.startswith("client.cli.")


def test_importing_the_client_library_loads_no_broker_worker_or_cli_module() -> None:
    assert "client.client" in LIBRARY and "client.aio" in LIBRARY
    out = subprocess.run([sys.executable, "-c", PROBE, *LIBRARY], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60)
    loaded = json.loads(out.stdout)
    assert "client" in loaded and "client.aio" in loaded
    assert [m for m in loaded if _forbidden(m)] == []


def test_the_cli_loads_launchers_only_when_they_run() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, "client.cli"], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60)
    loaded = json.loads(out.stdout)
    assert "client.cli" in loaded
    assert [m for m in loaded if m.split(".")[0] in ("broker", "worker") or m == "client.cli.bench"] == []
