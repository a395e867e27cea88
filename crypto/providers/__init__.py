"""Key providers: where the KEK and signing key live (Vault transit, or a local file on offline hosts)."""

from __future__ import annotations

from crypto.providers.base import KeyProvider
from crypto.providers.local import LocalFileProvider
from crypto.providers.vault import VaultTransitProvider

__all__ = ["KeyProvider", "LocalFileProvider", "VaultTransitProvider"]
