"""CLI commands: one module per command (wiring only); registered in `titans_cli/cli.py`."""
