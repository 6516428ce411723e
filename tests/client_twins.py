"""The SDK's twins behind one blocking face, for tests: `Client` through a sync transport that
runs an ASGI app on an anyio portal's loop, `AsyncClient` through `httpx.ASGITransport` on that
same loop. Registered as a pytest plugin (tests/conftest.py), so `portal` and `connect` are
fixtures of every test module.
"""

from __future__ import annotations

import functools
import inspect

import httpx
import pytest
from anyio.from_thread import start_blocking_portal

from clients import AsyncClient, Client

URL = "http://lpi.test"


class PortalTransport(httpx.BaseTransport):
    """A sync transport over an ASGI app whose event loop runs in an anyio portal's thread."""

    def __init__(self, app, portal) -> None:
        self._asgi, self._portal = httpx.ASGITransport(app), portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # a buffered body streams to the async transport too

        async def send() -> httpx.Response:
            response = await self._asgi.handle_async_request(request)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content)

        return self._portal.call(send)


class Twin:
    """Either client behind one blocking face: async methods run on the portal's loop."""

    def __init__(self, client: Client | AsyncClient, portal) -> None:
        self.client, self.portal, self.sleeps = client, portal, []
        if isinstance(client, AsyncClient):

            async def sleep(seconds: float) -> None:
                self.sleeps.append(seconds)

            client._sleep = sleep
        else:
            client._sleep = self.sleeps.append

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        if not inspect.iscoroutinefunction(method):
            return method
        return lambda *args, **kwargs: self.portal.call(functools.partial(method, *args, **kwargs))


@pytest.fixture(scope="module")
def portal():
    with start_blocking_portal() as portal:
        yield portal


@pytest.fixture(params=["sync", "async"])
def connect(request, portal):
    """connect(app=...) or connect(transport=MockTransport(...)), plus client options."""
    made: list[Twin] = []

    def make(app=None, transport=None, **options) -> Twin:
        if request.param == "sync":
            transport = PortalTransport(app, portal) if app is not None else transport
            twin = Twin(Client(URL, transport=transport, **options), portal)
        else:
            transport = httpx.ASGITransport(app) if app is not None else transport
            twin = Twin(AsyncClient(URL, transport=transport, **options), portal)
        made.append(twin)
        return twin

    yield make
    for twin in made:
        twin.close()
