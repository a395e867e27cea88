"""The running appliance keeps to its OpenAPI document: schemathesis over every operation.

A real ``appliance serve`` on the session's stack is probed over HTTP, as a client sees it (the raw
match door included), by ``schemathesis run`` with ``schemathesis.toml`` beside this file: every
check but the justified exclusions listed there, in every phase (coverage, fuzzing, and stateful
chains such as create a subject, enrol it, erase it, read it back), with an admin key and, through
the ``ignored_auth`` check, without one. Deterministic generation and bounded examples keep the run
reproducible and short.

The command line, not the pytest plugin: its engine runs the stateful phase against a live server,
where Hypothesis's own state machine reports a server whose state moved on as a flaky strategy, and
it is the very command the issue's probe ran, so a failure here replays by hand (the config's header).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.media.conftest import LiveServer, serve

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def contract_server(stack: Any, client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """``appliance serve`` on the test stack (``client`` first: its start-up made the bucket)."""
    with serve(stack.config_file, tmp_path_factory.mktemp("openapi-contract") / "api.log") as server:
        yield server


def test_every_operation_keeps_to_the_openapi_document(contract_server: LiveServer, make_key: Any,
                                                      tmp_path: Path) -> None:
    token = make_key("admin", name="openapi-contract")["Authorization"].removeprefix("Bearer ")
    report = tmp_path / "schemathesis.json"
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
         f"{contract_server.url}/openapi.json", "--no-color", "--report", "json", "--report-json-path", str(report)],
        cwd=ROOT, env={**os.environ, "APPLIANCE_CONTRACT_TOKEN": token}, capture_output=True, text=True, check=False,
    )
    out = run.stdout + run.stderr
    found = [i for i in (out.find("=== ERRORS ==="), out.find("=== FAILURES ===")) if i >= 0]
    report_text = out[min(found, default=0):][:30000]
    assert run.returncode == 0, f"schemathesis found what the document does not say:\n{report_text}"
    summary = out[out.rfind("=== SUMMARY ==="):]
    result = json.loads(report.read_text())
    operations = result["operations"]
    assert result["complete"] and operations["tested"] == operations["total"] > 0, summary
    ran = {name: phase["status"] for name, phase in result["phases"].items() if phase["status"] != "skip"}
    assert ran == {"coverage": "success", "fuzzing": "success", "stateful": "success"}, summary
