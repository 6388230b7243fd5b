"""The common shape of every resource: apiVersion, kind, metadata, and validation errors with paths.

Models accept real upstream YAML as users write it: unknown fields are kept (``extra="allow"``)
so a round trip loses nothing, while known fields are validated and rejected with their path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

M = TypeVar("M", bound=BaseModel)


class Model(BaseModel):
    """Base for every nested object: keeps unknown fields, accepts field names and aliases."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=False)


class ObjectMeta(Model):
    name: str = ""
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    resourceVersion: str | None = None
    generation: int | None = None


class Resource(Model):
    """A Kubernetes-style object. Subclasses set ``KIND``, ``API_VERSIONS`` and ``NAMESPACED``."""

    KIND: ClassVar[str] = ""
    API_VERSIONS: ClassVar[tuple[str, ...]] = ()
    NAMESPACED: ClassVar[bool] = True
    OWNER: ClassVar[str] = ""
    """The service that owns (stores and serves) this kind."""

    apiVersion: str
    kind: str
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    @property
    def key(self) -> tuple[str, str, str]:
        """(kind, namespace, name): the identity of an object in the store."""
        return (self.kind, self.metadata.namespace or "", self.metadata.name)


@dataclass(frozen=True)
class FieldError:
    """One invalid value: ``path`` is dotted with list indexes, e.g. ``spec.ports[0].port``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ResourceError(ValueError):
    """A resource (or a document of a file) failed validation; carries every field error."""

    def __init__(self, errors: Sequence[FieldError], *, document: int | None = None) -> None:
        self.errors = list(errors)
        self.document = document
        where = f"document {document}: " if document is not None else ""
        super().__init__(where + "; ".join(str(e) for e in self.errors))

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"field": e.path, "message": e.message} for e in self.errors]


def format_path(loc: Iterable[int | str]) -> str:
    """Turn a pydantic location tuple into ``a.b[0].c``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def errors_from_validation(exc: ValidationError, prefix: str = "") -> list[FieldError]:
    result = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        path = format_path(loc)
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        message = str(err["msg"])
        if err["type"] == "value_error":
            # A validator's own ValueError already reads as a sentence; pydantic's prefix is noise.
            message = message.removeprefix("Value error, ")
        result.append(FieldError(path, message))
    return result


def validate_model(model: type[M], data: Any, prefix: str = "") -> M:
    """Validate ``data`` into ``model``, raising :class:`ResourceError` with field paths."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ResourceError(errors_from_validation(exc, prefix)) from None


Loc = tuple[str | int, ...]


def raise_field_errors(title: str, problems: Sequence[tuple[Loc, str, Any]]) -> None:
    """Raise cross-field problems from a pydantic validator so they keep their exact paths.

    Each problem is ``(location relative to the model, message, offending value)``. Pydantic
    prefixes the location with the model's own position, so an after-validator on a nested
    model still reports ``spec.ports[1].name`` rather than just ``spec``. Does nothing when
    ``problems`` is empty.
    """
    if not problems:
        return
    details = [
        InitErrorDetails(
            type=PydanticCustomError("value_error", "{message}", {"message": message}),
            loc=loc,
            input=value,
        )
        for loc, message, value in problems
    ]
    raise ValidationError.from_exception_data(title, details)
