"""``appliance visits list|summary``: the visits timeline from the command line (same filters as the API).

Reads go straight to PostgreSQL with the service role and are audited like the API's reads.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True, help="Visits: who passed which camera when (one row per passage).")

FromOpt = Annotated[datetime | None, typer.Option("--from", help="Inclusive start (ISO 8601, UTC if no zone). "
                                                                 "Default: one day before --to.")]
ToOpt = Annotated[datetime | None, typer.Option("--to", help="Exclusive end (ISO 8601, UTC if no zone). Default: now.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]


def _utc(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


def _text(v: Any) -> str:
    if v is None:
        return "-"
    return v.isoformat() if isinstance(v, datetime) else str(v)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_text(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _run(action: str, details: dict[str, Any], subject_id: uuid.UUID | None, work: Any) -> Any:
    import psycopg

    from appliance.audit import AuditEvent
    from appliance.audit.cli_support import cli_actor
    from appliance.audit.log import record_event
    from appliance.commands.context import fail, load_settings
    from appliance.visits.queries import VisitQueryError

    settings = load_settings()
    try:
        with psycopg.connect(settings.database_url.get_secret_value(),
                             connect_timeout=int(settings.db_connect_timeout) or 1) as conn, conn.transaction():
            result = work(conn)
            record_event(conn, AuditEvent(action, cli_actor(), subject_id=subject_id, details=details))
    except VisitQueryError as exc:
        fail(str(exc), 2)
    return result


@app.command("list")
def list_(
    from_: FromOpt = None, to: ToOpt = None,
    camera_id: Annotated[str | None, typer.Option(help="Only this camera.")] = None,
    subject_id: Annotated[uuid.UUID | None, typer.Option(help="Only this subject.")] = None,
    decision: Annotated[str | None, typer.Option(help="match or unknown.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Rows per page.")] = 100,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of the previous page.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Visits newest first; prints the cursor of the next page (stderr in table mode)."""
    from appliance.commands.context import fail
    from appliance.visits import queries
    from appliance.visits.queries import VisitFilter, VisitQueryError

    try:
        flt = VisitFilter.build(_utc(from_), _utc(to), camera_id, subject_id, decision)
    except VisitQueryError as exc:
        fail(str(exc), 2)
    items, nxt = _run("visits.list", {"filters": flt.describe(), "cli": True}, subject_id,
                      lambda conn: queries.list_visits(conn, flt, limit, cursor))
    if as_json:
        typer.echo(json.dumps({"items": items, "next_cursor": nxt}, default=_text, indent=2))
        return
    typer.echo(_table(items, ["first_seen", "last_seen", "camera_id", "decision", "subject_id", "similarity",
                              "frames"]))
    if nxt:
        typer.echo(f"next page: --cursor {nxt}", err=True)


@app.command()
def summary(
    from_: FromOpt = None, to: ToOpt = None,
    interval: Annotated[str, typer.Option(help="hour or day.")] = "hour",
    group_by: Annotated[str, typer.Option(help="camera, decision or subject.")] = "decision",
    as_json: JsonOpt = False,
) -> None:
    """Visit counts per hour or UTC day, grouped by camera, decision or subject."""
    from appliance.commands.context import fail
    from appliance.visits import queries
    from appliance.visits.queries import VisitFilter, VisitQueryError

    if interval not in ("hour", "day"):
        fail("--interval must be hour or day", 2)
    if group_by not in ("camera", "decision", "subject"):
        fail("--group-by must be camera, decision or subject", 2)
    try:
        flt = VisitFilter.build(_utc(from_), _utc(to))
    except VisitQueryError as exc:
        fail(str(exc), 2)
    buckets = _run("visits.summary", {"from": flt.start.isoformat(), "to": flt.end.isoformat(),
                                      "interval": interval, "group_by": group_by, "cli": True}, None,
                   lambda conn: queries.summary(conn, flt.start, flt.end, interval, group_by))  # type: ignore[arg-type]
    if as_json:
        typer.echo(json.dumps({"interval": interval, "group_by": group_by, "from": flt.start.isoformat(),
                               "to": flt.end.isoformat(), "buckets": buckets}, default=_text, indent=2))
        return
    typer.echo(_table(buckets, ["start", "key", "visits"]))
