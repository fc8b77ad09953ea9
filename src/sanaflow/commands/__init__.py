"""CLI subcommands, one module per feature area (see sanaflow.cli)."""
