"""The docs stay true: docs/configuration.md lists every setting (and only settings that exist) with its
default, the README stays a short map, no link leaves the repository, and openapi.json matches the code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from appliance.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION = ROOT / "docs" / "configuration.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_ROW = re.compile(r"^\| `([a-z0-9_]+)` \| ([^|]*) \|", re.MULTILINE)


def _documented() -> dict[str, str]:
    """Setting name → its default cell, from every table row of docs/configuration.md that starts with one."""
    rows = _ROW.findall(CONFIGURATION.read_text())
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), f"settings listed twice: {sorted({n for n in names if names.count(n) > 1})}"
    return {name: default.strip() for name, default in rows}


def test_every_setting_is_documented() -> None:
    missing = sorted(set(Settings.model_fields) - set(_documented()))
    assert missing == [], f"settings missing from docs/configuration.md: {missing}"


def test_no_documented_setting_is_made_up() -> None:
    unknown = sorted(set(_documented()) - set(Settings.model_fields))
    assert unknown == [], f"docs/configuration.md lists settings that do not exist: {unknown}"


def _expected_default(value: Any) -> str | None:
    """The default as the page writes it, for plain values (paths, secrets and the models table are prose)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float | str):
        return f"`{value}`"
    if isinstance(value, SecretStr):
        return f"`{value.get_secret_value()}`" if value.get_secret_value() else "empty"
    return None


PLAIN_DEFAULTS = sorted(n for n, f in Settings.model_fields.items() if _expected_default(f.default) is not None)


@pytest.mark.parametrize("name", PLAIN_DEFAULTS)
def test_each_documented_default_is_the_real_one(name: str) -> None:
    expected = _expected_default(Settings.model_fields[name].default)
    assert _documented()[name].startswith(expected), f"{name}: documented {_documented()[name]!r}, is {expected!r}"


def test_prose_defaults_name_what_they_are() -> None:
    """The defaults a table cell cannot spell as one value (paths, the models table) still say what they are."""
    documented = _documented()
    assert "var" in documented["var_dir"]
    for model in Settings().models:
        assert model in documented["models"], f"docs/configuration.md does not name the default model {model}"


def test_readme_is_a_short_map() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; details belong in docs/"


def _anchors(page: Path) -> set[str]:
    """The heading anchors of a Markdown page, as renderers make them (lower case, punctuation dropped)."""
    headings = re.findall(r"^#{1,6} (.+)$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_stay_inside_the_repository_and_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", target), f"{page.name} links outside the repository: {target}"
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{page.name}: broken link {target}"
        if anchor:
            assert resolved.suffix == ".md" and anchor in _anchors(resolved), f"{page.name}: no heading for {target}"


def test_committed_openapi_matches_the_code() -> None:
    from appliance.api.app import create_app

    committed = json.loads((ROOT / "openapi.json").read_text())
    assert committed == json.loads(json.dumps(create_app(Settings()).openapi())), "run `make openapi`"
