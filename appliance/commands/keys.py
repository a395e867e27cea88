"""``appliance keys status | rotate-kek | retire-old | export-public-key | rotate-template``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import psycopg
import typer

from appliance.audit.cli_support import record_cli_event

app = typer.Typer(no_args_is_help=True, help="KEK, signing key and template-key operations.")


def _context():  # type: ignore[no-untyped-def]
    from appliance import clients
    from appliance.commands.context import load_settings
    from appliance.db.pool import admin_dsn

    settings = load_settings()
    return settings, admin_dsn(settings), clients.key_provider(settings)


@app.command("status")
def status() -> None:
    """Key provider, current KEK version, and how many stored keys each KEK version wraps."""
    from appliance.keyring import version_counts

    _, dsn, provider = _context()
    current = provider.kek_version()
    typer.echo(f"provider: {provider.name}   KEK version: {current}")
    with psycopg.connect(dsn) as conn:
        for table, counts in version_counts(conn).items():
            lagging = sum(n for v, n in counts.items() if v < current)
            detail = ", ".join(f"v{v}: {n}" for v, n in sorted(counts.items())) or "none"
            typer.echo(f"  {table:14} {detail}" + (f"   ({lagging} to rewrap)" if lagging else ""))
        owned = conn.execute("SELECT count(*) FROM subject_keys WHERE scheme = 'owner'").fetchone()[0]
        typer.echo(f"  subject keys under their own owner key (not KEK-wrapped; destroyed on erasure): {owned}")


@app.command("rotate-kek")
def rotate_kek(
    batch_size: Annotated[int, typer.Option(min=1, max=10_000)] = 1000,
    resume: Annotated[bool, typer.Option(help="Only rewrap keys still under an older version.")] = False,
) -> None:
    """Rotate the KEK and rewrap every stored key in batches; re-run with --resume after a kill.

    The service keeps serving: old versions still unwrap until `retire-old`.
    """
    from appliance.keyring import TABLES, rewrap_backups, rewrap_table, version_counts
    from media.crypt import RESERVE_MAX_AGE

    settings, dsn, provider = _context()
    if not resume:
        typer.echo(f"KEK rotated to version {provider.rotate_kek()}")
    target = provider.kek_version()
    with psycopg.connect(dsn) as conn:
        counts = version_counts(conn)
        for table in TABLES:
            todo = sum(n for v, n in counts[table.table].items() if v < target)
            with typer.progressbar(length=todo, label=f"rewrap {table.table:14}") as bar:
                last = [0]

                def advance(p, bar=bar, last=last) -> None:  # type: ignore[no-untyped-def]
                    bar.update(p.rewrapped - last[0])
                    last[0] = p.rewrapped

                rewrap_table(conn, provider, table, batch_size, advance)
        # API workers seal uploads with media DEKs wrapped up to RESERVE_MAX_AGE seconds before use
        # (media.crypt.DekReserve), so rows inserted meanwhile may still name the old version: wait
        # that long, then sweep media once more, so `rotate-kek && retire-old` is safe for uploads.
        time.sleep(RESERVE_MAX_AGE + 1)
        rewrap_table(conn, provider, next(t for t in TABLES if t.table == "media"), batch_size)
    from appliance import clients

    moved = rewrap_backups(clients.s3_client(settings), settings.s3_backup_bucket, provider)
    typer.echo(f"rewrapped {moved} backup key(s); every stored key is at KEK version {target}")
    record_cli_event(settings, "key.rotate_kek", object_id=str(target))


@app.command("retire-old")
def retire_old() -> None:
    """Refuse to decrypt with KEK versions older than the current one (after a complete rotation)."""
    from appliance.keyring import version_counts

    settings, dsn, provider = _context()
    current = provider.kek_version()
    with psycopg.connect(dsn) as conn:
        lagging = {t: n for t, c in version_counts(conn).items() if (n := sum(k for v, k in c.items() if v < current))}
    if lagging:
        typer.secho(f"refused: keys still wrapped by older versions: {lagging}; run rotate-kek --resume",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    provider.set_min_decryption_version(current)
    record_cli_event(settings, "key.retire_old", object_id=str(current))
    typer.echo(f"KEK versions below {current} retired")


@app.command("export-public-key")
def export_public_key(out: Annotated[Path | None, typer.Option(help="Write the PEM here.")] = None) -> None:
    """The Ed25519 public key that verifies audit checkpoints and erasure receipts, offline."""
    _, _, provider = _context()
    pem = provider.public_key_pem()
    if out:
        out.write_bytes(pem)
        typer.echo(f"written to {out}")
    else:
        typer.echo(pem.decode().rstrip())



@app.command("rotate-template")
def rotate_template(
    model: Annotated[str, typer.Option(help="Model whose template key to rotate, e.g. dlib-resnet-v1.")],
    batch_size: Annotated[int, typer.Option(min=1, max=10_000)] = 1000,
) -> None:
    """New template-key version for MODEL: re-protect every template from its sealed raw vector
    (batched, resumable — just run it again after a crash), then swap every worker's index atomically."""
    from appliance.audit.cli_support import cli_actor
    from appliance.commands.context import load_settings
    from appliance.index_admin import rotate_template_key
    from appliance.state import AppState

    settings = load_settings()
    if model not in settings.models:
        typer.secho(f"unknown model {model!r}; configured: {', '.join(settings.models)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    state = AppState.build(settings)
    try:
        with typer.progressbar(length=1, label=f"re-protect {model}") as bar:
            seen = [0]

            def progress(done: int, total: int) -> None:
                bar.length = max(total, 1)
                bar.update(done - seen[0])
                seen[0] = done

            result = rotate_template_key(state, model, batch_size=batch_size, progress=progress, actor=cli_actor())
    finally:
        state.close()
    typer.echo(f"{model}: {result}" if result is not None else f"{model}: no encodings to re-protect")


@app.command("upgrade-legacy")
def upgrade_legacy_cmd() -> None:
    """Move subjects stored before owner keys: re-wrap each DEK under the subject's own key and seal
    plaintext external references (the API also does this in the background at start). Idempotent."""
    from appliance.commands.context import load_settings
    from appliance.gdpr.upgrade import upgrade_legacy
    from appliance.state import AppState

    settings = load_settings()
    state = AppState.build(settings)
    try:
        moved = upgrade_legacy(state)
    finally:
        state.close()
    typer.echo(f"subject keys moved to owner keys: {moved['subject_keys']}; "
               f"external references sealed: {moved['external_refs']}")
    record_cli_event(settings, "key.upgrade_legacy", object_id=None, details=moved)
