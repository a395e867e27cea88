"""Retention drops whole monthly partitions per class, and the export still verifies across the cut."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg.rows import dict_row

from appliance.audit import AuditEvent
from appliance.audit.export import ExportFilter, export_lines, records_of
from appliance.audit.retention import RetentionPolicy, due_partitions, sweep
from appliance.audit.verify import verify_export


def test_match_leaves_go_after_90_days_and_whole_months_after_a_year() -> None:
    now = datetime(2026, 11, 26, tzinfo=UTC)
    months = [date(2025, 10, 1), date(2026, 7, 1), date(2026, 8, 1), date(2026, 10, 1)]
    existing = {f"audit_log_{m:%Y_%m}_{c}" for m in months for c in ("match", "audit")}
    assert due_partitions(months, existing, RetentionPolicy(90, 365), now) == [
        "audit_log_2025_10_match", "audit_log_2025_10_audit", "audit_log_2026_07_match"]


def _month_ago(n: int) -> datetime:
    d = datetime.now(UTC).replace(day=15, hour=12, minute=0, second=0, microsecond=0)
    for _ in range(n):
        d = (d.replace(day=1) - timedelta(days=1)).replace(day=15)
    return d


def test_retention_drops_old_partitions_and_the_export_still_verifies(service_pool, keys, settings, admin_dsn) -> None:
    from appliance.audit.log import AuditLog

    old, recent = _month_ago(14), _month_ago(4)
    with service_pool.connection() as conn:
        for when in (old, recent):
            conn.execute("SELECT audit_ensure_partitions(%s, 1)", (when.date(),))
        conn.commit()
    log = AuditLog(service_pool, keys=lambda: keys, flush_interval=0.05, checkpoint_interval=0)
    for i in range(5):
        log.submit(AuditEvent("subject.read", "apikey:old", ts=old + timedelta(seconds=i), details={"i": i}))
        log.submit(AuditEvent("match", "apikey:old", ts=recent + timedelta(seconds=i), details={"i": i}))
    for i in range(3):
        log.submit(AuditEvent("subject.read", "apikey:new", details={"i": i}))
        log.submit(AuditEvent("match", "apikey:new", details={"i": i}))
    assert log.flush(10)
    log.stop(checkpoint=False)
    log.checkpoint("manual")

    result = sweep(admin_dsn, keys, RetentionPolicy(90, 365))
    assert f"audit_log_{old:%Y_%m}_audit" in result.dropped and f"audit_log_{recent:%Y_%m}_match" in result.dropped
    assert result.anchors >= 2
    with psycopg.connect(admin_dsn) as conn:
        for cls, chain in log.chains.items():
            rows = conn.cursor(row_factory=dict_row).execute(
                "SELECT * FROM audit_log WHERE chain = %s ORDER BY seq", (chain.name,)).fetchall()
            assert [rec["seq"] for row in rows for rec in records_of(row)] == [6, 7, 8], cls
            kind = conn.execute("SELECT kind FROM audit_checkpoints WHERE chain = %s AND seq = 5",
                                (chain.name,)).fetchone()
            assert kind == ("retention",)

    data = b"".join(export_lines(settings.database_url.get_secret_value(), keys, ExportFilter()))
    report = verify_export(data, keys.public_key_pem())
    assert report.ok, [str(p) for p in report.problems]

    chain_name = log.chains["audit"].name.encode()
    lines = data.split(b"\n")
    anchor = next(i for i, x in enumerate(lines) if b'"kind":"retention"' in x and chain_name in x)
    del lines[anchor]
    report = verify_export(b"\n".join(lines), keys.public_key_pem())
    assert any(p.kind == "unanchored" and log.chains["audit"].name in p.message for p in report.problems)
    assert json.loads(lines[0])["type"] == "header"
