"""The client side of ckreg: the REST client, the ``ckreg`` registry commands and optimizer
capture. Training jobs use only this package; it never touches the database or the store."""

from registry.client.api import Client
from registry.client.layouts import LayoutError
from registry.client.transport import ClientError

__all__ = ["Client", "ClientError", "LayoutError"]
