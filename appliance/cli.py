"""The ``appliance`` command: serve, migrate, the local stack, API keys (and, from ``appliance.commands``,
keys, subject, audit, retention, backup, models)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from appliance.commands import audit, backup, keys, models, retention, subject, visits
from appliance.commands.context import fail, load_settings
from appliance.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Edge biometric storage appliance.")
stack_app = typer.Typer(no_args_is_help=True, help="The embedded local service stack (dev, tests, quick start).")
apikey_app = typer.Typer(no_args_is_help=True, help="API keys and their scopes.")
app.add_typer(stack_app, name="stack")
app.add_typer(apikey_app, name="apikey")


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="Override the configured port.")] = None,
    workers: Annotated[int | None, typer.Option(help="uvicorn worker processes.")] = None,
) -> None:
    """Run the HTTP API (uvicorn)."""
    import uvicorn

    settings = load_settings()
    n = workers or settings.workers
    os.environ["APPLIANCE_WORKERS"] = str(n)  # each worker's settings know it has siblings (track_store "auto")
    uvicorn.run(
        "appliance.api.app:create_app",
        factory=True,
        host=settings.host,
        port=port or settings.port,
        workers=n,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
    )


@app.command()
def migrate() -> None:
    """Apply pending database migrations (a no-op when up to date)."""
    from appliance.db.migrate import MigrationError
    from appliance.db.migrate import migrate as run
    from appliance.db.pool import admin_dsn

    try:
        applied = run(admin_dsn(load_settings()))
    except MigrationError as exc:
        fail(str(exc))
    typer.echo(f"applied: {', '.join(applied)}" if applied else "database is up to date")


@app.command()
def openapi(out: Annotated[Path | None, typer.Option(help="Write to this file.")] = None) -> None:
    """Print (or write) the OpenAPI schema generated from the code."""
    from appliance.api.app import create_app

    text = json.dumps(create_app(Settings()).openapi(), indent=2, sort_keys=True) + "\n"
    if out:
        out.write_text(text)
    else:
        sys.stdout.write(text)


# --- stack -------------------------------------------------------------------------------------
def _stack(dev_vault: bool = False, api_port: int = 8080):  # type: ignore[no-untyped-def]
    from appliance.stack.manager import Stack

    var_dir = Path(os.environ.get("APPLIANCE_VAR_DIR", "var"))
    return Stack(var_dir, persistent_vault=not dev_vault, api_port=api_port)


@stack_app.command("up")
def stack_up(
    api: Annotated[bool, typer.Option("--api", help="Also migrate and run the API in the background.")] = False,
    api_port: Annotated[int, typer.Option(help="Port of the API started with --api.")] = 8080,
    dev_vault: Annotated[bool, typer.Option(help="OpenBao in in-memory dev mode (tests).")] = False,
) -> None:
    """Start PostgreSQL, Redis, the S3 store and Vault on loopback; idempotent."""
    from appliance.stack.process import StackError

    stack = _stack(dev_vault, api_port)
    try:
        stack.up()
        if api:
            os.environ["APPLIANCE_CONFIG"] = str(stack.config_file)
            migrate()
            _ensure_admin_key(stack.var_dir)
            stack.up(with_api=True)
    except StackError as exc:
        fail(f"stack up failed: {exc}")
    _print_status(stack)
    typer.echo(f"settings written to {stack.config_file}")


def _ensure_admin_key(var_dir: Path) -> None:
    """For the quick start only: one admin key, written to var/admin.key (0600)."""
    from appliance.stack.process import write_secret

    path = var_dir / "admin.key"
    if path.exists():
        return
    _, token = _create_key_audited("quickstart-admin", ["admin"])
    write_secret(path, token + "\n")
    typer.echo(f"admin API key written to {path}")


@stack_app.command("down")
def stack_down() -> None:
    """Stop every process of the stack (each by its own PID)."""
    stopped = _stack().down()
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@stack_app.command("status")
def stack_status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Report each service: running, unhealthy, crashed or stopped; exit 1 unless all run."""
    stack = _stack()
    statuses = stack.status()
    if as_json:
        typer.echo(json.dumps([s.__dict__ for s in statuses], indent=2))
    else:
        _print_status(stack, statuses)
    core = [s for s in statuses if s.name != "api"]
    if any(s.state != "running" for s in core):
        raise typer.Exit(1)


def _print_status(stack, statuses=None) -> None:  # type: ignore[no-untyped-def]
    for s in statuses or stack.status():
        ports = ",".join(map(str, s.ports))
        line = f"{s.name:9} {s.state:10} pid={s.pid or '-':<8} 127.0.0.1:{ports}"
        typer.echo(line + (f"  ({s.detail})" if s.detail else ""))


# --- api keys ----------------------------------------------------------------------------------
@apikey_app.command("create")
def apikey_create(
    name: Annotated[str, typer.Option(help="Who or what uses the key.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: match,enroll,media,audit,admin.")],
) -> None:
    """Create a key; the secret is printed once and stored only hashed."""
    try:
        key, token = _create_key_audited(name, [s.strip() for s in scopes.split(",") if s])
    except ValueError as exc:
        fail(str(exc), 2)
    typer.echo(f"id: {key.id}\nscopes: {','.join(sorted(key.scopes))}", err=True)
    typer.echo(token)


@apikey_app.command("list")
def apikey_list() -> None:
    """List keys (never secrets)."""
    import psycopg

    from appliance.auth import list_keys
    from appliance.db.pool import admin_dsn

    with psycopg.connect(admin_dsn(load_settings())) as conn:
        keys = list_keys(conn)
    for k in keys:
        state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
        typer.echo(f"{k.id}  {k.prefix}  {k.name:20}  {','.join(sorted(k.scopes)):28}  {state}")


@apikey_app.command("revoke")
def apikey_revoke(key: Annotated[str, typer.Argument(help="Key id or prefix.")]) -> None:
    """Revoke a key; every API process stops accepting it within a second."""
    import psycopg

    from appliance.audit import AuditEvent
    from appliance.audit.cli_support import cli_actor
    from appliance.audit.log import record_event
    from appliance.auth import revoke_key
    from appliance.db.pool import admin_dsn

    with psycopg.connect(admin_dsn(load_settings())) as conn:
        revoked = revoke_key(conn, key)
        if revoked is not None:
            record_event(conn, AuditEvent(action="apikey.revoke", actor=cli_actor(), object_id=str(revoked)))
    if revoked is None:
        fail(f"no active key {key!r}")
    typer.echo(f"revoked {key}")


def _create_key_audited(name: str, scopes: list[str]):  # type: ignore[no-untyped-def]
    """Create a key and its audit record in one transaction."""
    import psycopg

    from appliance.audit import AuditEvent
    from appliance.audit.cli_support import cli_actor
    from appliance.audit.log import record_event
    from appliance.auth import create_key
    from appliance.db.pool import admin_dsn

    with psycopg.connect(admin_dsn(load_settings())) as conn:
        key, token = create_key(conn, name, scopes)
        record_event(conn, AuditEvent(action="apikey.create", actor=cli_actor(), object_id=str(key.id),
                                      details={"scopes": sorted(scopes), "name": name}))
    return key, token


# Command groups living beside their feature: appliance/commands/<name>.py exposes a Typer ``app``.
app.add_typer(keys.app, name="keys")
app.add_typer(subject.app, name="subject")
app.add_typer(audit.app, name="audit")
app.add_typer(retention.app, name="retention")
app.add_typer(backup.app, name="backup")
app.add_typer(visits.app, name="visits")
app.add_typer(models.app, name="models")


def main() -> None:
    app()
