"""structlog set-up shared by every process: key-value lines on stderr.

Call :func:`configure` once in a process's ``main``; modules take a logger with
:func:`get_logger` and bind connection context (``src``, ``dst``, ``identity``)
to it, so every line of one connection carries the same keys.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is *now*.

    Loggers are cached on first use; binding the stream object at configure time would
    keep writing to a stream that was since replaced and closed (pytest's capture does
    exactly that between tests).
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str | None = None, json: bool = False) -> None:
    """Configure structlog for this process (level from ``PYAMBIENT_LOG`` when not given)."""
    name = (level or os.environ.get("PYAMBIENT_LOG", "info")).lower()
    if name not in _LEVELS:
        raise ValueError(f"unknown log level {name!r}: use one of {', '.join(_LEVELS)}")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.processors.KeyValueRenderer(
            key_order=["timestamp", "level", "event"], drop_missing=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[name]),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )


def get_logger(component: str) -> structlog.typing.FilteringBoundLogger:
    """A logger bound with the component name."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=component)
    return logger
