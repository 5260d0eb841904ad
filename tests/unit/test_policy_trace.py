"""Trace, the nft table as the kernel would evaluate it, conntrack cutting, and `tulle policy trace`.

`simulate` evaluates the table `policy_table` produces the way the chains of
tulle.policy.datapath do (set lookups only); the property tests check that trace, the verdict
used for conntrack cutting and this evaluation of the real table never disagree (I7).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_policy_compiler import (
    FLOWS,
    ICMP,
    NAMESPACES,
    PODS,
    SCTP,
    TCP,
    UDP,
    Obj,
    all_addresses,
    build,
    cluster,
    clusters,
    endpoint,
    labelled,
    namespace,
    netpol,
    pod,
)
from tulle.cli import main as cli_main
from tulle.cli.common import UserError
from tulle.cli.policy_cmd import parse_port, resolve_endpoint
from tulle.datastore.base import Datastore
from tulle.kernelstate.conntrack import Connection
from tulle.kernelstate.nft import NftTable
from tulle.model import kinds
from tulle.policy.compiler import EGRESS, INGRESS, PolicyModel, compile_policies
from tulle.policy.cutting import connections_to_cut
from tulle.policy.datapath import counter_name, policy_table
from tulle.policy.inputs import inputs_from_objects
from tulle.policy.trace import protocol_number, trace
from tulle.policy.verdict import flow_allowed

# -- trace -----------------------------------------------------------------------------------------


def web_cluster() -> PolicyModel:
    return cluster(
        netpol("x", "deny-all", podSelector={}),
        netpol(
            "x",
            "allow-web",
            podSelector=labelled("app", "b"),
            ingress=[
                {"from": [{"ipBlock": {"cidr": "192.0.2.0/24"}}], "ports": [{"port": 443}]},
                {"from": [{"podSelector": labelled("app", "a")}], "ports": [{"port": "http"}]},
            ],
        ),
        netpol(
            "y",
            "out",
            podSelector=labelled("app", "a"),
            policyTypes=["Egress"],
            egress=[{"ports": [{"port": 53, "protocol": "UDP"}]}],
        ),
    )


def test_trace_names_the_rule_that_allows() -> None:
    result = trace(web_cluster(), "10.0.0.1", "10.0.0.2", "TCP", 8080)
    assert result.allowed
    assert result.src_pod == "x/a" and result.dst_pod == "x/b"
    assert result.ingress.verdict.isolating == ("x/allow-web", "x/deny-all")
    assert [(r.policy, r.index) for r in result.ingress.verdict.allowed_by] == [("x/allow-web", 1)]
    assert result.egress.status() == "not isolated"
    text = "\n".join(result.lines())
    assert text.startswith("ALLOWED  TCP 10.0.0.1 -> 10.0.0.2:8080")
    assert "source       pod x/a (10.0.0.1)" in text
    assert "allowed by policy x/allow-web, ingress rule 2 (from pods app=a in namespace x, port http/TCP)" in text


def test_trace_explains_a_denial_rule_by_rule() -> None:
    result = trace(web_cluster(), "10.0.0.3", "10.0.0.2", "tcp", 8080)
    assert not result.allowed
    assert result.ingress.status() == "denied"
    text = "\n".join(result.lines())
    assert "ingress: pod x/b is isolated by policies x/allow-web, x/deny-all" in text
    assert "denied: no ingress rule of these policies allows it" in text
    assert (
        "policy x/allow-web, ingress rule 1 (from 192.0.2.0/24, port 443/TCP): "
        "pod y/c (10.0.0.3) is not one of its peers, and port 8080/TCP is not one of its ports" in text
    )
    assert (
        "policy x/allow-web, ingress rule 2 (from pods app=a in namespace x, port http/TCP): "
        "pod y/c (10.0.0.3) is not one of its peers" in text
    )


def test_trace_egress_is_decided_for_the_source() -> None:
    model = web_cluster()
    denied = trace(model, "10.0.0.3", "192.0.2.1", "udp", 54)
    assert not denied.allowed
    assert denied.egress.verdict.pod == "y/c"
    assert denied.ingress.status() == "not a pod"
    assert "egress: pod y/c is isolated by policy y/out" in "\n".join(denied.lines())
    assert trace(model, "10.0.0.3", "192.0.2.1", "udp", 53).allowed


def test_trace_of_a_policy_without_rules() -> None:
    result = trace(web_cluster(), "10.0.0.2", "10.0.0.1", "tcp", 80)
    assert not result.allowed
    assert "(this policy has no ingress rules)" in "\n".join(result.lines())


def test_addresses_outside_the_cluster_are_not_isolated() -> None:
    result = trace(web_cluster(), "192.0.2.1", "198.51.100.1", "tcp", 80)
    assert result.allowed
    assert result.egress.status() == "not a pod" and result.ingress.status() == "not a pod"


def test_trace_json() -> None:
    out = trace(web_cluster(), "fd00::1", "fd00::2", 6, 8080).to_json()
    json.dumps(out)
    assert out["verdict"] == "allowed"
    assert out["src"] == {"address": "fd00::1", "pod": "x/a"}
    assert out["ingress"]["allowedBy"] == [
        {
            "policy": "x/allow-web",
            "index": 1,
            "rule": "policy x/allow-web, ingress rule 2 (from pods app=a in namespace x, port http/TCP)",
        }
    ]
    assert out["ingress"]["rules"][0]["peerMatches"] is False
    assert out["egress"]["status"] == "not isolated"


def test_trace_refuses_mixed_families_and_unknown_protocols() -> None:
    with pytest.raises(ValueError, match="same IP family"):
        trace(web_cluster(), "10.0.0.1", "fd00::2", "tcp", 80)
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_number("carrier-pigeon")
    assert protocol_number("ICMP") == 1 and protocol_number("17") == 17


# -- the table as the kernel evaluates it ------------------------------------------------------------


def _interval_hit(elements: Any, values: tuple[int, ...]) -> bool:
    return any(all(lo <= v <= hi for (lo, hi), v in zip(e, values, strict=True)) for e in elements)


class Simulator:
    """Evaluates the table's sets the way the chains of tulle.policy.datapath use them."""

    def __init__(self, table: NftTable) -> None:
        self.sets = {name: x.elements for name, x in table.sets.items()}
        self.maps = {name: dict(x.elements) for name, x in table.sets.items() if x.map}

    def atom_mark(self, v: str, address: int) -> int:
        hits = [mark for ((lo, hi),), mark in self.sets[f"atoms_{v}"] if lo <= address <= hi]
        assert len(hits) == 1, "the atom map must cover every address exactly once"
        return int(hits[0])

    def isolated_chain(
        self, direction: str, v: str, me: int, them: int, protocol: int, port: int | None
    ) -> tuple[bool, str | None]:
        if (me,) in self.sets[f"{direction}_open_{v}"]:
            return True, None
        has_port = port is not None and protocol in (TCP, UDP, SCTP)
        if has_port and _interval_hit(self.sets[f"{direction}_anyone_{v}"], (me, protocol, port or 0)):
            return True, None
        mark = self.atom_mark(v, them)
        if (me, mark) in self.sets[f"{direction}_peer_all_{v}"]:
            return True, None
        if has_port and _interval_hit(self.sets[f"{direction}_peer_ports_{v}"], (me, mark, protocol, port or 0)):
            return True, None
        return False, self.maps[f"{direction}_drop_counters_{v}"].get((me,))

    def run(
        self, src: str, dst: str, protocol: int, port: int | None, hook: str = "forward"
    ) -> tuple[bool, str | None]:
        """(accepted, counter that counted the drop) for the first packet of a new connection."""
        v = f"v{ipaddress.ip_address(src).version}"
        s, d = int(ipaddress.ip_address(src)), int(ipaddress.ip_address(dst))
        for direction, me, them in ((EGRESS, s, d), (INGRESS, d, s)):
            if direction == INGRESS and hook != "forward":
                break
            target = self.maps[f"{direction}_endpoints_{v}"].get((me,))
            if target is None:
                continue
            assert target == ("jump", f"{direction}_isolated_{v}")
            ok, counter = self.isolated_chain(direction, v, me, them, protocol, port)
            if not ok:
                return False, counter
        return True, None


def simulate(
    table: NftTable, src: str, dst: str, protocol: int, port: int | None, hook: str = "forward"
) -> tuple[bool, str | None]:
    return Simulator(table).run(src, dst, protocol, port, hook)


def test_simulated_table_drops_and_counts() -> None:
    model = web_cluster()
    table = policy_table(model, ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::2"])
    assert simulate(table, "10.0.0.1", "10.0.0.2", TCP, 8080) == (True, None)
    assert simulate(table, "10.0.0.4", "10.0.0.2", TCP, 8080) == (False, counter_name(INGRESS, "10.0.0.2"))
    assert simulate(table, "10.0.0.3", "10.0.0.2", TCP, 8080) == (False, counter_name(EGRESS, "10.0.0.3"))
    assert simulate(table, "10.0.0.3", "10.0.0.1", UDP, 54) == (False, counter_name(EGRESS, "10.0.0.3"))
    assert simulate(table, "10.0.0.3", "172.30.0.1", UDP, 54, hook="input") == (
        False,
        counter_name(EGRESS, "10.0.0.3"),
    )
    assert simulate(table, "192.0.2.1", "10.0.0.2", TCP, 443) == (True, None)
    assert simulate(table, "fd00::1", "fd00::2", TCP, 8080) == (True, None)
    assert simulate(table, "fd00::1", "fd00::2", SCTP, 8080) == (False, counter_name(INGRESS, "fd00::2"))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=clusters(), data=st.data())
def test_the_table_trace_and_verdicts_agree(
    world: tuple[list[Obj], list[Obj], list[Obj], list[Obj]], data: st.DataObject
) -> None:
    """I7: what trace says is what the table does, for any cluster and any set of local pods."""
    model = compile_policies(inputs_from_objects(*world))
    addresses = all_addresses(model)
    local = set(data.draw(st.lists(st.sampled_from(sorted(model.addresses) or ["10.0.0.1"]), unique=True)))
    simulator = Simulator(policy_table(model, local))
    table = policy_table(model, local)
    for src in addresses:
        for dst in addresses:
            if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
                continue
            for protocol, port in FLOWS:
                result = trace(model, src, dst, protocol, port)
                assert result.allowed == flow_allowed(model, src, dst, protocol, port)
                egress_ok = src not in local or result.egress.allowed
                ingress_ok = dst not in local or result.ingress.allowed
                accepted, counter = simulator.run(src, dst, protocol, port)
                assert accepted == (egress_ok and ingress_ok), (src, dst, protocol, port, result.lines())
                if not accepted:
                    expected = counter_name(EGRESS, src) if not egress_ok else counter_name(INGRESS, dst)
                    assert counter == expected
                    assert counter in table.counters


# -- conntrack: what to cut ----------------------------------------------------------------------------


def conn(
    src: str,
    dst: str,
    protocol: int,
    dport: int | None,
    reply_src: str | None = None,
    reply_sport: int | None = None,
) -> Connection:
    family = ipaddress.ip_address(src).version
    sport = 40000 if dport is not None else None
    return Connection(
        family,
        protocol,
        src,
        dst,
        sport,
        dport,
        reply_src or dst,
        src,
        reply_sport if reply_sport is not None else dport,
        sport,
        (1, 8, 0) if protocol == ICMP else None,
    )


def test_cut_selects_only_connections_now_denied_on_this_nodes_side() -> None:
    """I8, I9: only the enforced side is judged, as forward saw it; the node's own traffic is never cut."""
    model = web_cluster()
    keep_allowed = conn("10.0.0.1", "10.0.0.2", TCP, 8080)
    cut_ingress = conn("10.0.0.4", "10.0.0.2", TCP, 8080)
    cut_icmp = conn("10.0.0.1", "10.0.0.2", ICMP, None)
    keep_node = conn("172.30.0.5", "10.0.0.2", TCP, 22)  # the node's own traffic to its pod
    cut_egress = conn("10.0.0.3", "192.0.2.1", UDP, 54)
    keep_egress = conn("10.0.0.3", "192.0.2.1", UDP, 53)
    # Through a service: judged by the backend (the reply's source) and its port, as forward saw it.
    cut_dnat = conn("10.0.0.4", "10.96.0.10", TCP, 80, reply_src="10.0.0.2", reply_sport=8080)
    keep_dnat = conn("10.0.0.1", "10.96.0.10", TCP, 80, reply_src="10.0.0.2", reply_sport=8080)
    keep_v6 = conn("fd00::1", "fd00::2", TCP, 8080)
    cut_v6 = conn("fd00::1", "fd00::2", TCP, 8081)
    everything = [
        keep_allowed,
        cut_ingress,
        cut_icmp,
        keep_node,
        cut_egress,
        keep_egress,
        cut_dnat,
        keep_dnat,
        keep_v6,
        cut_v6,
    ]
    local = ["10.0.0.2", "10.0.0.3", "fd00::2"]
    got = connections_to_cut(model, local, everything, node_addresses=["172.30.0.5", "fe80::1"])
    assert got == [cut_ingress, cut_icmp, cut_egress, cut_dnat, cut_v6]
    # Another node enforces nothing for pods it does not host.
    assert connections_to_cut(model, ["10.0.0.4"], everything) == []
    # The destination's node judges ingress only; the source's node egress only.
    assert connections_to_cut(model, ["10.0.0.3"], [cut_ingress, cut_egress]) == [cut_egress]
    assert connections_to_cut(model, ["10.0.0.2"], [cut_ingress, cut_egress]) == [cut_ingress]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=clusters(), data=st.data())
def test_an_allowed_connection_is_never_cut(
    world: tuple[list[Obj], list[Obj], list[Obj], list[Obj]], data: st.DataObject
) -> None:
    """I8: cutting removes exactly the connections the table would now drop, never an allowed one."""
    model = compile_policies(inputs_from_objects(*world))
    local = set(data.draw(st.lists(st.sampled_from(sorted(model.addresses) or ["10.0.0.1"]), unique=True)))
    simulator = Simulator(policy_table(model, local))
    addresses = all_addresses(model)
    conns = [
        conn(s, d, protocol, port)
        for s in addresses
        for d in addresses
        if ipaddress.ip_address(s).version == ipaddress.ip_address(d).version
        for protocol, port in FLOWS
    ]
    cut = set(connections_to_cut(model, local, conns))
    for c in conns:
        src, dst, protocol, port = c.flow
        assert (c in cut) == (not simulator.run(src, dst, protocol, port)[0])


# -- tulle policy trace ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80/tcp", (6, 80)),
        ("53/UDP", (17, 53)),
        ("9/sctp", (132, 9)),
        ("8080", (6, 8080)),
        ("icmp", (1, None)),
    ],
)
def test_parse_port(text: str, expected: tuple[int, int | None]) -> None:
    assert parse_port(text) == expected


@pytest.mark.parametrize("text", ["tcp", "0/tcp", "80/icmp", "80/tcp/x", "http/tcp", "70000/udp", "carrier"])
def test_parse_port_errors_say_what_to_write(text: str) -> None:
    with pytest.raises(UserError):
        parse_port(text)


def test_resolve_endpoint_by_name_and_family() -> None:
    model = build(NAMESPACES, [*PODS, pod("default", "solo", ["10.0.0.9"])])
    assert resolve_endpoint(model, "x/a", 4) == "10.0.0.1"
    assert resolve_endpoint(model, "x/a", 6) == "fd00::1"
    assert resolve_endpoint(model, "solo", 4) == "10.0.0.9"
    assert resolve_endpoint(model, "FD00::0:1", 4) == "fd00::1"
    with pytest.raises(UserError, match="no IPv6 address"):
        resolve_endpoint(model, "solo", 6)
    with pytest.raises(UserError, match="no pod x/zz"):
        resolve_endpoint(model, "x/zz", 4)


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        cli_main.main(argv)
    out = capsys.readouterr()
    return int(done.value.code or 0), out.out, out.err


def test_tulle_policy_trace_reads_the_datastore(
    store: Datastore, etcd_server: Any, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for obj in [
        *NAMESPACES,
        *PODS,
        netpol(
            "x",
            "allow-a",
            podSelector=labelled("app", "b"),
            ingress=[{"from": [{"podSelector": labelled("app", "a")}]}],
        ),
        endpoint("x", "e", ["10.0.0.20"]),
        namespace("z"),
    ]:
        assert store.create(obj) is not None
    common = ["--datastore", etcd_server.url, "--prefix", prefix]
    status, out, _ = _run_cli(["policy", "trace", "x/a", "x/b", "80/tcp", *common], capsys)
    assert status == 0  # allowed
    assert out.startswith("ALLOWED  TCP 10.0.0.1 -> 10.0.0.2:80")
    assert "allowed by policy x/allow-a, ingress rule 1 (from pods app=a in namespace x, all ports)" in out
    status, out, _ = _run_cli(
        ["policy", "trace", "y/c", "x/b", "80/tcp", "--family", "6", "-o", "json", *common], capsys
    )
    data = json.loads(out)
    assert status == 1  # denied
    assert data["verdict"] == "denied" and data["src"]["address"] == "fd00::3"
    assert data["ingress"]["isolatedBy"] == ["x/allow-a"]
    status, out, _ = _run_cli(["policy", "trace", "y/c", "x/b", "80/tcp", *common], capsys)
    assert status == 1 and out.startswith("DENIED")
    status, _, err = _run_cli(["policy", "trace", "x/nobody", "x/b", "80/tcp", *common], capsys)
    assert status == 2 and "no pod x/nobody" in err  # an error, neither allowed nor denied
    status, _, err = _run_cli(["policy", "trace", "x/a", "x/b", "http/tcp", *common], capsys)
    assert status == 2 and err.startswith("error: ")


def test_tulle_policy_trace_help_says_its_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run_cli(["policy", "trace", "--help"], capsys)
    assert status == 0
    assert "exit status: 0 if the flow is allowed, 1 if it is denied, 2 on an error" in " ".join(out.split())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.sampled_from(FLOWS))
def test_trace_speaks_of_policies_rules_peers_and_ports_never_of_the_models_insides(
    objects: tuple[list[Obj], list[Obj], list[Obj], list[Obj]], flow: tuple[str, int | None]
) -> None:
    model = compile_policies(inputs_from_objects(*objects))
    protocol, port = flow
    for src in all_addresses(model):
        for dst in all_addresses(model):
            if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
                continue
            result = trace(model, src, dst, protocol, port)
            text = "\n".join(result.lines()) + json.dumps(result.to_json())
            assert "atom" not in text and "[0]" not in text, text
    assert kinds.WORKLOAD_ENDPOINT.plural == "workloadendpoints"
