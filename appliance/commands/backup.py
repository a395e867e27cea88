"""``appliance backup create | list | restore``: sealed database dumps in the object store."""

from __future__ import annotations

from typing import Annotated

import typer

from appliance.audit.cli_support import record_cli_event

app = typer.Typer(no_args_is_help=True, help="Sealed database backups in the object store.")


@app.command("create")
def create() -> None:
    """Dump the database, seal it under a KEK-wrapped key and upload it (the nightly timer runs this)."""
    from appliance import clients
    from appliance.backup import create_backup
    from appliance.commands.context import load_settings
    from appliance.db.pool import admin_dsn

    settings = load_settings()
    info = create_backup(admin_dsn(settings), clients.s3_client(settings), settings.s3_backup_bucket,
                         clients.key_provider(settings))
    record_cli_event(settings, "backup.create", object_id=info.key)
    typer.echo(f"{info.key}  {info.size} bytes  sha256(plaintext)={info.plaintext_sha256}")


@app.command("list")
def list_() -> None:
    """List stored backups, oldest first."""
    from appliance import clients
    from appliance.backup import list_backups
    from appliance.commands.context import load_settings

    settings = load_settings()
    for b in list_backups(clients.s3_client(settings), settings.s3_backup_bucket):
        typer.echo(f"{b.key}  {b.size:>12} bytes  {b.created:%Y-%m-%d %H:%M:%S}")


@app.command("restore")
def restore(
    key: Annotated[str | None, typer.Argument(help="Backup object key; default: the newest.")] = None,
) -> None:
    """Restore into the configured database, which must be empty (a fresh install)."""
    from appliance import clients
    from appliance.backup import BackupError, restore_backup
    from appliance.commands.context import load_settings
    from appliance.db.pool import admin_dsn

    settings = load_settings()
    try:
        restored = restore_backup(admin_dsn(settings), clients.s3_client(settings), settings.s3_backup_bucket,
                                  clients.key_provider(settings), key)
    except BackupError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    record_cli_event(settings, "backup.restore", object_id=restored)
    typer.echo(f"restored {restored}")
