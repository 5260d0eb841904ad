"""Kubernetes label selectors (metav1.LabelSelector), as pure functions.

A selector is a conjunction of requirements. `matchLabels: {k: v}` is the requirement
`k In (v)`, exactly as apimachinery's LabelSelectorAsSelector converts it, so two selectors
that mean the same thing compare equal once parsed. The empty selector matches everything;
"no selector at all" is the caller's business (a NetworkPolicy peer gives it its own meaning).

Two ways to evaluate:
- `matches(selector, labels)` for one label set;
- `LabelIndex(label_sets).select(selector)` for many at once: the answer is a bitmask (bit i
  set = label_sets[i] matches), computed from inverted indexes, so selecting among thousands
  of label sets costs a few big-integer operations, not thousands of dict lookups.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IN = "In"
NOT_IN = "NotIn"
EXISTS = "Exists"
DOES_NOT_EXIST = "DoesNotExist"
OPERATORS = (IN, NOT_IN, EXISTS, DOES_NOT_EXIST)


class SelectorError(ValueError):
    """A selector that is not a valid metav1.LabelSelector."""


@dataclass(frozen=True, order=True)
class Requirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()  # sorted and without duplicates

    def matches(self, labels: Mapping[str, str]) -> bool:
        # apimachinery labels.Requirement.Matches: NotIn matches when the key is absent.
        if self.operator == IN:
            return self.key in labels and labels[self.key] in self.values
        if self.operator == NOT_IN:
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == EXISTS:
            return self.key in labels
        return self.key not in labels

    def text(self) -> str:
        if self.operator == IN:
            if len(self.values) == 1:
                return f"{self.key}={self.values[0]}"
            return f"{self.key} in ({','.join(self.values)})"
        if self.operator == NOT_IN:
            if len(self.values) == 1:
                return f"{self.key}!={self.values[0]}"
            return f"{self.key} notin ({','.join(self.values)})"
        if self.operator == EXISTS:
            return self.key
        return f"!{self.key}"


@dataclass(frozen=True, order=True)
class LabelSelector:
    """A conjunction of requirements, sorted and deduplicated; empty = matches everything."""

    requirements: tuple[Requirement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.requirements

    def text(self) -> str:
        """kubectl's notation: `app=web,tier in (a,b),!legacy`; `{}` for the empty selector."""
        return ",".join(r.text() for r in self.requirements) or "{}"


EVERYTHING = LabelSelector()


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SelectorError(f"{where}: values must be a list of strings, not {value!r}")
    return tuple(sorted(set(value)))


def parse_selector(obj: Any, where: str = "selector") -> LabelSelector:
    """A LabelSelector from its JSON form; SelectorError says what is wrong and where.

    >>> parse_selector({"matchLabels": {"app": "web"}}).text()
    'app=web'
    >>> parse_selector({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}).text()
    'tier in (a,b)'
    """
    if obj is None:
        return EVERYTHING
    if not isinstance(obj, dict):
        raise SelectorError(f"{where} must be an object, not {obj!r}")
    requirements = set(_match_labels(obj.get("matchLabels") or {}, f"{where}.matchLabels"))
    expressions = obj.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise SelectorError(f"{where}.matchExpressions must be a list, not {expressions!r}")
    for i, expr in enumerate(expressions):
        requirements.add(_match_expression(expr, f"{where}.matchExpressions[{i}]"))
    return LabelSelector(tuple(sorted(requirements)))


def _match_labels(labels: Any, where: str) -> Iterator[Requirement]:
    if not isinstance(labels, dict):
        raise SelectorError(f"{where} must be an object, not {labels!r}")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SelectorError(f"{where}: {key!r}: {value!r} must map a string to a string")
        yield Requirement(key, IN, (value,))


def _match_expression(expr: Any, where: str) -> Requirement:
    if not isinstance(expr, dict):
        raise SelectorError(f"{where} must be an object, not {expr!r}")
    key, operator = expr.get("key"), expr.get("operator")
    if not isinstance(key, str) or not key:
        raise SelectorError(f"{where}.key must be a non-empty string")
    if operator not in OPERATORS:
        raise SelectorError(f"{where}.operator {operator!r} is not one of {', '.join(OPERATORS)}")
    values = _strings(expr.get("values") or [], f"{where}.values")
    # metav1 validation: In and NotIn need values, Exists and DoesNotExist must have none.
    if operator in (IN, NOT_IN) and not values:
        raise SelectorError(f"{where}: operator {operator} needs at least one value")
    if operator in (EXISTS, DOES_NOT_EXIST) and values:
        raise SelectorError(f"{where}: operator {operator} takes no values")
    return Requirement(key, operator, values)


def matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    """True if the labels satisfy every requirement of the selector.

    >>> matches(parse_selector({"matchLabels": {"app": "web"}}), {"app": "web", "tier": "a"})
    True
    """
    return all(r.matches(labels) for r in selector.requirements)


def bits(mask: int) -> Iterator[int]:
    """The positions of the set bits of mask, lowest first.

    >>> list(bits(0b10110))
    [1, 2, 4]
    """
    text = bin(mask)[:1:-1]  # least significant bit first, without '0b'
    i = text.find("1")
    while i >= 0:
        yield i
        i = text.find("1", i + 1)


class LabelIndex:
    """Inverted indexes over a fixed list of label sets, to select among them by bitmask.

    >>> index = LabelIndex([{"app": "web"}, {"app": "db"}, {}])
    >>> list(bits(index.select(parse_selector({"matchLabels": {"app": "web"}}))))
    [0]
    >>> absent = parse_selector({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]})
    >>> list(bits(index.select(absent)))
    [2]
    """

    def __init__(self, label_sets: Sequence[Mapping[str, str]]) -> None:
        self.size = len(label_sets)
        self.all = (1 << self.size) - 1
        by_pair: dict[tuple[str, str], list[int]] = {}
        by_key: dict[str, list[int]] = {}
        for i, labels in enumerate(label_sets):
            for key, value in labels.items():
                by_pair.setdefault((key, value), []).append(i)
                by_key.setdefault(key, []).append(i)
        self._pair = {pair: mask_of(members) for pair, members in by_pair.items()}
        self._key = {key: mask_of(members) for key, members in by_key.items()}
        self._cache: dict[LabelSelector, int] = {}

    def _requirement(self, r: Requirement) -> int:
        if r.operator in (IN, NOT_IN):
            found = 0
            for value in r.values:
                found |= self._pair.get((r.key, value), 0)
            return found if r.operator == IN else self.all & ~found
        found = self._key.get(r.key, 0)
        return found if r.operator == EXISTS else self.all & ~found

    def select(self, selector: LabelSelector) -> int:
        """Bitmask of the label sets the selector matches."""
        cached = self._cache.get(selector)
        if cached is not None:
            return cached
        mask = self.all
        for r in selector.requirements:
            mask &= self._requirement(r)
            if not mask:
                break
        self._cache[selector] = mask
        return mask


def mask_of(members: Iterable[int]) -> int:
    """The bitmask with the given bits set.

    >>> mask_of([0, 2])
    5
    """
    # Built from bytes: linear in the size, where OR-ing big integers bit by bit is quadratic.
    members = list(members)
    if not members:
        return 0
    raw = bytearray(max(members) // 8 + 1)
    for i in members:
        raw[i >> 3] |= 1 << (i & 7)
    return int.from_bytes(raw, "little")
