"""The conformance scenarios' format and runner, against a fake cluster (no root, no lab).

Nothing here computes what a policy allows: the fake cluster answers with matrices the tests script,
and the checks on the scenario data are about form (valid NetworkPolicy objects, references that
resolve, the required features covered), never about which cells are reachable.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.e2e.policy_scenarios import (
    ALL_REACHABLE,
    PODS,
    PROBES,
    SCENARIOS,
    Apply,
    Delete,
    Expect,
    Label,
    MatrixFormatError,
    Scenario,
    cases,
    check_node_blocks,
    describe_mismatch,
    format_matrix,
    parse_matrix,
    policy,
    run_scenario,
    scenario_named,
    substitute,
)

CONTAINER_PORTS = {"serve-80-tcp": "TCP", "serve-80-udp": "UDP", "serve-81-tcp": "TCP", "serve-81-udp": "UDP"}


def fake_addresses(family: int) -> dict[str, str]:
    """Addresses laid out as the lab's IPAM does: one /26 (/122) block per node, pod letter = node."""
    addresses = {}
    for node, letter in enumerate("abc"):
        for index, ns in enumerate("xyz"):
            host = 64 * node + 2 + index
            addresses[f"{ns}/{letter}"] = f"10.244.0.{host}" if family == 4 else f"fd00:244::{host:x}"
    return addresses


def with_cells(base: str, **changes: bool) -> dict[tuple[str, str], bool]:
    """A parsed matrix with some cells changed; keys are written like x_a__y_b for x/a -> y/b."""
    cells = parse_matrix(base)
    for key, value in changes.items():
        src, dst = key.split("__")
        cells[(src.replace("_", "/"), dst.replace("_", "/"))] = value
    return cells


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeCluster:
    """Records what the runner asks; answers reachability from a script, then with `steady`."""

    def __init__(self, clock: FakeClock, addresses: dict[int, dict[str, str]] | None = None) -> None:
        self.clock = clock
        self.addresses = addresses or {4: fake_addresses(4), 6: fake_addresses(6)}
        self.calls: list[tuple[Any, ...]] = []
        self.script: list[dict[tuple[str, str], bool]] = []
        self.steady = parse_matrix(ALL_REACHABLE)
        self.probe_seconds = 1.0

    def reset(self) -> None:
        self.calls.append(("reset",))

    def apply(self, yaml_text: str) -> None:
        self.calls.append(("apply", yaml_text))

    def delete(self, kind: str, name: str, namespace: str | None) -> None:
        self.calls.append(("delete", kind, name, namespace))

    def label(self, kind: str, name: str, namespace: str | None, labels: dict[str, str | None]) -> None:
        self.calls.append(("label", kind, name, namespace, labels))

    def address(self, pod: str, family: int) -> str:
        self.calls.append(("address", pod, family))
        return self.addresses[family][pod]

    def reachability(self, port: int, protocol: str, family: int) -> dict[tuple[str, str], bool]:
        self.calls.append(("reachability", port, protocol, family))
        self.clock.now += self.probe_seconds
        return self.script.pop(0) if self.script else dict(self.steady)

    def verbs(self) -> list[str]:
        return [call[0] for call in self.calls]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cluster(clock: FakeClock) -> FakeCluster:
    return FakeCluster(clock)


def run(cluster: FakeCluster, clock: FakeClock, scenario: Scenario, family: int = 4) -> None:
    run_scenario(cluster, scenario, family, clock=clock, sleep=clock.sleep)


ONE_BLOCKED = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   .   .   .   X   .   .   .   .
x/b    .   .   .   .   .   .   .   .   .
x/c    .   .   .   .   .   .   .   .   .
y/a    .   .   .   .   .   .   .   .   .
y/b    .   .   .   .   .   .   .   .   .
y/c    .   .   .   .   .   .   .   .   .
z/a    .   .   .   .   .   .   .   .   .
z/b    .   .   .   .   .   .   .   .   .
z/c    .   .   .   .   .   .   .   .   .
"""


# --- parsing and showing matrices ---------------------------------------------------------------


def test_rows_are_sources_and_columns_destinations() -> None:
    cells = parse_matrix(ONE_BLOCKED)
    assert len(cells) == 81
    assert cells[("x/a", "y/b")] is False
    assert cells[("y/b", "x/a")] is True
    assert sum(cells.values()) == 80


def test_indentation_is_free() -> None:
    indented = "\n".join("        " + line for line in ONE_BLOCKED.splitlines())
    assert parse_matrix(indented) == parse_matrix(ONE_BLOCKED)


def _edit(line_index: int, new_line: str) -> str:
    lines = ONE_BLOCKED.strip("\n").splitlines()
    lines[line_index] = new_line
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        (_edit(0, "      x/a x/b x/c y/a y/b y/c z/a z/c z/b"), "header must name the destinations"),
        ("\n".join(ONE_BLOCKED.strip("\n").splitlines()[:-1]), "one row per source pod"),
        (_edit(1, "x/b    .   .   .   .   X   .   .   .   ."), "expected row x/a"),
        (_edit(1, "x/a    .   .   .   .   X   .   .   ."), "has 8 cells"),
        (_edit(1, "x/a    .   .   .   .   x   .   .   .   ."), "write '.' (reachable) or 'X'"),
        (_edit(1, "x/a    X   .   .   .   .   .   .   .   ."), "cannot block access to itself"),
    ],
)
def test_malformed_matrices_are_rejected_with_the_fault(text: str, message: str) -> None:
    with pytest.raises(MatrixFormatError, match=re.escape(message)):
        parse_matrix(text)


def test_expect_checks_its_matrix_and_probe_when_written() -> None:
    with pytest.raises(MatrixFormatError):
        Expect(80, "TCP", _edit(1, "x/a    X   .   .   .   .   .   .   .   ."))
    with pytest.raises(ValueError, match="cannot expect SCTP/80"):
        Expect(80, "SCTP", ALL_REACHABLE)
    with pytest.raises(ValueError, match="cannot expect TCP/82"):
        Expect(82, "TCP", ALL_REACHABLE)


def test_format_matrix_reads_back() -> None:
    cells = parse_matrix(ONE_BLOCKED)
    assert parse_matrix(format_matrix(cells)) == cells


def test_mismatch_marks_the_differing_cells_in_both_matrices() -> None:
    expected = parse_matrix(ONE_BLOCKED)
    observed = with_cells(ALL_REACHABLE, z_c__x_a=False)
    text = describe_mismatch(expected, observed)
    assert text.startswith("2 cells differ")
    assert "x/a -> y/b: expected X (blocked), observed . (reachable)" in text
    assert "z/c -> x/a: expected . (reachable), observed X (blocked)" in text
    expected_part, observed_part = text.split("observed:\n")
    assert expected_part.count("[") == 2 and "[X]" in expected_part and "[.]" in expected_part
    observed_rows = observed_part.splitlines()
    assert observed_rows[1].split()[5] == "[.]"  # x/a -> y/b
    assert observed_rows[9].split()[1] == "[X]"  # z/c -> x/a


# --- placeholders -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "family", "result"),
    [
        ("{ip:y/b}", 4, "10.244.0.67"),
        ("{ip:y/b}", 6, "fd00:244::43"),
        ("cidr: {cidr:y/b/32}", 4, "cidr: 10.244.0.67/32"),
        ("cidr: {cidr:y/b/32}", 6, "cidr: fd00:244::43/128"),
        ("cidr: {cidr:z/c/26}", 4, "cidr: 10.244.0.128/26"),
        ("cidr: {cidr:z/c/26}", 6, "cidr: fd00:244::80/122"),
        ("cidr: {cidr:all}", 4, "cidr: 0.0.0.0/0"),
        ("cidr: {cidr:all}", 6, "cidr: ::/0"),
        ("podSelector: {matchLabels: {pod: a}}", 4, "podSelector: {matchLabels: {pod: a}}"),
        ("podSelector: {}", 6, "podSelector: {}"),
    ],
)
def test_placeholders_are_replaced_per_family(text: str, family: int, result: str) -> None:
    assert substitute(text, fake_addresses(family), family) == result


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{ip:w/a}", "'w/a' is not one of the pods"),
        ("{cidr:x/a/24}", "use a prefix of 26 or 32"),
        ("{cidr:x/a}", "use a prefix of 26 or 32"),
        ("{cdir:x/a/26}", "unknown placeholder {cdir:x/a/26}"),
    ],
)
def test_bad_placeholders_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        substitute(text, fake_addresses(4), 4)


@pytest.mark.parametrize("family", [4, 6])
def test_node_block_layout_is_accepted(family: int) -> None:
    check_node_blocks(fake_addresses(family), family)


def test_node_block_layout_broken_by_one_pod() -> None:
    addresses = {**fake_addresses(4), "y/a": "10.244.1.3"}
    with pytest.raises(AssertionError, match=r"x/a, y/a, z/a \(all on node1\) are not in one /26 block"):
        check_node_blocks(addresses, 4)


def test_node_block_layout_broken_by_shared_block() -> None:
    addresses = fake_addresses(6)
    addresses.update({f"{ns}/c": f"fd00:244::{10 + i:x}" for i, ns in enumerate("xyz")})  # in node1's block
    with pytest.raises(AssertionError, match="two nodes' pods share a /122 block"):
        check_node_blocks(addresses, 6)


# --- the runner ---------------------------------------------------------------------------------

ONE_STEP = Scenario(
    "one-step",
    "a policy, then one matrix",
    (
        policy("x", "p", "podSelector: {}\ningress:\n- from:\n  - ipBlock:\n      cidr: {cidr:y/b/32}"),
        Expect(81, "UDP", ONE_BLOCKED),
    ),
)


def test_runner_resets_waits_for_baseline_then_plays_steps(cluster: FakeCluster, clock: FakeClock) -> None:
    cluster.steady = parse_matrix(ONE_BLOCKED)
    cluster.script = [parse_matrix(ALL_REACHABLE)] * 4
    run(cluster, clock, ONE_STEP, 6)
    assert cluster.verbs() == ["reset", *["reachability"] * 4, *["address"] * 9, "apply", "reachability"]
    baseline = [call[1:3] for call in cluster.calls[1:5]]
    assert sorted(baseline) == sorted(PROBES)
    applied = cluster.calls[14][1]
    assert "cidr: fd00:244::43/128" in applied and "{" not in applied.split("ipBlock")[1]
    assert cluster.calls[-1] == ("reachability", 81, "UDP", 6)


def test_runner_passes_label_and_delete_through(cluster: FakeCluster, clock: FakeClock) -> None:
    scenario = Scenario(
        "changes",
        "label and delete",
        (
            Label("Pod", "b", "x", {"tier": "web"}),
            Label("Namespace", "z", None, {"team": None}),
            Delete("NetworkPolicy", "p", "x"),
            Expect(80, "TCP", ALL_REACHABLE),
        ),
    )
    run(cluster, clock, scenario)
    assert ("label", "Pod", "b", "x", {"tier": "web"}) in cluster.calls
    assert ("label", "Namespace", "z", None, {"team": None}) in cluster.calls
    assert ("delete", "NetworkPolicy", "p", "x") in cluster.calls
    assert "address" not in cluster.verbs()  # no placeholders, no address lookups


def test_runner_reprobes_until_the_matrix_settles(cluster: FakeCluster, clock: FakeClock) -> None:
    cluster.steady = parse_matrix(ONE_BLOCKED)
    wrong = parse_matrix(ALL_REACHABLE)
    cluster.script = [wrong] * 4 + [wrong, wrong, wrong]
    run(cluster, clock, ONE_STEP)
    assert cluster.verbs().count("reachability") == 4 + 4
    assert clock.sleeps == [0.5, 0.5, 0.5]


def test_runner_fails_with_a_readable_diff_after_ten_seconds(cluster: FakeCluster, clock: FakeClock) -> None:
    cluster.steady = with_cells(ALL_REACHABLE, x_a__y_b=False, x_c__z_a=False)  # x/c -> z/a wrong forever
    cluster.script = [parse_matrix(ALL_REACHABLE)] * 4
    with pytest.raises(AssertionError) as failure:
        run(cluster, clock, ONE_STEP)
    message = str(failure.value)
    assert message.startswith("one-step (IPv4), step 2: UDP/81: still wrong after 10 s")
    assert "1 cells differ" in message
    assert "x/c -> z/a: expected . (reachable), observed X (blocked)" in message
    assert clock.now >= 4 * cluster.probe_seconds + 10.0  # the baseline matched at once


def test_runner_fails_when_the_baseline_never_returns(cluster: FakeCluster, clock: FakeClock) -> None:
    cluster.steady = parse_matrix(ONE_BLOCKED)
    with pytest.raises(AssertionError, match=r"one-step \(IPv4\), after reset: still wrong"):
        run(cluster, clock, ONE_STEP)
    assert "apply" not in cluster.verbs()


def test_runner_rejects_a_partial_matrix_from_the_driver(cluster: FakeCluster, clock: FakeClock) -> None:
    partial = parse_matrix(ALL_REACHABLE)
    del partial[("z/c", "z/b")]
    cluster.script = [partial]
    with pytest.raises(AssertionError, match=r"wrong set of cells \(missing \[\('z/c', 'z/b'\)\]"):
        run(cluster, clock, ONE_STEP)


def test_runner_checks_the_block_layout_before_applying(clock: FakeClock) -> None:
    cluster = FakeCluster(clock, {4: {**fake_addresses(4), "z/b": "10.244.9.9"}, 6: fake_addresses(6)})
    with pytest.raises(AssertionError, match="one /26 IPAM block per node"):
        run(cluster, clock, ONE_STEP)
    assert "apply" not in cluster.verbs()


def test_runner_refuses_a_family_the_scenario_excludes(cluster: FakeCluster, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="is for IPv6 only, not IPv4"):
        run(cluster, clock, scenario_named("ip-block-ipv4-cidr-does-not-match-ipv6"), 4)
    assert cluster.calls == []


def test_scenario_needs_one_to_four_expectations() -> None:
    with pytest.raises(ValueError, match="has 0 Expect steps"):
        Scenario("empty", "nothing", (Delete("NetworkPolicy", "p", "x"),))
    with pytest.raises(ValueError, match="has 5 Expect steps"):
        Scenario("long", "too much", tuple(Expect(80, "TCP", ALL_REACHABLE) for _ in range(5)))


# --- the scenario data --------------------------------------------------------------------------


class GoYamlLoader(yaml.SafeLoader):
    """PyYAML reading scalars as go-yaml v2 (kubectl) does: a bare y, Y, n or N is a boolean."""

    bool_values = {**yaml.SafeLoader.bool_values, "y": True, "n": False}


GoYamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))


def applied_policies(scenario: Scenario, family: int) -> Iterator[dict[str, Any]]:
    for step in scenario.steps:
        if isinstance(step, Apply):
            yield yaml.load(substitute(step.yaml, fake_addresses(family), family), Loader=GoYamlLoader)


def _keys(obj: Any, allowed: set[str], where: str, problems: list[str], required: frozenset[str] = frozenset()) -> bool:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected a mapping, got {obj!r}")
        return False
    if unknown := set(obj) - allowed:
        problems.append(f"{where}: unknown fields {sorted(unknown)}")
    if missing := required - set(obj):
        problems.append(f"{where}: missing fields {sorted(missing)}")
    return True


def _selector(selector: Any, where: str, problems: list[str]) -> None:
    if not _keys(selector, {"matchLabels", "matchExpressions"}, where, problems):
        return
    for key, value in (selector.get("matchLabels") or {}).items():
        if not isinstance(value, str):
            problems.append(f"{where}.matchLabels.{key}: {value!r} is not a string (quote it)")
    for n, expression in enumerate(selector.get("matchExpressions") or []):
        at = f"{where}.matchExpressions[{n}]"
        if not _keys(expression, {"key", "operator", "values"}, at, problems, frozenset({"key", "operator"})):
            continue
        values = expression.get("values")
        if expression["operator"] in ("In", "NotIn"):
            if not values or not all(isinstance(v, str) for v in values):
                problems.append(f"{at}: In and NotIn need a non-empty list of strings, got {values!r}")
        elif expression["operator"] in ("Exists", "DoesNotExist"):
            if values:
                problems.append(f"{at}: Exists and DoesNotExist take no values")
        else:
            problems.append(f"{at}: unknown operator {expression['operator']!r}")


def _peer(peer: Any, where: str, problems: list[str]) -> None:
    if not _keys(peer, {"podSelector", "namespaceSelector", "ipBlock"}, where, problems):
        return
    if not peer:
        problems.append(f"{where}: a peer needs a podSelector, namespaceSelector or ipBlock")
    if "ipBlock" in peer:
        if len(peer) > 1:
            problems.append(f"{where}: ipBlock cannot be combined with selectors")
        block = peer["ipBlock"]
        if not _keys(block, {"cidr", "except"}, f"{where}.ipBlock", problems, {"cidr"}):
            return
        cidr = ipaddress.ip_network(block["cidr"])  # strict: host bits must be zero
        for excluded in block.get("except") or []:
            inner = ipaddress.ip_network(excluded)
            if inner.version != cidr.version or not inner.subnet_of(cidr):
                problems.append(f"{where}.ipBlock: except {excluded} is outside {cidr}")
    for kind in ("podSelector", "namespaceSelector"):
        if kind in peer:
            _selector(peer[kind], f"{where}.{kind}", problems)


def _port(port: Any, where: str, problems: list[str]) -> None:
    if not _keys(port, {"port", "endPort", "protocol"}, where, problems):
        return
    protocol = port.get("protocol", "TCP")
    if protocol not in ("TCP", "UDP", "SCTP"):
        problems.append(f"{where}: protocol {protocol!r}")
    number = port.get("port")
    if isinstance(number, str) and number not in CONTAINER_PORTS:
        problems.append(f"{where}: {number!r} names no container port of the model pods")
    if "endPort" in port and not (isinstance(number, int) and port["endPort"] >= number):
        problems.append(f"{where}: endPort needs a numeric port no greater than it")


def network_policy_problems(doc: Any) -> list[str]:
    """What the API server would refuse in doc, as far as these scenarios use the API."""
    problems: list[str] = []
    if not _keys(doc, {"apiVersion", "kind", "metadata", "spec"}, "policy", problems, frozenset({"metadata", "spec"})):
        return problems
    if (doc.get("apiVersion"), doc.get("kind")) != ("networking.k8s.io/v1", "NetworkPolicy"):
        problems.append("policy: not a networking.k8s.io/v1 NetworkPolicy")
    _metadata(doc["metadata"], problems)
    spec = doc["spec"]
    if not _keys(
        spec,
        {"podSelector", "policyTypes", "ingress", "egress"},
        "spec",
        problems,
        frozenset({"podSelector"}),
    ):
        return problems
    _selector(spec["podSelector"], "spec.podSelector", problems)
    if not set(spec.get("policyTypes") or []) <= {"Ingress", "Egress"}:
        problems.append(f"spec.policyTypes {spec['policyTypes']!r}")
    for direction, peers_field in (("ingress", "from"), ("egress", "to")):
        for n, rule in enumerate(spec.get(direction) or []):
            _rule(rule, peers_field, f"spec.{direction}[{n}]", problems)
    return problems


def _metadata(meta: Any, problems: list[str]) -> None:
    if not _keys(meta, {"name", "namespace"}, "metadata", problems, frozenset({"name", "namespace"})):
        return
    if meta.get("namespace") not in ("x", "y", "z"):
        problems.append(f"metadata.namespace {meta.get('namespace')!r} is not x, y or z")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", str(meta.get("name"))):
        problems.append(f"metadata.name {meta.get('name')!r} is not a DNS label")


def _rule(rule: Any, peers_field: str, where: str, problems: list[str]) -> None:
    if not _keys(rule, {peers_field, "ports"}, where, problems):
        return
    for m, peer in enumerate(rule.get(peers_field) or []):
        _peer(peer, f"{where}.{peers_field}[{m}]", problems)
    for m, port in enumerate(rule.get("ports") or []):
        _port(port, f"{where}.ports[{m}]", problems)


def test_there_are_at_least_40_uniquely_named_scenarios() -> None:
    names = [scenario.name for scenario in SCENARIOS]
    assert len(names) >= 40
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name) for name in names)
    assert all(scenario.about and len(scenario.about) <= 110 for scenario in SCENARIOS)


@pytest.mark.parametrize(("scenario", "family"), cases(), ids=lambda v: v.name if isinstance(v, Scenario) else f"v{v}")
def test_every_applied_object_is_a_valid_network_policy(scenario: Scenario, family: int) -> None:
    for doc in applied_policies(scenario, family):
        assert network_policy_problems(doc) == []


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_steps_refer_to_things_that_exist(scenario: Scenario) -> None:
    applied: set[tuple[str, str]] = set()
    for step in scenario.steps:
        if isinstance(step, Apply):
            meta = yaml.safe_load(substitute(step.yaml, fake_addresses(4), 4))["metadata"]
            applied.add((meta["namespace"], meta["name"]))
        elif isinstance(step, Delete):
            assert (step.namespace, step.name) in applied, f"{scenario.name} deletes a policy it never applied"
        elif isinstance(step, Label):
            target = f"{step.namespace}/{step.name}" if step.kind == "Pod" else step.name
            assert target in (PODS if step.kind == "Pod" else ("x", "y", "z"))


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.name != "no-policy"], ids=lambda s: s.name)
def test_every_scenario_with_policies_expects_something_blocked(scenario: Scenario) -> None:
    everything = parse_matrix(ALL_REACHABLE)
    assert any(isinstance(s, Expect) and s.expected() != everything for s in scenario.steps)


def _features(scenario: Scenario) -> set[str]:
    """The parts of the NetworkPolicy API and of the suite's steps that a scenario exercises."""
    found = _step_features(scenario)
    docs = list(applied_policies(scenario, 4))
    names = [(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs]
    if len(set(names)) < len(names):
        found.add("update-in-place")
    if len(docs) > 1:
        found.add("several-policies")
    for doc in docs:
        found |= _policy_features(doc["spec"])
    return found


def _step_features(scenario: Scenario) -> set[str]:
    found: set[str] = set()
    for step in scenario.steps:
        if isinstance(step, Label):
            found.add(f"label-{step.kind.lower()}")
        if isinstance(step, Delete):
            found.add("delete")
        if isinstance(step, Expect):
            found.add(f"probe-{step.protocol.lower()}-{step.port}")
    return found


def _policy_features(spec: dict[str, Any]) -> set[str]:
    found = {"policy-types-" + "-".join(spec.get("policyTypes", ["default"])).lower()}
    for e in spec["podSelector"].get("matchExpressions", []):
        found.add(f"policy-selector-{e['operator']}")
    if spec["podSelector"] == {}:
        found.add("empty-policy-selector")
    for direction, peers_field in (("ingress", "from"), ("egress", "to")):
        if direction in spec and "policyTypes" in spec and direction.title() not in spec["policyTypes"]:
            found.add(f"ignored-{direction}-rules")
        for rule in spec.get(direction) or []:
            found |= _rule_features(rule, direction, peers_field)
    return found


def _rule_features(rule: dict[str, Any], direction: str, peers_field: str) -> set[str]:
    found: set[str] = set()
    if rule == {}:
        found.add(f"{direction}-allow-all-rule")
    if rule.get(peers_field) == []:
        found.add(f"{direction}-empty-{peers_field}")
    if rule.get("ports") == []:
        found.add(f"{direction}-empty-ports")
    for peer in rule.get(peers_field) or []:
        found |= _peer_features(peer, direction)
    for port in rule.get("ports") or []:
        found.add(f"{direction}-protocol-{port.get('protocol', 'TCP')}")
        if isinstance(port.get("port"), str):
            found.add(f"{direction}-named-port")
        if "endPort" in port:
            found.add("end-port")
    return found


def _peer_features(peer: dict[str, Any], direction: str) -> set[str]:
    found = {f"{direction}-peer-" + "+".join(sorted(peer))}
    for kind in ("podSelector", "namespaceSelector"):
        for e in (peer.get(kind) or {}).get("matchExpressions", []):
            found.add(f"{kind}-{e['operator']}")
    block = peer.get("ipBlock") or {}
    if "except" in block:
        found.add(f"{direction}-ip-block-except")
    if block.get("cidr", "").endswith("/32"):
        found.add(f"{direction}-ip-block-single-pod")
    return found


def test_the_scenarios_cover_what_the_suite_promises() -> None:
    covered: dict[str, set[str]] = {}
    for scenario in SCENARIOS:
        for feature in _features(scenario):
            covered.setdefault(feature, set()).add(scenario.name)
    required = {
        "probe-tcp-80", "probe-tcp-81", "probe-udp-80", "probe-udp-81",
        "policy-types-ingress", "policy-types-egress", "policy-types-ingress-egress", "policy-types-default",
        "ignored-ingress-rules", "ignored-egress-rules", "empty-policy-selector", "several-policies",
        "update-in-place", "delete", "label-pod", "label-namespace",
        "ingress-allow-all-rule", "egress-allow-all-rule", "ingress-empty-from", "ingress-empty-ports",
        "ingress-peer-podSelector", "ingress-peer-namespaceSelector",
        "ingress-peer-namespaceSelector+podSelector", "ingress-peer-ipBlock",
        "egress-peer-namespaceSelector", "egress-peer-podSelector", "egress-peer-ipBlock",
        "ingress-ip-block-except", "egress-ip-block-except",
        "ingress-ip-block-single-pod", "egress-ip-block-single-pod",
        "ingress-named-port", "egress-named-port", "end-port", "ingress-protocol-UDP",
        *(f"{where}-{op}" for where in ("podSelector", "namespaceSelector", "policy-selector")
          for op in ("In", "NotIn", "Exists", "DoesNotExist")),
    }  # fmt: skip
    assert sorted(required - set(covered)) == []
    sctp = covered.get("ingress-protocol-SCTP", set()) | covered.get("egress-protocol-SCTP", set())
    assert len(sctp) >= 2
    assert any(scenario.families != (4, 6) for scenario in SCENARIOS)
    assert sum(len(scenario.families) == 2 for scenario in SCENARIOS) >= 40
