"""JSON problem responses (RFC 9457) that name the failing field."""

from __future__ import annotations

import json
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from aiohttp import web

PROBLEM_TYPE = "application/problem+json"


class Problem(web.HTTPException):
    """Raise anywhere in a handler; the middleware renders it as a problem document."""

    def __init__(
        self,
        status: int,
        detail: str = "",
        *,
        errors: Sequence[dict[str, str]] = (),
        title: str | None = None,
    ) -> None:
        self.status_code = status
        self.problem: dict[str, Any] = {
            "type": "about:blank",
            "title": title or HTTPStatus(status).phrase,
            "status": status,
        }
        if detail:
            self.problem["detail"] = detail
        if errors:
            self.problem["errors"] = list(errors)
        super().__init__(
            text=json.dumps(self.problem),
            content_type=PROBLEM_TYPE,
            reason=HTTPStatus(status).phrase,
        )


def problem(status: int, detail: str = "", *, errors: Sequence[dict[str, str]] = ()) -> Problem:
    return Problem(status, detail, errors=errors)


def field_problem(status: int, field: str, message: str) -> Problem:
    return Problem(status, f"{field}: {message}" if field else message,
                   errors=[{"field": field, "message": message}])


def render(status: int, detail: str = "") -> web.Response:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status}
    if detail:
        body["detail"] = detail
    return web.Response(status=status, text=json.dumps(body), content_type=PROBLEM_TYPE)
