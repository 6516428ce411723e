"""Dependencies the routers share: the app's service and the API-key checks."""

from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, SecretStr, ValidationError

from server.errors import ApiError
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
        raise ApiError(401, "unauthorized", f"this endpoint needs the {role} key "
                       "(Authorization: Bearer <key>)", "authorization")  # fmt: skip
    # Constant time, so the comparison reveals nothing of the key.
    if not hmac.compare_digest(given.encode(), wanted.get_secret_value().encode()):
        raise ApiError(403, "forbidden", f"wrong {role} key", "authorization")


async def require_api_key(request: Request) -> None:
    """Query endpoints: the API key if one is set (the admin key is accepted too)."""
    settings = request.app.state.settings
    if settings.api_key is None:
        return
    admin = settings.admin_key
    given = _presented_key(request)
    if (
        admin is not None
        and given is not None
        and hmac.compare_digest(given.encode(), admin.get_secret_value().encode())
    ):
        return
    _check(request, settings.api_key, "API")


async def require_admin_key(request: Request) -> None:
    """Task load, promote and unload: the admin key if one is set, else the API key if that
    is set (an API key never leaves the admin routes open)."""
    settings = request.app.state.settings
    if settings.admin_key is not None:
        _check(request, settings.admin_key, "admin")
    else:
        _check(request, settings.api_key, "API")
