"""Captures and clips in the S3 object store (DESIGN.md, "Media"): validated by content, stripped of
metadata, sealed client-side with ``crypto.stream`` before upload, thumbnailed and retained per kind.

``media`` imports only ``crypto`` (and its libraries); the API and CLI in ``appliance`` wire it up.
"""
