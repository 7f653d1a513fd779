"""`python -m titans_cli` runs the `titans` app (also the entry point for torchrun)."""

from titans_cli.cli import app

if __name__ == "__main__":
    app(prog_name="titans")
