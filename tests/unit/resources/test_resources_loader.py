"""The YAML loader: limits against hostile files, JSON-shaped output, dispatch by kind."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciliate.resources import Namespace, Pod, ResourceError, load_documents, load_resources
from ciliate.resources.loader import DEFAULT_MAX_DEPTH

NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n"


def load_error(data: str | bytes, **limits: Any) -> ResourceError:
    with pytest.raises(ResourceError) as info:
        load_documents(data, **limits)
    return info.value


def test_multi_document_skips_empty_and_keeps_order() -> None:
    docs = load_documents(f"---\n# only a comment\n---\n{NS}---\n\n---\n{NS.replace('x', 'y')}")
    assert [d["metadata"]["name"] for d in docs] == ["x", "y"]


def test_list_is_expanded_and_item_errors_have_paths() -> None:
    text = (
        "apiVersion: v1\nkind: List\nitems:\n"
        "- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n"
        "- {apiVersion: v1, kind: Pod, metadata: {name: p, namespace: a}}\n"
    )
    resources = load_resources(text)
    assert [type(r) for r in resources] == [Namespace, Pod]
    bad = text.replace("name: p,", "name: p, labels: [1],")
    with pytest.raises(ResourceError) as info:
        load_resources(f"{NS}---\n{bad}")
    assert info.value.document == 1
    assert [e.path for e in info.value.errors] == ["items[1].metadata.labels"]


def test_resource_errors_carry_document_index() -> None:
    with pytest.raises(ResourceError) as info:
        load_resources(
            f"{NS}---\napiVersion: v1\nkind: Service\nmetadata: {{name: s}}\n"
            "spec: {ports: [{port: 0}]}\n"
        )
    assert info.value.document == 1
    assert [e.path for e in info.value.errors] == ["spec.ports[0].port"]
    assert str(info.value).startswith("document 1: spec.ports[0].port")


@pytest.mark.parametrize(
    ("doc", "field", "fragment"),
    [
        ("kind: Gizmo\napiVersion: v1\n", "kind", "unknown kind 'Gizmo'"),
        ("kind: Pod\napiVersion: v2\n", "apiVersion", "not 'v2'"),
        ("apiVersion: v1\nmetadata: {name: a}\n", "kind", "required"),
        ("kind: Pod\n", "apiVersion", "required"),
        ("kind: [Pod]\napiVersion: v1\n", "kind", "required"),
    ],
)
def test_dispatch_errors_name_kind_or_api_version(doc: str, field: str, fragment: str) -> None:
    with pytest.raises(ResourceError) as info:
        load_resources(doc)
    (error,) = info.value.errors
    assert error.path == field and fragment in error.message


def test_size_limit() -> None:
    big = NS + "# " + "x" * 2_000_000 + "\n"
    assert "larger than the limit" in str(load_error(big))
    assert "larger than the limit" in str(load_error(big.encode()))
    assert "larger than the limit" in str(load_error("é" * 600_000))  # 1.2 MB as UTF-8
    assert load_documents(NS, max_bytes=len(NS))  # exactly at the limit is fine


def test_depth_limit_and_very_deep_input_is_cheap() -> None:
    at_limit = "[" * DEFAULT_MAX_DEPTH + "]" * DEFAULT_MAX_DEPTH
    with pytest.raises(ResourceError, match="mapping"):
        load_documents(at_limit)  # parses; refused only for not being a mapping
    start = time.monotonic()
    error = load_error("a: " + "[" * 200_000 + "]" * 200_000)
    assert "deeper than" in str(error) and error.document == 0
    assert time.monotonic() - start < 5
    block = "".join(" " * i + f"k{i}:\n" for i in range(80)) + " " * 80 + "v: 1\n"
    assert "deeper than" in str(load_error(block))


def billion_laughs(levels: int) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        refs = ",".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_quickly() -> None:
    start = time.monotonic()
    error = load_error(billion_laughs(9))
    assert "alias" in str(error) and error.document == 0
    assert time.monotonic() - start < 2


def test_small_aliases_and_merge_keys_are_allowed_and_unshared() -> None:
    (doc,) = load_documents("base: &b {x: 1, y: [1, 2]}\nd:\n  <<: *b\n  y: [3]\ne: *b\n")
    assert doc["d"] == {"x": 1, "y": [3]}
    assert doc["e"] == {"x": 1, "y": [1, 2]}
    doc["e"]["y"].append(9)
    assert doc["base"]["y"] == [1, 2]  # expanded copies, not shared references


def test_recursive_and_dangling_aliases() -> None:
    assert "recursive alias" in str(load_error("a: &x [1, *x]\n"))
    assert "no anchor" in str(load_error("a: *nope\n"))


def test_document_limit() -> None:
    assert "more than 3 documents" in str(load_error("a: 1\n---\n" * 4, max_documents=3))
    many_items = "kind: List\nitems:\n" + "- {a: 1}\n" * 4
    assert "more than 3" in str(load_error(many_items, max_documents=3))


def test_invalid_utf8_and_surrogates() -> None:
    error = load_error(b"a: \xff\xfe\n")
    assert "not valid UTF-8 (at byte 3)" in str(error)
    assert "not valid UTF-8" in str(load_error("a: \ud800\n"))
    assert load_documents("\ufeffa: é\n".encode()) == [{"a": "é"}]  # a BOM is fine


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- 1\n- 2\n", "must be a mapping"),
        ("just text\n", "must be a mapping"),
        ("a: 1\na: 2\n", "duplicate key 'a'"),
        ("a: !!binary aGVsbG8=\n", "not supported"),
        ("a: !!set {x}\n", "not supported"),
        ("a: .nan\n", "JSON"),
        ("a: !!python/object:os.system x\n", "constructor"),
        ("{a: [b, c\n", "line 2"),
        ("a: \x00\n", "invalid YAML"),
        ("? [1, 2]\n: x\n", "unhashable key"),
        ("1.5: x\n", "not a string"),
        ("a: !!int 1" + "0" * 5000 + "\n", "invalid YAML value"),
    ],
)
def test_malformed_documents(text: str, fragment: str) -> None:
    assert fragment in str(load_error(text))


def test_wrong_input_type() -> None:
    with pytest.raises(ResourceError, match="text or bytes"):
        load_documents(123)  # type: ignore[arg-type]


def test_kubernetes_flavoured_scalars() -> None:
    (doc,) = load_documents("t: 2024-01-01T10:00:00Z\nd: 2024-01-01\n80: port\ntrue: yes\n")
    assert doc == {"t": "2024-01-01T10:00:00Z", "d": "2024-01-01", "80": "port", "true": True}


def test_syntax_error_names_document() -> None:
    error = load_error(f"{NS}---\n{NS}---\na: [\n")
    assert error.document == 2 and "line" in str(error)


# --- properties ---------------------------------------------------------------------------

YAML_ALPHABET = st.sampled_from(
    [*"ab: -[]{},&*!?|>'\"#%@`\n\t\\.0123456789~<=", "---\n", "\ufeff", "é", "\x00"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.lists(YAML_ALPHABET, max_size=80).map("".join),
        st.binary(max_size=200),
        st.text(max_size=200),
    )
)
def test_fuzz_only_resource_errors(data: str | bytes) -> None:
    try:
        docs = load_documents(data)
    except ResourceError:
        return
    assert all(isinstance(d, dict) for d in docs)


@settings(max_examples=150, deadline=None)
@given(st.lists(YAML_ALPHABET, max_size=60).map("".join))
def test_fuzz_load_resources_only_resource_errors(text: str) -> None:
    with contextlib.suppress(ResourceError):
        load_resources("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: " + text)


# NEL and the Unicode line separators are line breaks to YAML 1.1; PyYAML does not round-trip them.
TEXT = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x85\u2028\u2029"),
    max_size=20,
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(TEXT, JSON_VALUES, min_size=1, max_size=5), max_size=4))
def test_round_trip_of_json_shaped_documents(docs: list[dict[str, Any]]) -> None:
    text = yaml.safe_dump_all(docs, allow_unicode=True)
    loaded = load_documents(text)
    assert loaded == docs
    for value in loaded:
        assert not any(isinstance(v, float) and not math.isfinite(v) for v in value.values())
