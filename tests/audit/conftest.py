"""Audit fixtures: an AuditLog on the service role's pool, with the test stack's key provider."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def service_pool(settings):  # type: ignore[no-untyped-def]
    from appliance.db.pool import open_pool

    pool = open_pool(settings, wait=True)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def keys(settings):  # type: ignore[no-untyped-def]
    from appliance import clients

    provider = clients.key_provider(settings)
    yield provider
    provider.close()


@pytest.fixture()
def audit(service_pool, keys) -> Iterator[object]:  # type: ignore[no-untyped-def]
    """A fresh AuditLog (its own writer chains) stopped after the test."""
    from appliance.audit.log import AuditLog

    log = AuditLog(service_pool, keys=lambda: keys, flush_interval=0.05, checkpoint_interval=0)
    yield log
    log.stop(checkpoint=False)
