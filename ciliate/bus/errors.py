"""Structured errors carried over request/reply, so a caller learns which field was wrong."""

from __future__ import annotations

from typing import Any


class BusError(RuntimeError):
    """Base for bus failures."""


class BadRequest(BusError):
    """Raised by a request handler: the reply says which field was wrong and why."""

    def __init__(self, field: str, message: str, *, code: int = 422) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
        self.code = code

    def to_reply(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "field": self.field, "message": self.message}}


class RequestFailed(BusError):
    """The remote handler answered with an error (or no one answered in time: code 503/504)."""

    def __init__(self, code: int, field: str, message: str) -> None:
        super().__init__(f"{code} {field}: {message}" if field else f"{code} {message}")
        self.code = code
        self.field = field
        self.message = message


def error_from_reply(reply: Any) -> RequestFailed | None:
    """The error a reply carries, if it is an error reply."""
    if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
        err = reply["error"]
        return RequestFailed(
            int(err.get("code", 500)), str(err.get("field", "")), str(err.get("message", ""))
        )
    return None
