"""Exports written before the audit writer was rewritten in Python (issue 18) still verify.

``fixtures/export-before-issue-18*`` were written through the API by the previous writer (a C ring
feeding a writer child process): match records from block rows, records of the transaction chains,
manual checkpoints; the window export (CSV) also holds ``before``/``after`` stubs. Only the pinned
public key beside them is trusted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.audit.verify import verify_export

FIXTURES = Path(__file__).parent / "fixtures"
PEM = (FIXTURES / "export-before-issue-18.pem").read_bytes()


@pytest.mark.parametrize(("name", "records", "stubs"), [("export-before-issue-18.jsonl", 265, 0),
                                                         ("export-before-issue-18-window.csv", 257, 6)])
def test_an_export_written_by_the_previous_writer_verifies(name: str, records: int, stubs: int) -> None:
    report = verify_export((FIXTURES / name).read_bytes(), PEM)
    assert report.verified, [str(p) for p in report.problems]
    assert (report.records, report.stubs) == (records, stubs) and report.checkpoints >= 8


def test_its_match_records_are_there_and_a_changed_one_is_still_caught() -> None:
    lines = (FIXTURES / "export-before-issue-18.jsonl").read_bytes().split(b"\n")
    matches = [i for i, x in enumerate(lines) if b'"type":"record"' in x and json.loads(x)["action"] == "match"]
    assert len(matches) == 251  # 30 single, 2 batches of 100, 1 raw, 20 after the first checkpoint
    i = matches[100]
    lines[i] = lines[i].replace(b'"actor":"apikey:', b'"actor":"apikey:x', 1)
    report = verify_export(b"\n".join(lines), PEM)
    assert [(p.kind, p.line) for p in report.problems] == [("changed", i + 1)]
