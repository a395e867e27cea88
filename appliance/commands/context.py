"""What every command needs: its settings (the local stack's file by default) and a way to fail."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import typer

from appliance.settings import Settings, get_settings


def load_settings() -> Settings:
    """Settings, defaulting APPLIANCE_CONFIG to the file the local stack writes."""
    if "APPLIANCE_CONFIG" not in os.environ:
        default = Path(os.environ.get("APPLIANCE_VAR_DIR", "var")) / "appliance.toml"
        if default.is_file():
            os.environ["APPLIANCE_CONFIG"] = str(default)
    get_settings.cache_clear()
    return get_settings()


def fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
