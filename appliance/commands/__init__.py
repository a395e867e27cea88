"""CLI command groups, one module per feature (registered in appliance.cli)."""
