"""Logging setup for the daemon: one handler on stderr (libp2p's loggers go through it too).

Two formats: ``text`` (one readable line per record) and ``json`` (one JSON object per line: ``ts`` as ISO 8601
UTC, ``level``, ``logger``, ``message``, ``exc`` when there is a traceback, and any ``extra=`` fields), for log
shippers and ``journalctl -o cat | jq``. The level comes from ``--verbose``/``--quiet``, else ``$COOP_LOG_LEVEL``,
else WARNING.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Final, TextIO

FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The attributes every LogRecord has; anything else on a record came from `extra=` and is worth keeping.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped by JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        return json.dumps(out, default=str, ensure_ascii=False)


def level_for(*, verbose: int = 0, quiet: bool = False) -> str | None:
    """The level that ``--verbose`` (INFO; twice: DEBUG) or ``--quiet`` (ERROR) ask for; None: not asked."""
    if quiet:
        return "ERROR"
    if verbose:
        return "DEBUG" if verbose > 1 else "INFO"
    return None


def setup_logging(level: str | None = None, *, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route every logger to one stderr handler in ``fmt`` at ``level`` (replacing handlers set before)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    level = (level or os.environ.get("COOP_LOG_LEVEL", "WARNING")).upper()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
