"""Label selectors: Kubernetes semantics and validation that names the field."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from ciliate.labels import LabelSet
from ciliate.resources.selectors import LabelSelector, ValidatedLabelSelector

keys = st.sampled_from(["app", "tier", "env"])
vals = st.sampled_from(["a", "b", "c"])
label_maps = st.dictionaries(keys, vals)


def reference(sel: dict[str, object], labels: dict[str, str]) -> bool:
    for k, v in dict(sel.get("matchLabels", {})).items():  # type: ignore[call-overload]
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions", []):  # type: ignore[attr-defined]
        present, value = e["key"] in labels, labels.get(e["key"])
        values = e.get("values", [])
        ok = {
            "In": present and value in values,
            "NotIn": not present or value not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[e["operator"]]
        if not ok:
            return False
    return True


expr = st.one_of(
    st.builds(lambda k, op, vs: {"key": k, "operator": op, "values": vs}, keys,
              st.sampled_from(["In", "NotIn"]), st.lists(vals, min_size=1, max_size=2)),
    st.builds(lambda k, op: {"key": k, "operator": op}, keys,
              st.sampled_from(["Exists", "DoesNotExist"])),
)  # fmt: skip
selectors = st.builds(
    lambda ml, me: {"matchLabels": ml, "matchExpressions": me},
    label_maps,
    st.lists(expr, max_size=3),
)


@given(selectors, label_maps)
def test_compiled_matcher_agrees_with_kubernetes_semantics(
    sel: dict[str, object], labels: dict[str, str]
) -> None:
    model = LabelSelector.model_validate(sel)
    assert model.matches(labels) == reference(sel, labels)
    assert model.compile().matches_labels(LabelSet.from_k8s(labels)) == reference(sel, labels)


def test_source_prefixed_key_matches_only_that_source() -> None:
    sel = LabelSelector.model_validate({"matchLabels": {"reserved:host": ""}}).compile()
    assert sel.matches_labels(LabelSet.from_strings(["reserved:host"]))
    assert not sel.matches_labels(LabelSet.from_strings(["k8s:host"]))
    any_source = LabelSelector.model_validate({"matchLabels": {"app": "x"}}).compile()
    assert any_source.matches_labels(LabelSet.from_strings(["container:app=x"]))


def test_empty_selector_selects_everything() -> None:
    assert LabelSelector.model_validate({}).matches({"anything": "x"})


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"matchLabels": {"bad key!": "x"}}, "matchLabels.bad key!"),
        ({"matchLabels": {"app": "-x"}}, "invalid label value"),
        ({"matchExpressions": [{"key": "a", "operator": "In"}]}, "matchExpressions[0].values"),
        (
            {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
            "must be empty",
        ),
        ({"matchLabels": {"UPPER.example.com/x": "y"}}, "DNS subdomain"),
    ],
)
def test_invalid_selectors_are_refused_with_the_field(
    data: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ValidationError) as info:
        ValidatedLabelSelector.model_validate(data)
    assert fragment in str(info.value)
