"""Envelope encryption for the appliance: the recipes callers use, and nothing that touches nonces.

- ``new_dek``, ``aad``, ``seal``, ``open_sealed``: AES-256-GCM blobs bound to what they are.
- ``seal_stream``, ``open_stream`` (and range helpers in ``crypto.stream``): chunked AEAD for media.
- ``crypto.providers``: where the KEK lives (``wrap``/``unwrap``/``rewrap``/``sign``).
- ``DekCache``, ``TemplateKey``, ``rewrap_all``: DEK cache, template protection, KEK rotation.

``crypto`` imports nothing from ``appliance``, ``vector`` or ``media``.
"""

from __future__ import annotations

from crypto.dek_cache import DekCache
from crypto.errors import AuthenticationError, CryptoError, KeyNotFound, KeyProviderUnavailable
from crypto.rotation import RewrapProgress, rewrap_all
from crypto.seal import aad, new_dek, open_sealed, seal
from crypto.stream import open_stream, seal_stream, sealed_size
from crypto.template import TemplateKey, new_seed

__all__ = [
    "AuthenticationError",
    "CryptoError",
    "DekCache",
    "KeyNotFound",
    "KeyProviderUnavailable",
    "RewrapProgress",
    "TemplateKey",
    "aad",
    "new_dek",
    "new_seed",
    "open_sealed",
    "open_stream",
    "rewrap_all",
    "seal",
    "seal_stream",
    "sealed_size",
]
