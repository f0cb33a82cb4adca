"""The two errors the CLI turns into an exit code and one paragraph (no traceback unless --debug).

ConfigError: bad input from a file or the command line, and the message says what to change. `pipeline run`
and `pipeline check` exit 2 on it; `report`, `gate` and `ship`, which read a finished run, exit 3 ("unusable
input"), because their exit 2 already means "no measurement on the target".
StageError: a stage could not do its work; the message names the stage setting and the fix. Earlier
artifacts stay, and `--resume` continues. Exit 1.
"""
from __future__ import annotations


class ConfigError(Exception):
    """Bad input from a file or the command line; the message says what to change."""


class StageError(Exception):
    """A stage could not do its work; the message names the stage setting and the fix. Earlier artifacts stay."""


def first_line(e: BaseException) -> str:
    """'Type: first non-empty line of the message', or the type alone when the message is empty."""
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
