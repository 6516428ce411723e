"""One log format for the whole server process: JSON lines, or text for people on a terminal.

Every record goes through one handler on stderr: the server's own, uvicorn's error and access
logs (uvicorn is started with `log_config=None`, so it adds no handler of its own), libraries'
(huggingface_hub, qdrant), Python warnings, and uncaught exceptions of any thread. JSON lines
are built with the json module from the record's fields, never by string formatting, so quotes,
newlines and any unicode in a message still make one valid line (non-ASCII is escaped, so a
stderr with an ASCII locale cannot fail to write it).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Literal

LogFormat = Literal["json", "text"]
# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_STANDARD.add("color_message")  # uvicorn's copy of the message with terminal colour codes
# uvicorn's access records carry (client, method, path, http_version, status) as args.
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


def _extras(record: logging.LogRecord) -> dict:
    fields = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
    if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
        fields.update(zip(_ACCESS_FIELDS, record.args, strict=True))
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`HH:MM:SS level logger: message key=value ...` for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if record.name == "uvicorn.access":
            extras = {}  # the message already says it all
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def default_format() -> LogFormat:
    """json unless stderr is a terminal (a person reading)."""
    return "text" if sys.stderr.isatty() else "json"


def configure(log_format: LogFormat | None = None, level: str = "info") -> None:
    """Route every logger of the process to one stderr handler in one format (idempotent)."""
    chosen = log_format or default_format()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = lambda args: _log_uncaught(
        args.exc_type, args.exc_value, args.exc_traceback, args.thread
    )


def _log_uncaught(exc_type, exc, tb, thread=None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    where = f" in thread {thread.name}" if thread is not None else ""
    logging.getLogger("server").critical(
        "uncaught exception%s", where, exc_info=(exc_type, exc, tb)
    )


def fatal(message: str, log_format: LogFormat | None = None) -> None:
    """A start-up failure as one line on stderr: a JSON record, or `error: ...` for people."""
    if (log_format or default_format()) == "json":
        record = logging.LogRecord("server", logging.ERROR, __file__, 0, message, None, None)
        record.event = "startup_failed"
        sys.stderr.write(JsonFormatter().format(record) + "\n")
    else:
        sys.stderr.write(f"python -m server: error: {' '.join(message.splitlines())}\n")
    sys.stderr.flush()
