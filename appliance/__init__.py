"""The edge biometric storage appliance service (DESIGN.md)."""

__version__ = "0.1.0"
