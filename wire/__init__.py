"""The wire schema of lpi-serve: every request and response type, pydantic alone.

Both the server and the SDK import it (`from wire import schema`), so installing the SDK
brings no part of the server.
"""
