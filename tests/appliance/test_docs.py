"""The README documents every setting, and openapi.json matches the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

from appliance.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- settings-table", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z0-9_]+)`", table))
    missing = sorted(set(Settings.model_fields) - documented)
    assert missing == [], f"settings missing from README: {missing}"


def test_committed_openapi_matches_the_code() -> None:
    from appliance.api.app import create_app

    committed = json.loads((ROOT / "openapi.json").read_text())
    assert committed == json.loads(json.dumps(create_app(Settings()).openapi())), "run `make openapi`"
