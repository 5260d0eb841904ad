"""Label selectors: parsing, Kubernetes matching semantics, and the bitmask index agreeing with them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tulle.model.selectors import (
    EVERYTHING,
    LabelIndex,
    LabelSelector,
    Requirement,
    SelectorError,
    bits,
    mask_of,
    matches,
    parse_selector,
)


def test_match_labels_is_an_in_requirement_so_equal_selectors_compare_equal() -> None:
    a = parse_selector({"matchLabels": {"app": "web"}})
    b = parse_selector({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]})
    assert a == b
    assert a.requirements == (Requirement("app", "In", ("web",)),)


def test_order_and_duplicates_do_not_matter() -> None:
    a = parse_selector(
        {
            "matchLabels": {"b": "1", "a": "2"},
            "matchExpressions": [{"key": "t", "operator": "In", "values": ["y", "x", "x"]}],
        }
    )
    b = parse_selector(
        {
            "matchExpressions": [
                {"key": "t", "operator": "In", "values": ["x", "y"]},
                {"key": "a", "operator": "In", "values": ["2"]},
            ],
            "matchLabels": {"b": "1"},
        }
    )
    assert a == b


def test_empty_and_absent_selectors_match_everything() -> None:
    assert parse_selector({}) == EVERYTHING
    assert parse_selector(None) == EVERYTHING
    assert matches(EVERYTHING, {})
    assert matches(EVERYTHING, {"any": "thing"})


@pytest.mark.parametrize(
    ("expr", "labels", "expected"),
    [
        ({"key": "t", "operator": "In", "values": ["a", "b"]}, {"t": "a"}, True),
        ({"key": "t", "operator": "In", "values": ["a", "b"]}, {"t": "c"}, False),
        ({"key": "t", "operator": "In", "values": ["a"]}, {}, False),
        ({"key": "t", "operator": "NotIn", "values": ["a"]}, {"t": "b"}, True),
        ({"key": "t", "operator": "NotIn", "values": ["a"]}, {"t": "a"}, False),
        # apimachinery: NotIn matches a label set without the key
        ({"key": "t", "operator": "NotIn", "values": ["a"]}, {}, True),
        ({"key": "t", "operator": "Exists"}, {"t": ""}, True),
        ({"key": "t", "operator": "Exists"}, {"u": "t"}, False),
        ({"key": "t", "operator": "DoesNotExist"}, {}, True),
        ({"key": "t", "operator": "DoesNotExist"}, {"t": "x"}, False),
    ],
)
def test_operators(expr: dict[str, object], labels: dict[str, str], expected: bool) -> None:
    selector = parse_selector({"matchExpressions": [expr]})
    assert matches(selector, labels) is expected
    assert bool(LabelIndex([labels]).select(selector)) is expected


def test_requirements_are_anded() -> None:
    selector = parse_selector(
        {"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "legacy", "operator": "DoesNotExist"}]}
    )
    assert matches(selector, {"app": "web"})
    assert not matches(selector, {"app": "web", "legacy": "1"})
    assert not matches(selector, {"app": "db"})


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ([], "must be an object"),
        ({"matchLabels": ["a"]}, "matchLabels must be an object"),
        ({"matchLabels": {"a": 1}}, "string"),
        ({"matchExpressions": [{"key": "a", "operator": "Is", "values": ["b"]}]}, "is not one of"),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}, "needs at least one value"),
        ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]}, "takes no values"),
        ({"matchExpressions": [{"operator": "Exists"}]}, "key must be"),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": [1]}]}, "list of strings"),
    ],
)
def test_malformed_selectors_say_what_and_where(obj: object, fragment: str) -> None:
    with pytest.raises(SelectorError) as err:
        parse_selector(obj, "spec.podSelector")
    assert fragment in str(err.value)
    assert "spec.podSelector" in str(err.value)


def test_text_is_kubectl_notation() -> None:
    selector = parse_selector(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "legacy", "operator": "DoesNotExist"},
                {"key": "zone", "operator": "NotIn", "values": ["x"]},
                {"key": "team", "operator": "Exists"},
            ],
        }
    )
    assert selector.text() == "app=web,!legacy,team,tier in (a,b),zone!=x"
    assert EVERYTHING.text() == "{}"


# -- property: the bitmask index means exactly what `matches` means ----------------------------------

KEYS = st.sampled_from(["app", "tier", "team", "x"])
VALUES = st.sampled_from(["a", "b", "c", ""])
LABELS = st.dictionaries(KEYS, VALUES, max_size=4)


@st.composite
def requirements(draw: st.DrawFn) -> Requirement:
    op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
    values: tuple[str, ...] = ()
    if op in ("In", "NotIn"):
        values = tuple(sorted(draw(st.sets(VALUES, min_size=1, max_size=3))))
    return Requirement(draw(KEYS), op, values)


SELECTORS = st.lists(requirements(), max_size=4).map(lambda rs: LabelSelector(tuple(sorted(set(rs)))))


@settings(max_examples=300, deadline=None)
@given(label_sets=st.lists(LABELS, max_size=20), selector=SELECTORS)
def test_label_index_agrees_with_matches(label_sets: list[dict[str, str]], selector: LabelSelector) -> None:
    index = LabelIndex(label_sets)
    expected = {i for i, labels in enumerate(label_sets) if matches(selector, labels)}
    assert set(bits(index.select(selector))) == expected
    assert index.select(selector) == index.select(selector)  # cached answer is the same


@given(selector=SELECTORS)
def test_parse_of_the_json_form_round_trips(selector: LabelSelector) -> None:
    obj = {
        "matchExpressions": [
            {"key": r.key, "operator": r.operator, **({"values": list(r.values)} if r.values else {})}
            for r in selector.requirements
        ]
    }
    assert parse_selector(obj) == selector


@given(st.sets(st.integers(min_value=0, max_value=5000)))
def test_bits_and_mask_of_round_trip(members: set[int]) -> None:
    assert list(bits(mask_of(members))) == sorted(members)
