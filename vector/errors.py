"""One exception hierarchy for ``vector``; the API maps these to problem+json in appliance.api."""

from __future__ import annotations


class VectorError(Exception):
    """Base class of everything ``vector`` raises on purpose."""


class InvalidVector(VectorError):
    """Wrong dimension, NaN/infinite values or a zero vector: the caller's input, never a server fault."""


class UnknownModel(VectorError):
    """The model is not configured, or has no template key or index yet."""


class IndexNotReady(VectorError):
    """The hot index of a model is still warming (or failed to); matching answers 503 meanwhile."""


class SnapshotError(VectorError):
    """A snapshot file is missing, stale, from another key or tampered; the worker warms from PostgreSQL."""
