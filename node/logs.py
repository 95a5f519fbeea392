"""Logging setup for the daemon: one handler on stderr, libp2p's logger routed through it."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("COOP_LOG_LEVEL", "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
