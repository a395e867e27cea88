"""`appliance keys rotate-kek` over 100,000 KEK-wrapped subject keys in PostgreSQL, killed half-way and resumed.

The rows are written as subjects enrolled before owner keys were (``scheme = 'kek'``), the largest
KEK-wrapped table a site can have; owner-wrapped rows are not KEK rotation's business.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from appliance import clients
from appliance.subject_keys import wrap_context
from crypto.errors import CryptoError
from crypto.seal import new_dek

N = 100_000


def _cli(stack, *args: str, **kw) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    env = {**os.environ, "APPLIANCE_CONFIG": str(stack.config_file)}
    return subprocess.Popen([sys.executable, "-m", "appliance", "keys", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _versions(dsn: str) -> dict[int, int]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT kek_version, count(*) FROM subject_keys WHERE scheme = 'kek' GROUP BY 1")
                    .fetchall())


@pytest.mark.slow
def test_rotate_kek_over_100k_keys_survives_a_kill_and_retires_the_old_version(stack, settings, admin_dsn) -> None:  # type: ignore[no-untyped-def]
    provider = clients.key_provider(settings)
    ids = [uuid.uuid4() for _ in range(N)]
    deks = {i: new_dek() for i in ids[:200]}  # remember a sample to prove they still unwrap to the same key
    with psycopg.connect(admin_dsn) as conn:
        with conn.cursor().copy("COPY subjects (id) FROM STDIN") as copy:
            for i in ids:
                copy.write_row((i,))
        for start in range(0, N, 10_000):
            chunk = ids[start:start + 10_000]
            plain = [deks.get(i) or new_dek() for i in chunk]
            wrapped = provider.wrap_many(plain, [wrap_context(i) for i in chunk])
            copy_sql = "COPY subject_keys (subject_id, key_id, wrapped_dek, kek_version, scheme) FROM STDIN"
            with conn.cursor().copy(copy_sql) as cp:
                for i, w in zip(chunk, wrapped, strict=True):
                    cp.write_row((i, uuid.uuid4(), w, provider.wrapped_version(w), "kek"))
    old = provider.kek_version()
    assert _versions(admin_dsn).get(old, 0) >= N
    sealed_before = provider.wrap(b"k" * 32, b"probe")  # a key wrapped under the old version only

    first = _cli(stack, "rotate-kek", "--batch-size", "2000")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once some, but not all, batches are committed
        moved = _versions(admin_dsn).get(old + 1, 0)
        if moved >= 10_000:
            break
        assert first.poll() is None, first.communicate()[1]
        time.sleep(0.2)
    else:
        with psycopg.connect(admin_dsn) as conn:
            activity = conn.execute("SELECT state, wait_event_type, wait_event, left(query, 120) "
                                    "FROM pg_stat_activity WHERE datname = current_database()").fetchall()
        pytest.fail(f"no batch committed in 120 s; activity: {activity}")
    first.send_signal(signal.SIGKILL)
    first.wait()
    half = _versions(admin_dsn)
    assert 0 < half.get(old + 1, 0) < sum(half.values()), half

    resumed = _cli(stack, "rotate-kek", "--resume", "--batch-size", "5000")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert provider.kek_version() == old + 1  # resume did not rotate again
    assert set(_versions(admin_dsn)) == {old + 1}

    with psycopg.connect(admin_dsn) as conn:
        rows = conn.execute("SELECT subject_id, wrapped_dek FROM subject_keys WHERE subject_id = ANY(%s)",
                            (list(deks),)).fetchall()
    assert provider.unwrap_many([bytes(w) for _, w in rows], [wrap_context(i) for i, _ in rows]) == \
        [deks[i] for i, _ in rows]

    retire = _cli(stack, "retire-old")
    assert retire.wait(timeout=60) == 0, retire.stderr.read() if retire.stderr else ""
    try:
        with pytest.raises(CryptoError):
            provider.unwrap(sealed_before, b"probe")  # the old version no longer decrypts
        assert provider.unwrap_many([bytes(rows[0][1])], [wrap_context(rows[0][0])])  # rewrapped ones do
    finally:
        provider.set_min_decryption_version(1)  # the shared test Vault serves later tests too

    with psycopg.connect(admin_dsn) as conn:  # leave the shared stack as small as we found it
        conn.execute("DELETE FROM subject_keys WHERE subject_id = ANY(%s)", (ids,))
        conn.execute("DELETE FROM subjects WHERE id = ANY(%s)", (ids,))
