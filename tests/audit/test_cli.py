"""`appliance audit export|verify|checkpoint` work end to end; verify needs only the file and the key."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


@pytest.fixture()
def cli(stack, monkeypatch):  # type: ignore[no-untyped-def]
    from appliance.cli import app

    monkeypatch.setenv("APPLIANCE_CONFIG", str(stack.config_file))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_cli_export_then_offline_verify_passes_and_then_pinpoints_a_removed_record(cli, tmp_path, audit) -> None:
    from appliance.audit import AuditEvent

    for i in range(5):
        audit.submit(AuditEvent("subject.read", "cli:test", details={"i": i}))
    assert audit.flush(10)
    assert cli("audit", "checkpoint").exit_code == 0
    out, pem = tmp_path / "audit.jsonl", tmp_path / "key.pem"
    result = cli("audit", "export", "--out", str(out), "--public-key-out", str(pem))
    assert result.exit_code == 0, result.output
    result = cli("audit", "verify", str(out), "--public-key", str(pem))
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("OK:")

    lines = out.read_bytes().split(b"\n")
    chain = audit.chains["audit"].name.encode()
    mine = [i for i, x in enumerate(lines) if b'"type":"record"' in x and chain in x]
    del lines[mine[2]]
    out.write_bytes(b"\n".join(lines))
    result = cli("audit", "verify", str(out), "--public-key", str(pem))
    assert result.exit_code == 1
    assert f"REMOVED    line {mine[2] + 1}:" in result.output
