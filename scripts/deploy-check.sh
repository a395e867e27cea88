#!/usr/bin/env bash
# make deploy-check (CI): static checks of the deployment, offline, in two to three minutes.
#   1. ansible-lint, production profile, zero violations (config: ansible/.ansible-lint);
#   2. ansible-playbook --syntax-check of site.yml against the example inventory;
#   3. tests/deploy: unit directives, `systemd-analyze verify`, exposure <= 2.0 (here a missing
#      systemd-analyze fails instead of skipping), and the vault and object_store roles' API steps
#      against a dev OpenBao and SeaweedFS.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="${VENV:-$REPO/.venv}"
export PATH="$VENV/bin:$PATH"
cd "$REPO/ansible"

command -v systemd-analyze >/dev/null || { echo "deploy-check: systemd-analyze missing (apt-get install systemd)" >&2; exit 1; }

echo "== ansible-lint (production profile)"
ansible-lint --nocolor
echo "== ansible-playbook --syntax-check"
ansible-playbook --syntax-check -i inventory/example.yml site.yml
echo "== systemd units, and the vault and object_store role steps against real servers (tests/deploy)"
cd "$REPO"
DEPLOY_CHECK_REQUIRE_SYSTEMD=1 python -m pytest tests/deploy -q -p no:cacheprovider
