"""Data recipes: raw data → validated Parquet splits plus `manifest.json` (Polars pipelines, one module each).

Each recipe module exposes `prepare(...)` and is wired to `titans prepare <recipe>` in `titans_cli/cli.py`.
"""
