"""What the fuzzer found in admission and in `tulle apply`'s reading of YAML (docs/fuzzing.md),
each as the input that failed, written out. The raw inputs are replayed by tests/fuzz/test_fuzz.py.

Invariant: text and objects of any shape get a UserError or an AdmissionErrors naming the
problem, never another exception, a hang or all the machine's memory; what is admitted can be
stored as etcd stores it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tulle.cli.common import UserError
from tulle.cli.resources_cmd import MAX_ALIASED_VALUES, Document, _prepare, parse_documents
from tulle.datastore.objects import encode
from tulle.model.validation import AdmissionErrors, admit_all

POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p"}}


def refused(obj: Any) -> str:
    with pytest.raises(AdmissionErrors) as raised:
        admit_all([obj])
    return str(raised.value)


@pytest.mark.parametrize("value", [1.5, 7, True])
def test_rules_that_are_not_a_list_are_refused_not_a_type_error(value: Any) -> None:
    """regressions/admission/default-ingress-is-a-number: defaulting iterated over a number."""
    message = refused({**POLICY, "spec": {"podSelector": {}, "ingress": value, "egress": value}})
    assert "spec.ingress: Invalid value" in message and "must be an array" in message


def test_containers_that_are_not_a_list_are_refused() -> None:
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}, "spec": {"containers": 5}}
    assert "spec.containers: Invalid value: 5: must be an array" in refused(obj)


@pytest.mark.parametrize("entry", [["Ingress"], {"a": 1}])
def test_policy_types_that_are_not_strings_are_unsupported_values(entry: Any) -> None:
    """regressions/admission/policy-types-entry-is-a-list and -an-object: `seen.add` of a list."""
    message = refused({**POLICY, "spec": {"podSelector": {}, "policyTypes": [entry, entry]}})
    assert "spec.policyTypes[0]: Unsupported value" in message and "spec.policyTypes[1]" in message


def test_a_namespace_that_is_not_a_string_is_left_to_admission() -> None:
    """regressions/admission/prepare-namespace-is-a-list: `tulle apply`'s duplicate check hashed it."""
    obj = {**POLICY, "metadata": {"name": "p", "namespace": [["web"]]}, "spec": {"podSelector": {}}}
    docs = [Document(obj, "x.yaml", 1), Document(dict(obj), "x.yaml", 2)]
    _prepare(docs, None)
    assert "metadata.namespace: Invalid value" in refused(obj)


def bomb(levels: int) -> str:
    lines = ["apiVersion: v1", "kind: Namespace", "metadata: {name: bomb}", 'spec: {x0: &x0 ["lol"]']
    lines += [f"  , x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join([*lines, "}"]) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_once() -> None:
    """regressions/admission/yaml-alias-bomb-out-of-memory: 20 lines stood for 10**9 values."""
    started = time.monotonic()
    with pytest.raises(UserError, match=f"aliases stand for more than {MAX_ALIASED_VALUES} values"):
        parse_documents("bomb.yaml", bomb(9))
    assert time.monotonic() - started < 5


def test_aliases_within_reason_are_expanded_as_kubectl_does() -> None:
    [doc] = parse_documents("x.yaml", "a: &l {app: web}\nb: *l\nc: *l\n")
    assert doc.obj == {"a": {"app": "web"}, "b": {"app": "web"}, "c": {"app": "web"}}
    assert doc.obj["a"] is not doc.obj["b"]  # copies: defaulting one must not change the other


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("&a [*a]", "nested more than"),  # an alias to itself
        ("&b {x: *b}", "nested more than"),
        ("[" * 3000, "nested too deeply"),  # regressions/admission/yaml-nested-too-deep-recursion
        ("{" + '"a": [' * 100_000, "nested too deeply"),  # JSON: RecursionError in json too
        ("a: 2001-13-45", "month must be in 1..12"),  # a timestamp that is no date: ValueError
        ("a: 2001-12-14t21:59:43.10+25:00", "offset must be a timedelta"),
        ("a: .nan", "nan is not a JSON value"),
        ("a: -.inf", "-inf is not a JSON value"),
        ('{"a": NaN}', "nan is not a JSON value"),
    ],
)
def test_yaml_that_json_has_no_room_for_is_a_user_error(text: str, problem: str) -> None:
    with pytest.raises(UserError) as raised:
        parse_documents("x.yaml", text)
    assert problem in str(raised.value) and "x.yaml" in str(raised.value)


def test_yaml_types_become_what_the_api_servers_json_has() -> None:
    text = "a: !!binary aGk=\nb: !!set {x, y}\nc: {2001-01-02: d, 1: i, null: n, 1.5: f}\nd: 2001-01-02\ne: {true: t}\n"
    [doc] = parse_documents("x.yaml", text)
    assert doc.obj == {
        "a": "hi",
        "b": {"x": None, "y": None},
        "c": {"2001-01-02": "d", "1": "i", "null": "n", "1.5": "f"},
        "d": "2001-01-02",
        "e": {"true": "t"},
    }
    encode(doc.obj)  # as the etcd backend stores it


def test_a_pod_with_yaml_types_in_fields_tulle_does_not_read_is_stored_as_json() -> None:
    """Opaque fields (securityContext, ...) are admitted as they are: they must still be JSON."""
    text = (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n"
        "spec:\n  containers: [{name: c, image: i, securityContext: {2001-01-01: !!set {x}}}]\n"
    )
    [doc] = parse_documents("x.yaml", text)
    [admitted] = admit_all([doc.obj])
    encode(admitted)
