"""Multi-document YAML in, plain JSON-shaped dicts (or typed resources) out, with hard limits.

Files reach this loader from users and from the REST edge, so it treats them as hostile:

* size: at most ``max_bytes`` of UTF-8 (checked before parsing); invalid UTF-8 is refused with
  the byte offset, not replaced;
* nesting: at most ``max_depth`` levels, counted on the parser's event stream before any tree
  is built, so a deeply nested file cannot exhaust the (recursive) composer's stack;
* documents: at most ``max_documents`` (``kind: List`` items count one each);
* aliases: anchors and aliases are *allowed* (Helm and hand-written files use ``<<: *defaults``),
  but every document has an expansion budget: all aliases of a document together may stand for
  at most ``max_alias_nodes`` nodes once expanded (and their expansion counts towards the depth
  limit). A "billion laughs" file is therefore refused after a few events, and a recursive alias
  (an anchor referring to itself) is refused outright;
* types: the result is JSON-shaped as Kubernetes' own YAML reader makes it: timestamps stay
  strings, integer and boolean keys become strings, duplicate keys are an error, and values that
  JSON cannot carry (binary, sets, NaN/infinity) are refused with their path.

Every failure is a :class:`ResourceError` whose ``document`` is the 0-based index of the YAML
document in the stream (empty documents included), with the line and column where known.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from ciliate.resources.base import FieldError, Resource, ResourceError, format_path
from ciliate.resources.registry import parse_resource

DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_DOCUMENTS = 1000
DEFAULT_MAX_ALIAS_NODES = 10_000

_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """SafeLoader that keeps timestamps as text and refuses duplicate mapping keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key)
        result: dict[Any, Any] = super().construct_mapping(node, deep)
        return result


def _timestamp_as_text(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    return str(loader.construct_scalar(node))  # type: ignore[arg-type]


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_as_text)


def _mark(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or str(exc)
    else:
        problem = str(exc)
    return f"invalid YAML: {where}{problem}"


def _fail(message: str, document: int | None, path: str = "") -> ResourceError:
    return ResourceError([FieldError(path, message)], document=document)


def _decode(data: str | bytes, max_bytes: int) -> str:
    if isinstance(data, str):
        if len(data) > max_bytes:  # a character is at least one byte: no need to encode
            raise _fail(f"input is larger than the limit of {max_bytes} bytes", None)
        try:
            size = len(data.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise _fail(f"input is not valid UTF-8 text (at character {exc.start})", None) from None
        text = data
    elif isinstance(data, bytes | bytearray | memoryview):
        size = len(data)
        if size > max_bytes:
            raise _fail(f"input is larger than the limit of {max_bytes} bytes", None)
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail(f"input is not valid UTF-8 (at byte {exc.start})", None) from None
    else:
        raise _fail(f"expected text or bytes, got {type(data).__name__}", None)
    if size > max_bytes:
        raise _fail(f"input is larger than the limit of {max_bytes} bytes", None)
    return text.removeprefix("\ufeff")


@dataclass
class _Frame:
    anchor: str | None
    nodes: int = 1
    height: int = 1


def _check_events(text: str, max_depth: int, max_documents: int, max_alias_nodes: int) -> None:
    """Walk the event stream once, enforcing depth, document count and the alias budget.

    Works on events, never on a tree, so it is safe against any nesting or alias shape.
    """
    document = -1
    stack: list[_Frame] = []
    anchors: dict[str, tuple[int, int]] = {}
    open_anchors: set[str] = set()
    alias_nodes = 0

    def add_child(nodes: int, height: int) -> None:
        if stack:
            stack[-1].nodes += nodes
            stack[-1].height = max(stack[-1].height, height + 1)

    loader = _Loader(text)
    try:
        while (event := loader.get_event()) is not None:
            if isinstance(event, yaml.DocumentStartEvent):
                document += 1
                if document >= max_documents:
                    raise _fail(f"more than {max_documents} documents", document)
                anchors.clear()
                alias_nodes = 0
            elif isinstance(event, yaml.CollectionStartEvent):
                if len(stack) + 1 > max_depth:
                    raise _fail(f"nested deeper than {max_depth} levels", document)
                stack.append(_Frame(event.anchor))
                if event.anchor is not None:
                    open_anchors.add(event.anchor)
            elif isinstance(event, yaml.CollectionEndEvent):
                frame = stack.pop()
                if frame.anchor is not None:
                    anchors[frame.anchor] = (frame.nodes, frame.height)
                    open_anchors.discard(frame.anchor)
                add_child(frame.nodes, frame.height)
            elif isinstance(event, yaml.ScalarEvent):
                if event.anchor is not None:
                    anchors[event.anchor] = (1, 1)
                add_child(1, 1)
            elif isinstance(event, yaml.AliasEvent):
                name = event.anchor
                if name in open_anchors:
                    raise _fail(f"recursive alias *{name} refers to its own anchor", document)
                if name not in anchors:
                    raise _fail(f"alias *{name} refers to no anchor before it", document)
                nodes, height = anchors[name]
                alias_nodes += nodes
                if alias_nodes > max_alias_nodes:
                    raise _fail(
                        f"aliases expand to more than {max_alias_nodes} nodes (alias bomb?)",
                        document,
                    )
                if len(stack) + height > max_depth:
                    raise _fail(f"alias *{name} nests deeper than {max_depth} levels", document)
                add_child(nodes, height)
    except yaml.YAMLError as exc:
        raise _fail(_mark(exc), max(document, 0)) from None
    finally:
        loader.dispose()


def _jsonable(value: Any, path: list[str | int]) -> Any:
    """A fresh JSON-shaped copy (aliases unshared), or an error naming the offending path."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(key, bool):
                key = "true" if key else "false"
            elif isinstance(key, int):
                key = str(key)
            elif not isinstance(key, str):
                raise ValueError(path, f"mapping key {key!r} is not a string")
            out[key] = _jsonable(item, [*path, key])
        return out
    if isinstance(value, list):
        return [_jsonable(item, [*path, i]) for i, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(path, f"{value} cannot be represented in JSON")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise ValueError(path, f"a value of YAML type {type(value).__name__} is not supported")


def _construct(text: str) -> Iterator[tuple[int, Any]]:
    loader = _Loader(text)
    document = -1
    try:
        while loader.check_node():
            document += 1
            node = loader.get_node()
            yield document, loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _fail(_mark(exc), max(document, 0)) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # PyYAML's scalar constructors raise these for odd explicit tags (e.g. huge !!int).
        raise _fail(f"invalid YAML value: {exc}", max(document, 0)) from None
    finally:
        loader.dispose()


@dataclass(frozen=True)
class LoadedDocument:
    """One object of a file: its YAML document index and, for ``kind: List`` items, its path."""

    document: int
    path: str
    body: dict[str, Any]


def iter_documents(
    data: str | bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_documents: int = DEFAULT_MAX_DOCUMENTS,
    max_alias_nodes: int = DEFAULT_MAX_ALIAS_NODES,
) -> list[LoadedDocument]:
    """Like :func:`load_documents`, keeping where each object came from (for error paths)."""
    text = _decode(data, max_bytes)
    _check_events(text, max_depth, max_documents, max_alias_nodes)
    result: list[LoadedDocument] = []
    for document, raw in _construct(text):
        if raw is None:
            continue
        try:
            body = _jsonable(raw, [])
        except ValueError as exc:
            loc, message = exc.args
            raise _fail(message, document, format_path(loc)) from None
        if not isinstance(body, dict):
            kind = "a list" if isinstance(body, list) else f"a scalar ({body!r:.40})"
            raise _fail(f"a document must be a mapping (an object), not {kind}", document)
        if body.get("kind") == "List" and isinstance(body.get("items"), list):
            for index, item in enumerate(body["items"]):
                if not isinstance(item, dict):
                    raise _fail("a List item must be a mapping", document, f"items[{index}]")
                result.append(LoadedDocument(document, f"items[{index}]", item))
        else:
            result.append(LoadedDocument(document, "", body))
        if len(result) > max_documents:
            raise _fail(f"more than {max_documents} objects", document)
    return result


def load_documents(
    data: str | bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_documents: int = DEFAULT_MAX_DOCUMENTS,
    max_alias_nodes: int = DEFAULT_MAX_ALIAS_NODES,
) -> list[dict[str, Any]]:
    """Every non-empty document of a multi-document YAML stream, ``kind: List`` expanded.

    Raises :class:`ResourceError` (with ``document`` set) for anything but a clean,
    within-limits stream of mappings; see the module docstring for the limits.
    """
    return [
        loaded.body
        for loaded in iter_documents(
            data,
            max_bytes=max_bytes,
            max_depth=max_depth,
            max_documents=max_documents,
            max_alias_nodes=max_alias_nodes,
        )
    ]


def load_resources(
    data: str | bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_documents: int = DEFAULT_MAX_DOCUMENTS,
) -> list[Resource]:
    """Load and validate every object of a file into its typed resource, in file order.

    Stops at the first invalid object; its :class:`ResourceError` carries the document index,
    and paths of ``kind: List`` items start with ``items[N]``.
    """
    resources = []
    for loaded in iter_documents(
        data, max_bytes=max_bytes, max_depth=max_depth, max_documents=max_documents
    ):
        try:
            resources.append(parse_resource(loaded.body))
        except ResourceError as exc:
            errors = [FieldError(_join(loaded.path, e.path), e.message) for e in exc.errors]
            raise ResourceError(errors, document=loaded.document) from None
    return resources


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"
