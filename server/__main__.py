"""`python -m server`: serve with uvicorn; settings from LPI_* env vars and flags (--help)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from server.app import create_app
from server.settings import parse_settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format='{"time": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", '
        '"message": "%(message)s"}',
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        # Longer than clients' and load balancers' idle timeouts (httpx: 5 s, ALB: 60 s): else
        # the server may close a kept-alive connection just as a client reuses it (ReadError).
        timeout_keep_alive=65,
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
