"""Errors users can act on. The CLI prints them as one line on stderr and exits with `exit_code`.

Exit codes (docs/conventions.md §5): 1 runtime failure, 2 usage error (bad option, unknown config key),
3 data-validation failure (schema, NaNs, irregular timestamps, unknown chromosome names).
"""

from __future__ import annotations


class TitansError(Exception):
    """A failure with a message meant for the user; no traceback unless --debug."""

    exit_code = 1


class UsageError(TitansError):
    """Bad option, unknown or mistyped config key, misuse of a run directory."""

    exit_code = 2


class DataError(TitansError):
    """Input data failed validation; the message names the file, column/record and row/position."""

    exit_code = 3
