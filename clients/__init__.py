"""clients: the Python SDK of lpi-serve and the `lpi` command line (clients/cli.py).

`Client` and `AsyncClient` are twins, method for method, over one I/O-free base
(clients/base.py); their results are the wire schema's models (`clients.schema`, which is
`wire.schema`). The SDK imports only httpx, pydantic and the schema.

    from clients import Client, text_item

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        client.index("coco", [text_item("a dog on a sofa", id="d1", payload={"split": "val"})])
        hits = client.search("coco", text="a dog", top_k=5).hits
"""

from clients.aio import AsyncClient
from clients.base import RetryPolicy
from clients.calls import image_item, text_item, to_numpy
from clients.errors import (
    AuthError,
    BadRequestError,
    ConflictError,
    ConnectionFailed,
    InvalidResponseError,
    LpiError,
    NotFoundError,
    OverloadedError,
    ServerError,
    VersionChangedError,
)
from clients.sync import Client
from wire import schema

__all__ = [
    "AsyncClient",
    "AuthError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "ConnectionFailed",
    "InvalidResponseError",
    "LpiError",
    "NotFoundError",
    "OverloadedError",
    "RetryPolicy",
    "ServerError",
    "VersionChangedError",
    "image_item",
    "schema",
    "text_item",
    "to_numpy",
]
