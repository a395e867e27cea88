"""An AppRole-authenticated HTTP session to Vault/OpenBao, with every failure mapped to ``crypto.errors``.

Token lifecycle, background-free: the token is renewed lazily, on the first call after less than a
third of its TTL remains; if renewal is refused or cannot extend it (max TTL reached, revoked) the
session logs in again. A 403 triggers one fresh login and retry before it counts as a denial.

Failure bounds: requests use ``timeout`` for connect and for read and are never retried on transport
errors, so a stopped, frozen or sealed server fails a call within about ``timeout`` seconds.
Messages quote Vault's top-level ``errors`` only, never a body: batch error bodies carry the other
items' plaintexts.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import hvac
import requests

from crypto.errors import CryptoError, KeyNotFound, KeyProviderUnavailable

__all__ = ["RequestTooComplex", "VaultSession"]

log = logging.getLogger(__name__)


class RequestTooComplex(KeyProviderUnavailable):
    """The server refused the body as too large or too complex (``max_request_json_strings``)."""


def _errors_of(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        body = None
    errors = body.get("errors") if isinstance(body, dict) else None
    return "; ".join(str(e) for e in errors or [])[:200] or "no detail"


class VaultSession:
    """hvac client plus AppRole token care; ``call`` returns JSON bodies or raises a ``CryptoError``."""

    def __init__(
        self,
        addr: str,
        role_id: str,
        secret_id: str,
        *,
        timeout: float,
        approle_mount: str = "approle",
        verify: bool | str = True,
        session: requests.Session | None = None,
    ) -> None:
        self.addr = addr.rstrip("/")
        self.timeout = timeout
        self._role_id = role_id
        self._secret_id = secret_id
        self._approle_mount = approle_mount
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxy from the environment may see the Vault token
            session.verify = verify
        self._client = hvac.Client(
            url=self.addr, timeout=timeout, verify=verify, session=session, adapter=hvac.adapters.RawAdapter
        )
        self._lock = threading.Lock()
        self._ttl = 0.0
        self._expires = 0.0
        self._renewable = False

    def send(self, method: str, path: str, what: str, json: dict[str, Any] | None = None) -> requests.Response:
        """One HTTP call with the current token (if any); transport failures become KeyProviderUnavailable."""
        try:
            return self._client.adapter.request(method, path, json=json, raise_exception=False)
        except requests.Timeout:
            raise KeyProviderUnavailable(
                f"Vault at {self.addr} did not answer {what} within {self.timeout:g}s"
            ) from None
        except requests.RequestException as exc:
            raise KeyProviderUnavailable(
                f"Vault at {self.addr} is unreachable for {what} ({type(exc).__name__})"
            ) from None

    def unavailable(self, resp: requests.Response, what: str) -> KeyProviderUnavailable:
        """The error for a response that means Vault cannot serve us now."""
        if resp.status_code == 503:
            return KeyProviderUnavailable(f"Vault at {self.addr} is sealed or unavailable (HTTP 503) during {what}")
        if resp.status_code in (401, 403):
            return KeyProviderUnavailable(
                f"Vault at {self.addr} denied {what} (HTTP {resp.status_code}: {_errors_of(resp)}); "
                "check the AppRole credentials and policy"
            )
        detail = f"HTTP {resp.status_code}: {_errors_of(resp)}"
        return KeyProviderUnavailable(f"Vault at {self.addr} failed {what} ({detail})")

    def json(self, resp: requests.Response, what: str) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise KeyProviderUnavailable(f"Vault at {self.addr} sent a malformed answer to {what}")
        return body

    def call(self, method: str, path: str, what: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
        """Authenticated call returning the JSON body; a 400 carrying batch results is returned for triage."""
        for attempt in (1, 2):
            self._ensure_token()
            resp = self.send(method, path, what, json)
            if resp.status_code == 403 and attempt == 1:
                with self._lock:
                    self._client.token = None  # maybe expired behind our back; log in once more
                continue
            break
        if resp.status_code == 204:
            return {}
        if resp.status_code == 200:
            return self.json(resp, what)
        if resp.status_code == 400:
            try:
                body = resp.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("data"), dict) and "batch_results" in body["data"]:
                return body
            if "complexity" in _errors_of(resp):
                raise RequestTooComplex(f"Vault refused {what}: {_errors_of(resp)}")
            raise CryptoError(f"Vault rejected {what}: {_errors_of(resp)}")
        if resp.status_code == 413:
            raise RequestTooComplex(f"Vault refused {what}: request too large")
        if resp.status_code == 404:
            raise KeyNotFound(f"Vault has nothing at {path} ({what})")
        raise self.unavailable(resp, what)

    def close(self) -> None:
        """Forget the token and close pooled connections."""
        with self._lock:
            self._client.token = None
            self._expires = 0.0
        self._client.adapter.close()

    # --- token care ------------------------------------------------------------------------------

    def _ensure_token(self) -> None:
        with self._lock:
            remaining = self._expires - time.monotonic()
            expired = self._client.token is None or remaining <= 0
            if expired or (remaining < self._ttl / 3 and not (self._renewable and self._renew(remaining))):
                self._login()

    def _login(self) -> None:
        self._client.token = None
        sent = time.monotonic()
        resp = self.send(
            "post",
            f"/v1/auth/{self._approle_mount}/login",
            "AppRole login",
            json={"role_id": self._role_id, "secret_id": self._secret_id},
        )
        if resp.status_code in (400, 401, 403):
            raise KeyProviderUnavailable(
                f"Vault at {self.addr} denied AppRole login ({_errors_of(resp)}); check role_id and secret_id"
            )
        if resp.status_code != 200:
            raise self.unavailable(resp, "AppRole login")
        auth = self.json(resp, "AppRole login").get("auth") or {}
        if not auth.get("client_token"):
            raise KeyProviderUnavailable(f"Vault at {self.addr} sent a login answer without a token")
        self._accept(auth, sent)
        self._client.token = auth["client_token"]
        log.info("crypto: logged in to Vault at %s (token ttl %ss)", self.addr, int(self._ttl))

    def _accept(self, auth: dict[str, Any], sent: float) -> None:
        """Track the lease from when the request was *sent*, so our clock never runs late."""
        self._ttl = float(auth.get("lease_duration") or 0)
        self._renewable = bool(auth.get("renewable"))
        self._expires = sent + self._ttl if self._ttl else float("inf")

    def _renew(self, remaining: float) -> bool:
        """Renew the token; False when Vault refuses or cannot extend it (then we log in again)."""
        sent = time.monotonic()
        resp = self.send("post", "/v1/auth/token/renew-self", "token renewal", json={})
        if resp.status_code == 503:
            raise self.unavailable(resp, "token renewal")
        if resp.status_code != 200:
            # Refused, expired, revoked or "past the max TTL" (OpenBao answers that one with a 500):
            # a fresh login settles all of them, and reports the real problem if there is one.
            log.debug("crypto: Vault token renewal refused (HTTP %d); logging in again", resp.status_code)
            return False
        auth = self.json(resp, "token renewal").get("auth") or {}
        if float(auth.get("lease_duration") or 0) <= remaining + 1:
            return False  # capped by the token's max TTL: a fresh login gives a full TTL
        self._accept(auth, sent)
        log.debug("crypto: renewed Vault token (ttl %ss)", int(self._ttl))
        return True
