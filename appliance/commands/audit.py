"""``appliance audit``: export for auditors, offline verify, checkpoint now, retention sweep."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit trail: export, verify, checkpoint, retention.")


@app.command()
def export(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of stdout.")] = None,
    from_: Annotated[datetime | None, typer.Option("--from", help="Inclusive start (ISO 8601, UTC if no zone).")
                     ] = None,
    to: Annotated[datetime | None, typer.Option(help="Exclusive end (ISO 8601).")] = None,
    subject_id: Annotated[str | None, typer.Option(help="Only this subject's records (others become stubs).")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action (others become stubs).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    public_key_out: Annotated[Path | None, typer.Option(help="Also write the signing public key (PEM) here.")] = None,
) -> None:
    """Export records with their checkpoints, the public key and a signed end line."""
    from appliance import clients
    from appliance.audit.cli_support import record_cli_event
    from appliance.audit.export import ExportError, ExportFilter, export_lines
    from appliance.commands.context import fail, load_settings

    if fmt not in ("jsonl", "csv"):
        fail("--format must be jsonl or csv", 2)
    settings = load_settings()
    try:
        flt = ExportFilter.build(from_, to, subject_id, action)
    except ExportError as exc:
        fail(str(exc), 2)
    keys = clients.key_provider(settings)
    try:
        record_cli_event(settings, "audit.export", subject_id=flt.subject_id,
                         details={"filters": flt.describe(), "format": fmt})
        sink = out.open("wb") if out else sys.stdout.buffer
        try:
            for line in export_lines(settings.database_url.get_secret_value(), keys, flt, fmt):
                sink.write(line)
        finally:
            if out:
                sink.close()
        if public_key_out:
            public_key_out.write_bytes(keys.public_key_pem())
    finally:
        keys.close()
    if out:
        typer.echo(f"exported to {out}", err=True)


# `audit verify` exit codes; documented in the command's help and in docs/audit.md.
VERIFIED, PROBLEMS, REFUSED, NOT_VERIFIED = 0, 1, 2, 3


@app.command()
def verify(
    file: Annotated[Path, typer.Argument(help="An export written by `appliance audit export` or the API.")],
    public_key: Annotated[Path | None, typer.Option(help="The appliance's public key (PEM), obtained separately.")
                          ] = None,
    no_signature_check: Annotated[bool, typer.Option(
        "--no-signature-check",
        help="Without a pinned key: check the file's consistency against the key it embeds and print NOT "
             "VERIFIED (exit 3), since anyone can re-sign an edited export.")] = False,
) -> None:
    """Verify an export offline (no database) against a pinned public key.

    Prints OK, or exactly what was changed, removed, inserted or cut. Exit 0: verified; 1: problems
    found; 2: refused (no --public-key, or an unreadable key); 3: --no-signature-check found no
    problem, but nothing is verified.
    """
    from appliance.audit.verify import verify_export

    if public_key is None and not no_signature_check:
        typer.secho("REFUSED: no pinned public key. An export embeds its own key, and anyone who edits it can "
                    "re-sign it with theirs, so only a key obtained separately (GET /v1/audit/public-key, "
                    "`appliance keys export-public-key`) can verify it. Pass --public-key, or "
                    "--no-signature-check to check consistency only (NOT VERIFIED).", fg=typer.colors.RED, err=True)
        raise typer.Exit(REFUSED)
    if public_key is not None and no_signature_check:
        typer.secho("REFUSED: --public-key and --no-signature-check contradict each other", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(REFUSED)
    try:
        report = verify_export(file.read_bytes(), public_key.read_bytes() if public_key else None)
    except (OSError, ValueError) as exc:  # unreadable file, or a pinned key that is not Ed25519 PEM
        typer.secho(f"REFUSED: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(REFUSED) from exc
    for problem in report.problems:
        typer.secho(f"{problem.kind.upper():10} {problem}", fg=typer.colors.RED)
    for warning in report.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(PROBLEMS)
    if not report.verified:
        raise typer.Exit(NOT_VERIFIED)


@app.command()
def checkpoint() -> None:
    """Sign the head of every chain that moved since its last checkpoint, now."""
    import psycopg

    from appliance import clients
    from appliance.audit.checkpoints import write_checkpoints
    from appliance.commands.context import load_settings

    settings = load_settings()
    keys = clients.key_provider(settings)
    try:
        with psycopg.connect(settings.database_url.get_secret_value()) as conn:
            n = write_checkpoints(conn, keys, "manual")
    finally:
        keys.close()
    typer.echo(f"signed {n} checkpoint(s)")


@app.command()
def retention(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be dropped.")] = False,
) -> None:
    """Drop whole monthly partitions past retention (match events, other records), with signed anchors."""
    from appliance import clients
    from appliance.audit.retention import RetentionPolicy, sweep
    from appliance.commands.context import fail, load_settings
    from appliance.db.pool import admin_dsn

    settings = load_settings()
    if settings.database_admin_url is None:
        fail("retention needs the owner role: set database_admin_url", 2)
    keys = clients.key_provider(settings)
    try:
        result = sweep(admin_dsn(settings), keys, RetentionPolicy.from_settings(settings), dry_run=dry_run)
    finally:
        keys.close()
    for name in result.dropped:
        typer.echo(f"{'would drop' if dry_run else 'dropped'} {name}")
    typer.echo(f"{len(result.dropped)} partition(s), {result.anchors} retention checkpoint(s); "
               f"partitions ensured up to {result.ensured_until}")
