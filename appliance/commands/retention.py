"""``appliance retention sweep``: delete media past its retention (every object version), drop visit
partitions past ``visits_retention_days``, erase subjects whose faces expired (``subject_retention_days``,
each through the erasure job with its receipt), all audited; then re-key the template key of models
with erasures since their last re-key (stale templates become noise). ``--dry-run`` lists the subjects
and visit partitions that would go, and why, and changes nothing.

The systemd timer runs it daily. It is safe beside a running API and after a crash: rows are
claimed with SKIP LOCKED, objects go before rows, and a re-run finishes what a crash left.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True, help="Retention of media per kind (captures, clips, enrolment crops).")


@app.command("sweep")
def sweep(
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Media per committed batch.")] = 100,
    orphans: Annotated[bool, typer.Option(help="Also remove unreferenced objects left by a crash mid-upload.")] = True,
    rekey_templates: Annotated[bool, typer.Option(
        help="Re-key template keys after erasures (setting template_rekey_after_erasure).")] = True,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List expired subjects (and why) and visit partitions due; change nothing.")] = False,
) -> None:
    """Delete expired media in batches, printing progress; exit 1 if a backing server is down."""
    if dry_run:
        _expire_faces_and_visits(dry_run=True)
        return
    import psycopg

    from appliance import clients
    from appliance.audit import AuditEvent
    from appliance.audit.cli_support import cli_actor, record_cli_event
    from appliance.audit.log import record_event
    from appliance.commands.context import load_settings
    from appliance.db.pool import open_pool
    from media import retention
    from media.errors import StoreUnavailable
    from media.store import MediaStore

    settings = load_settings()
    actor = cli_actor()
    store = MediaStore(clients.s3_client(settings), settings.s3_bucket)

    def audit(conn: Any, action: str, subject_id: Any, object_id: str | None, details: dict[str, Any]) -> None:
        record_event(conn, AuditEvent(action=action, actor=actor, subject_id=subject_id, object_id=object_id,
                                      details=details))

    def progress(r: retention.SweepReport) -> None:
        typer.echo(f"batch {r.batches}: {r.media} media, {r.objects} objects deleted so far", err=True)

    pool = open_pool(settings, wait=True)
    try:
        report = retention.sweep(pool, store, audit, batch_size=batch_size, progress=progress)
        if orphans:
            report.orphans = retention.sweep_orphans(pool, store)
    except (StoreUnavailable, psycopg.OperationalError) as exc:
        typer.secho(f"retention sweep stopped: {exc}; re-run it when the server is back", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(1) from exc
    finally:
        pool.close()
    record_cli_event(settings, "retention.sweep", actor,
                     details={"media": report.media, "objects": report.objects, "orphans": report.orphans})
    typer.echo(f"deleted {report.media} media ({report.objects} objects, every version) in {report.batches} "
               f"batches; {report.orphans} orphaned objects removed")
    _expire_faces_and_visits(dry_run=False)
    if rekey_templates and settings.template_rekey_after_erasure:
        _rekey_after_erasures(settings, actor)


def _expire_faces_and_visits(dry_run: bool) -> None:
    """Visit partitions past ``visits_retention_days``, then subjects past their retention (erased)."""
    from datetime import UTC, datetime

    from appliance.audit import AuditEvent
    from appliance.audit.cli_support import cli_actor
    from appliance.commands.context import load_settings
    from appliance.gdpr.retention import sweep_subjects
    from appliance.state import AppState
    from appliance.visits import queries

    settings = load_settings()
    now = datetime.now(UTC)
    cutoff = queries.retention_cutoff(now, settings.visits_retention_days)
    state = AppState.build(settings)
    try:
        with state.pool.connection() as conn, conn.transaction():
            due = queries.partitions_due(conn, cutoff)
            if not dry_run and due:
                due = queries.drop_expired(conn, cutoff)
                state.audit.record(conn, AuditEvent("visits.retention", cli_actor(), details={
                    "dropped": due, "keep_from": cutoff.isoformat(), "days": settings.visits_retention_days}))
        verb = "would drop" if dry_run else "dropped"
        typer.echo(f"visits: {verb} {len(due)} day partitions before {cutoff} ({', '.join(due) or 'none'})")
        expired, jobs = sweep_subjects(state, now=now, dry_run=dry_run, actor=cli_actor())
        for e in expired:
            typer.echo(f"subject {e.subject_id}: {'would be ' if dry_run else ''}erased, expired "
                       f"{e.expires_at.isoformat()} ({e.reason})")
        if not dry_run:
            typer.echo(f"subjects: {len(jobs)} erased past their retention, each with a signed receipt")
    finally:
        state.close()


def _rekey_after_erasures(settings: Any, actor: str) -> None:
    """Re-key templates of models with erasures since their last re-key, then destroy the old seeds."""
    from appliance.errors import Conflict
    from appliance.index_admin import models_to_rekey, rotate_template_key
    from appliance.state import AppState

    state = AppState.build(settings)
    try:
        for model in models_to_rekey(state):
            try:
                result = rotate_template_key(state, model, actor=actor)
            except Conflict as exc:  # a subject is being erased right now: the next sweep does it
                typer.echo(f"{model}: template re-key postponed ({exc})", err=True)
                continue
            typer.echo(f"{model}: template key re-keyed after erasures ({result}); old seeds destroyed")
    finally:
        state.close()
