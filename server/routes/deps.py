"""What the routers share: the app's service, the key checks (run before any body is read)
and the JSON body reader for routes that also take other content types."""

from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, SecretStr, ValidationError

from server.exceptions import MissingKeyError, WrongKeyError
from server.service import Service


async def json_body(request: Request, model: type[BaseModel]):
    """The body as `model`, read here because these routes also take other content types;
    failures are FastAPI's own validation errors (422 naming the field)."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from None


def service(request: Request) -> Service:
    return request.app.state.service


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return request.headers.get("x-api-key")


def _check(request: Request, wanted: SecretStr | None, role: str) -> None:
    if wanted is None:
        return
    given = _presented_key(request)
    if given is None:
        raise MissingKeyError(
            f"this endpoint needs the {role} key (Authorization: Bearer <key>)", "authorization"
        )
    # Constant time, so the comparison reveals nothing of the key.
    if not hmac.compare_digest(given.encode(), wanted.get_secret_value().encode()):
        raise WrongKeyError(f"wrong {role} key", "authorization")


# The scope's record of the key checks a request passed: `KeyFirstRoute` runs a route's check
# before the body is read, and FastAPI would run it again as the declared dependency. A pass
# is noted with the app whose keys it checked: the scope travels into a mounted sub-app, which
# may hold other keys and must check them itself.
CHECKED = "lpi.keys_checked"


def _passed(request: Request, check) -> bool:
    return (check, id(request.app)) in request.scope.get(CHECKED, ())


def _note(request: Request, check) -> None:
    request.scope.setdefault(CHECKED, set()).add((check, id(request.app)))


async def require_api_key(request: Request) -> None:
    """Query endpoints: the API key if one is set (the admin key is accepted too)."""
    settings = request.app.state.settings
    if settings.api_key is None or _passed(request, require_api_key):
        return
    admin = settings.admin_key
    given = _presented_key(request)
    if (
        admin is not None
        and given is not None
        and hmac.compare_digest(given.encode(), admin.get_secret_value().encode())
    ):
        _note(request, require_api_key)
        return
    _check(request, settings.api_key, "API")
    _note(request, require_api_key)


async def require_admin_key(request: Request) -> None:
    """Task load, promote and unload: the admin key if one is set, else the API key if that
    is set (an API key never leaves the admin routes open)."""
    settings = request.app.state.settings
    if _passed(request, require_admin_key):
        return
    if settings.admin_key is not None:
        _check(request, settings.admin_key, "admin")
    else:
        _check(request, settings.api_key, "API")
    _note(request, require_admin_key)


KEY_CHECKS = (require_api_key, require_admin_key)


class KeyFirstRoute(APIRoute):
    """Runs the route's key check before FastAPI reads or validates the body, so a caller
    without the key gets 401/403 and learns nothing of how its body would fare (FastAPI parses
    a JSON body before it runs any dependency). The check stays declared as the route's
    dependency (for any route class), where it finds the request's scope noting that it
    passed, and compares nothing again."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        checks = [d.dependency for d in self.dependencies if d.dependency in KEY_CHECKS]
        if not checks:
            return handler

        async def key_first(request: Request):
            for check in checks:
                await check(request)
            return await handler(request)

        return key_first
