"""What a request can get wrong at the server's own layer, as exceptions that name the field.

Like the store's, the registry's and export's errors, these say what went wrong (the message)
and which request field is at fault (`field`, dotted: `items[3].text`; `body` for the body as a
whole), never an HTTP status: `server.errors` maps every exception type to its status and
error code in one table. No fastapi here, so the layers that raise these stay free of HTTP.
"""

from __future__ import annotations


class RequestError(Exception):
    """Base of the server's refusals of one request."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidRequestError(RequestError):
    """A body, form or parameter the route cannot use (a bad multipart part, an empty upload)."""


class InvalidBase64Error(InvalidRequestError):
    """An image field that is not base64."""


class InvalidImageError(InvalidRequestError):
    """Bytes no image decoder reads, or an empty image."""


class InvalidTextError(InvalidRequestError):
    """A text the tokenizer must not see (a NUL character)."""


class EmptyBatchError(InvalidRequestError):
    """Nothing to embed."""


class InvalidVectorError(InvalidRequestError):
    """A query vector that is not finite or has norm 0."""


class UnusableVectorError(InvalidRequestError):
    """The model gave a non-finite or zero vector for this input (a task's prompts at fault):
    never served or stored."""


class WrongDimensionError(InvalidRequestError):
    """A query vector of another width than the backbone's vectors."""


class ReservedNameError(InvalidRequestError):
    """A task name the server gives a meaning of its own ('auto')."""


class InvalidPathError(InvalidRequestError):
    """An artifact path that is absolute, climbs with '..' or leaves the artifact directory."""


class NoSuchArtifactError(RequestError):
    """No file at that path in the artifact directory."""


class TooManyItemsError(RequestError):
    """More items in one request than the server takes."""


class ImageTooLargeError(RequestError):
    """More pixels than the limit (read from the header, before decoding), or a bomb."""


class TextTooLongError(RequestError):
    """More characters than the limit."""


class NoTaskKeysError(RequestError):
    """task='auto', but no loaded task has routing keys."""


class ModelTimeoutError(RequestError):
    """The model did not answer within the request timeout."""


class MissingKeyError(RequestError):
    """A protected route called without a key."""


class WrongKeyError(RequestError):
    """A key that is not the one this route needs."""
