"""Helpers for the role tests: run one role's task file with ansible-playbook on this machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Also keeps port+10000 free: SeaweedFS puts its gRPC listeners there.
from appliance.stack.process import free_port  # noqa: F401 - re-exported for the role tests

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

PLAYBOOK = """
- name: Run one step of a role against services on this machine
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Run {role}/tasks/{tasks_from}
      ansible.builtin.include_role:
        name: {role}
        tasks_from: {tasks_from}
"""


def changed_count(output: str) -> int:
    """The changed= figure of the PLAY RECAP line."""
    return int(re.search(r"localhost\s+: ok=\d+\s+changed=(\d+)", output).group(1))


@pytest.fixture
def run_role_tasks(tmp_path):
    """Run ``roles/ROLE/tasks/TASKS_FROM`` with the given variables; return the play's output."""
    if not ANSIBLE_PLAYBOOK.exists():
        pytest.fail("ansible-core is not installed: run `make install` (dev extra)")

    def run(role: str, tasks_from: str, variables: dict[str, str]) -> str:
        playbook = tmp_path / f"{role}-{tasks_from}"
        playbook.write_text(PLAYBOOK.format(role=role, tasks_from=tasks_from))
        # The controller's own interpreter: discovery may find a shim without the modules' deps.
        variables = {"ansible_python_interpreter": sys.executable, **variables}
        args = [arg for key, value in variables.items() for arg in ("-e", f"{key}={value}")]
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),
            "ANSIBLE_ROLES_PATH": str(REPO / "ansible" / "roles"),
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_LOCALHOST_WARNING": "0",
        }
        result = subprocess.run(
            [str(ANSIBLE_PLAYBOOK), "-i", "localhost,", *args, str(playbook)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        return result.stdout

    return run
