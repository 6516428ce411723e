"""`python -m server`: serve with uvicorn; settings from LPI_* env vars and flags (--help).

Start-up problems an operator can fix (a bad setting, a missing extra, a data directory or port
in use, a backbone that is not where its name says) are found before anything is built and
reported as one line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from server import logs
from server.preflight import PreflightError

USAGE_ERROR = 2  # a setting, an extra, the data directory, the port or the backbone
STARTUP_FAILURE = 3  # uvicorn.run's exit status when the lifespan start-up raises

log = logging.getLogger("server")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    early_format = _early_format(argv)
    logs.configure(early_format)  # so a warning while settings validate is one format too
    try:
        from server.preflight import check_server_extra

        check_server_extra()
        settings = _parse(argv)
    except PreflightError as err:
        logs.fatal(str(err), early_format)
        return USAGE_ERROR
    logs.configure(settings.log_format, settings.log_level)
    try:
        return _serve(settings)
    except PreflightError as err:
        logs.fatal(str(err), settings.log_format)
        return USAGE_ERROR


def _early_format(argv: list[str]) -> logs.LogFormat | None:
    """--log-format (or LPI_LOG_FORMAT) before the settings parse, which may fail."""
    value = os.environ.get("LPI_LOG_FORMAT")
    for i, arg in enumerate(argv):
        if arg == "--log-format" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--log-format="):
            value = arg.partition("=")[2]
    return value if value in ("json", "text") else None


def _parse(argv: list[str]):
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from server.settings import error_line, parse_settings

    try:
        return parse_settings(argv)
    except (SettingsError, ValidationError) as err:
        raise PreflightError(error_line(err)) from None


def _serve(settings) -> int:
    from server import preflight

    preflight.check_extras(settings)
    lock = preflight.lock_data_dir(settings.data_dir)
    sock = preflight.bind(settings.host, settings.port)
    try:
        source = preflight.check_backbone(settings)
        import uvicorn

        from server.app import create_app

        host, port = sock.getsockname()[:2]
        log.info(
            "starting on http://%s:%d with backbone %s (%s), data in %s",
            host,
            port,
            source["name"],
            source["kind"],
            _data_dir_shown(settings),
            extra={"backbone_source": source, "port": port, "data_dir": str(settings.data_dir)},
        )
        app = create_app(settings, backbone_source=source)
        config = uvicorn.Config(
            app,
            log_config=None,  # server.logs formats uvicorn's records like every other
            log_level=settings.log_level,
            access_log=settings.access_log,
            # Longer than clients' and load balancers' idle timeouts (httpx: 5 s, ALB: 60 s): else
            # the server may close a kept-alive connection just as a client reuses it (ReadError).
            timeout_keep_alive=65,
            timeout_graceful_shutdown=10,
        )
        server = uvicorn.Server(config)
        # The demo bundle builds after the port opens; if that fails, stop serving and say so.
        app.state.startup.on_failure = lambda: setattr(server, "should_exit", True)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            return 130
        if not server.started:
            return STARTUP_FAILURE
        return 1 if app.state.startup.error else 0
    finally:
        sock.close()
        lock.close()


def _data_dir_shown(settings) -> str:
    """The data directory, with why when it is the default (a checkout's data/ or per-user)."""
    if "data_dir" in settings.model_fields_set:
        return str(settings.data_dir)
    from server.locations import default_data_home

    return f"{settings.data_dir} ({default_data_home().reason})"


if __name__ == "__main__":
    code = main()
    # Everything opened is closed by now: skip the interpreter's module-by-module teardown of
    # torch (seconds on a busy machine), so Ctrl-C ends the process as promptly as SIGTERM.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
