"""How the CLI and tests reach a running stack: the client context and a REST client."""

from ciliate.client.context import ClientContext, ContextMissing
from ciliate.client.rest import ApiError, Client, connect_bus

__all__ = ["ApiError", "Client", "ClientContext", "ContextMissing", "connect_bus"]
