"""NetworkPolicy conformance scenarios: policies, label changes, and hand-written reachability matrices.

The model is the one of the Kubernetes e2e network policy tests. Namespaces x, y, z (labelled
`ns: <name>`, plus the automatic `kubernetes.io/metadata.name`) each hold pods a, b, c (labelled
`pod: <name>`); every pod a is on node1, every b on node2, every c on node3. Each pod serves TCP and
UDP on ports 80 and 81, with container ports named serve-80-tcp, serve-80-udp, serve-81-tcp and
serve-81-udp. A scenario applies policies (and label changes) and states, after each change, which
of the 81 (source, destination) pairs must be reachable on one port and protocol.

Every expected matrix here was written by hand from the Kubernetes documentation
(https://kubernetes.io/docs/concepts/services-networking/network-policies/ and the NetworkPolicy
API reference); no code of ours computes one. A matrix reads like the e2e truth tables: rows are
sources (from), columns destinations (to), `.` reachable, `X` not:

          x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a    .   X   X   .   .   .   .   .   .
    ...

Every matrix is complete (9 rows, 9 columns, in the order above) so that a reviewer can check each
cell against the policy beside it.

The YAML quotes "y": YAML 1.1 parsers such as go-yaml v2 (kubectl's) read a bare y as true.

A pod always reaches itself: the diagonal is always `.`, and the parser rejects an `X` there. The
documentation lists the entities a pod talks to as "Other pods that are allowed (exception: a pod
cannot block access to itself)", and among what policies cannot do "the ability to prevent loopback
... (Pods cannot currently block localhost access ...)". Traffic from a pod to its own address
never leaves the pod's network namespace (it goes over lo), and the Kubernetes e2e suite likewise
marks self-probes allowed (`AllowLoopback`).

Placeholders in policy YAML, replaced for the family under test before the policy is applied:

    {ip:x/b}        x/b's address
    {cidr:x/b/32}   x/b's address as a single-host network (/32, or /128 for IPv6)
    {cidr:x/b/26}   the IPAM block of x/b's node (/26, or /122 for IPv6)
    {cidr:all}      0.0.0.0/0, or ::/0

A prefix length is written for IPv4; IPv6 uses the same number of host bits (+96). Only /32 and /26
are accepted, because only they give a matrix that can be written by hand: with /26 blocks per node,
a /26 holds exactly the three pods of one node (x/b, y/b, z/b) whatever addresses IPAM chose, while
a /24 could hold one, two or three nodes' blocks. The runner checks that layout before it runs a
scenario that depends on it, and fails with what it found if the lab breaks it.

The driver (the lab, or a fake in unit tests) implements `PolicyCluster`; `run_scenario` resets it,
waits for the all-reachable baseline, then plays the steps. Enforcement is eventually consistent, so
after each `Expect` it re-probes until the matrix matches or SETTLE_SECONDS pass, and then raises an
AssertionError showing expected and observed matrices with the differing cells marked.

    >>> for scenario in SCENARIOS:  # doctest: +SKIP
    ...     for family in scenario.families:
    ...         run_scenario(lab_cluster, scenario, family)
"""

from __future__ import annotations

import ipaddress
import re
import textwrap
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
PODS = tuple(f"{ns}/{pod}" for ns in NAMESPACES for pod in POD_NAMES)
NODE_OF_POD = {"a": "node1", "b": "node2", "c": "node3"}
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP")
PROBES = tuple((port, protocol) for protocol in PROTOCOLS for port in PORTS)
FAMILIES = (4, 6)
SETTLE_SECONDS = 10.0
RETRY_SECONDS = 0.5
# IPv4 pools are cut into /26 blocks per node, IPv6 pools into /122 blocks.
BLOCK_PREFIX = {4: 26, 6: 122}


class MatrixFormatError(ValueError):
    """A hand-written matrix is malformed; the message names the line and what to fix."""


# --- steps -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Apply:
    """Create or replace an object (a NetworkPolicy) from YAML that may hold placeholders."""

    yaml: str


@dataclass(frozen=True)
class Delete:
    kind: str
    name: str
    namespace: str | None = None


@dataclass(frozen=True)
class Label:
    """Set labels on a Pod or Namespace; a value of None removes that label."""

    kind: str
    name: str
    namespace: str | None
    labels: Mapping[str, str | None] = field(hash=False)

    def __post_init__(self) -> None:
        if self.kind not in ("Pod", "Namespace"):
            raise ValueError(f"Label kind must be Pod or Namespace, not {self.kind!r}")
        if (self.kind == "Pod") != (self.namespace is not None):
            raise ValueError(f"a Pod label change needs a namespace, a Namespace one none: {self}")


@dataclass(frozen=True)
class Expect:
    """The reachability matrix that must hold (eventually) on one port and protocol."""

    port: int
    protocol: str
    matrix: str

    def __post_init__(self) -> None:
        if self.port not in PORTS or self.protocol not in PROTOCOLS:
            raise ValueError(f"the pods serve {PORTS} over {PROTOCOLS}; cannot expect {self.protocol}/{self.port}")
        parse_matrix(self.matrix)

    def expected(self) -> dict[tuple[str, str], bool]:
        return parse_matrix(self.matrix)


Step = Apply | Delete | Label | Expect


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str  # what the scenario proves, in one line
    steps: tuple[Step, ...]
    families: tuple[int, ...] = FAMILIES

    def __post_init__(self) -> None:
        expects = sum(isinstance(step, Expect) for step in self.steps)
        if not 1 <= expects <= 4:
            raise ValueError(f"scenario {self.name!r} has {expects} Expect steps; give it 1 to 4")
        if not self.families or not set(self.families) <= set(FAMILIES):
            raise ValueError(f"scenario {self.name!r}: families must be a non-empty subset of {FAMILIES}")


# --- matrices ----------------------------------------------------------------------------------


def parse_matrix(text: str) -> dict[tuple[str, str], bool]:
    """The cells of a matrix, (source, destination) -> reachable.

    >>> parse_matrix(ALL_REACHABLE)[("x/a", "y/b")]
    True
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise MatrixFormatError("the matrix is empty")
    if lines[0].split() != list(PODS):
        raise MatrixFormatError(
            f"the header must name the destinations {' '.join(PODS)} in that order, not {lines[0].strip()!r}"
        )
    rows = lines[1:]
    if len(rows) != len(PODS):
        raise MatrixFormatError(f"the matrix needs one row per source pod ({len(PODS)}), it has {len(rows)}")
    cells: dict[tuple[str, str], bool] = {}
    for src, line in zip(PODS, rows, strict=True):
        words = line.split()
        if words[0] != src:
            raise MatrixFormatError(f"rows must go {' '.join(PODS)}: expected row {src}, found {line.strip()!r}")
        if len(words) != len(PODS) + 1:
            raise MatrixFormatError(f"row {src} has {len(words) - 1} cells, needs {len(PODS)}: {line.strip()!r}")
        for dst, cell in zip(PODS, words[1:], strict=True):
            if cell not in (".", "X"):
                raise MatrixFormatError(f"cell {src} -> {dst} is {cell!r}: write '.' (reachable) or 'X' (not)")
            if src == dst and cell != ".":
                raise MatrixFormatError(f"cell {src} -> {dst} is X, but a pod cannot block access to itself")
            cells[(src, dst)] = cell == "."
    return cells


def format_matrix(cells: Mapping[tuple[str, str], bool], marked: frozenset[tuple[str, str]] = frozenset()) -> str:
    """A matrix as text, marked cells shown in brackets: [.] or [X]."""
    lines = ["      " + " ".join(PODS)]
    for src in PODS:
        row = []
        for dst in PODS:
            symbol = "." if cells.get((src, dst)) else "X"
            row.append(f"[{symbol}]" if (src, dst) in marked else f" {symbol} ")
        lines.append((f"{src}   " + " ".join(row)).rstrip())
    return "\n".join(lines)


def describe_mismatch(expected: Mapping[tuple[str, str], bool], observed: Mapping[tuple[str, str], bool]) -> str:
    wrong = frozenset(pair for pair in expected if observed.get(pair) != expected[pair])
    word = {True: ". (reachable)", False: "X (blocked)"}
    details = [
        f"  {src} -> {dst}: expected {word[expected[(src, dst)]]}, observed {word[not expected[(src, dst)]]}"
        for src, dst in sorted(wrong, key=lambda pair: (PODS.index(pair[0]), PODS.index(pair[1])))
    ]
    return "\n".join(
        [
            f"{len(wrong)} cells differ (rows: from, columns: to; differing cells in brackets)",
            "expected:",
            format_matrix(expected, wrong),
            "observed:",
            format_matrix(observed, wrong),
            *details,
        ]
    )


# --- placeholders and the address layout they rely on ------------------------------------------

_PLACEHOLDER = re.compile(r"\{([a-z]+):([^\s{}]+)\}")  # no space after the colon: YAML's {pod: a} is not one
_CIDR_PREFIXES = (26, 32)


def substitute(text: str, addresses: Mapping[str, str], family: int) -> str:
    """text with each placeholder replaced for the family; addresses maps "x/a" to its IP.

    >>> substitute("cidr: {cidr:x/b/26}", {"x/b": "10.244.0.66"}, 4)
    'cidr: 10.244.0.64/26'
    >>> substitute("cidr: {cidr:x/b/32}", {"x/b": "fd00:244::42"}, 6)
    'cidr: fd00:244::42/128'
    """

    def address(pod: str, placeholder: str) -> str:
        if pod not in PODS:
            raise ValueError(f"{placeholder}: {pod!r} is not one of the pods {', '.join(PODS)}")
        return addresses[pod]

    def replace(match: re.Match[str]) -> str:
        kind, argument = match.groups()
        placeholder = match.group(0)
        if kind == "ip":
            return address(argument, placeholder)
        if kind == "cidr" and argument == "all":
            return "0.0.0.0/0" if family == 4 else "::/0"
        if kind == "cidr":
            pod, _, length = argument.rpartition("/")
            if not length.isdigit() or int(length) not in _CIDR_PREFIXES:
                raise ValueError(
                    f"{placeholder}: use a prefix of {' or '.join(map(str, _CIDR_PREFIXES))} (the pod, or "
                    "its node's IPAM block); other prefixes would make the expected matrix depend on IPAM"
                )
            prefix = int(length) + (96 if family == 6 else 0)
            return str(ipaddress.ip_network(f"{address(pod, placeholder)}/{prefix}", strict=False))
        raise ValueError(
            f"unknown placeholder {placeholder}: use {{ip:x/a}}, {{cidr:x/a/26}}, {{cidr:x/a/32}} or {{cidr:all}}"
        )

    return _PLACEHOLDER.sub(replace, text)


def uses_node_blocks(text: str) -> bool:
    """Whether text names a pod's network (its expected matrix then relies on the per-node blocks)."""
    return any(kind == "cidr" and arg != "all" for kind, arg in _PLACEHOLDER.findall(text))


def check_node_blocks(addresses: Mapping[str, str], family: int) -> None:
    """Fail unless each node's three pods share one IPAM block and no two nodes share one."""
    prefix = BLOCK_PREFIX[family]
    problems = []
    blocks = {}
    for pod in POD_NAMES:
        members = [f"{ns}/{pod}" for ns in NAMESPACES]
        networks = {ipaddress.ip_network(f"{addresses[m]}/{prefix}", strict=False) for m in members}
        if len(networks) != 1:
            problems.append(f"{', '.join(members)} (all on {NODE_OF_POD[pod]}) are not in one /{prefix} block")
        blocks[pod] = networks
    if len(set().union(*blocks.values())) < sum(len(networks) for networks in blocks.values()):
        problems.append(f"two nodes' pods share a /{prefix} block")
    if problems:
        found = ", ".join(f"{pod}={addresses[pod]}" for pod in PODS)
        raise AssertionError(
            f"the ipBlock scenarios assume one /{prefix} IPAM block per node, but {'; '.join(problems)} "
            f"(IPv{family} addresses: {found}). Give each lab node its own block from the pool."
        )


# --- the runner --------------------------------------------------------------------------------


class PolicyCluster(Protocol):
    """What the runner needs from a cluster with the x/y/z model deployed."""

    def reset(self) -> None:
        """Delete every NetworkPolicy; give pods exactly {pod: <a|b|c>} and namespaces exactly
        {ns: <x|y|z>, kubernetes.io/metadata.name: <x|y|z>} as labels."""

    def apply(self, yaml_text: str) -> None:
        """Create the object, or replace the existing one of that kind, namespace and name."""

    def delete(self, kind: str, name: str, namespace: str | None) -> None: ...

    def label(self, kind: str, name: str, namespace: str | None, labels: dict[str, str | None]) -> None:
        """Set each label; a None value removes the label."""

    def address(self, pod: str, family: int) -> str:
        """The pod's ("x/a") address of the family (4 or 6)."""

    def reachability(self, port: int, protocol: str, family: int) -> dict[tuple[str, str], bool]:
        """(source, destination) -> whether the source reaches the destination's address, all 81 pairs."""


def run_scenario(
    cluster: PolicyCluster,
    scenario: Scenario,
    family: int,
    *,
    settle_seconds: float = SETTLE_SECONDS,
    retry_seconds: float = RETRY_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    parallel: bool = False,
) -> None:
    """Play the scenario on the cluster in one family; raise AssertionError on the first wrong matrix.

    With parallel=True, consecutive Expect steps (nothing changes between them) are probed at
    the same time: a matrix with blocked cells costs one probe timeout, so this divides the
    time of a scenario with several expectations by their number."""
    if family not in scenario.families:
        only = " and ".join(f"IPv{f}" for f in scenario.families)
        raise ValueError(f"scenario {scenario.name!r} is for {only} only, not IPv{family}")
    wait = _Settle(cluster, family, settle_seconds, retry_seconds, clock, sleep)
    cluster.reset()
    _check_all(
        wait,
        [(port, protocol, ALL_REACHABLE, f"{scenario.name} (IPv{family}), after reset") for port, protocol in PROBES],
        parallel,
    )
    addresses: dict[str, str] | None = None
    pending: list[tuple[int, str, str, str]] = []
    for number, step in enumerate(scenario.steps, 1):
        if not isinstance(step, Expect) and pending:
            _check_all(wait, pending, parallel)
            pending = []
        if isinstance(step, Apply):
            if addresses is None and _PLACEHOLDER.search(step.yaml):
                addresses = {pod: cluster.address(pod, family) for pod in PODS}
                if any(isinstance(s, Apply) and uses_node_blocks(s.yaml) for s in scenario.steps):
                    check_node_blocks(addresses, family)
            cluster.apply(substitute(step.yaml, addresses or {}, family))
        elif isinstance(step, Delete):
            cluster.delete(step.kind, step.name, step.namespace)
        elif isinstance(step, Label):
            cluster.label(step.kind, step.name, step.namespace, dict(step.labels))
        else:
            context = f"{scenario.name} (IPv{family}), step {number}: {step.protocol}/{step.port}"
            pending.append((step.port, step.protocol, step.matrix, context))
    _check_all(wait, pending, parallel)


def _check_all(wait: _Settle, checks: list[tuple[int, str, str, str]], parallel: bool) -> None:
    """wait.until for each check, in order or all at once; the first failure (in order) is raised."""
    if not parallel or len(checks) < 2:
        for check in checks:
            wait.until(*check)
        return
    with ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="expect") as pool:
        futures = [pool.submit(wait.until, *check) for check in checks]
        for future in futures:
            future.result()


@dataclass(frozen=True)
class _Settle:
    """Re-probe until the cluster shows the expected matrix, or fail once settle_seconds are up."""

    cluster: PolicyCluster
    family: int
    settle_seconds: float
    retry_seconds: float
    clock: Callable[[], float]
    sleep: Callable[[float], None]

    def until(self, port: int, protocol: str, matrix: str, context: str) -> None:
        expected = parse_matrix(matrix)
        deadline = self.clock() + self.settle_seconds
        while True:
            observed = self.cluster.reachability(port, protocol, self.family)
            if set(observed) != set(expected):
                missing = sorted(set(expected) - set(observed))
                extra = sorted(set(observed) - set(expected))
                raise AssertionError(
                    f"{context}: the driver returned a wrong set of cells (missing {missing}, extra {extra})"
                )
            if observed == expected:
                return
            if self.clock() >= deadline:
                raise AssertionError(
                    f"{context}: still wrong after {self.settle_seconds:g} s\n{describe_mismatch(expected, observed)}"
                )
            self.sleep(self.retry_seconds)


# --- scenario building blocks ------------------------------------------------------------------


def policy(namespace: str, name: str, spec: str) -> Apply:
    """Apply a NetworkPolicy; spec is the YAML under `spec:`, written at any indentation."""
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return Apply(
        "apiVersion: networking.k8s.io/v1\n"
        "kind: NetworkPolicy\n"
        f'metadata:\n  name: {name}\n  namespace: "{namespace}"\n'
        f"spec:\n{body}\n"
    )


def delete_policy(namespace: str, name: str) -> Delete:
    return Delete("NetworkPolicy", name, namespace)


def label_pod(pod: str, labels: dict[str, str | None]) -> Label:
    namespace, name = pod.split("/")
    return Label("Pod", name, namespace, labels)


def label_namespace(namespace: str, labels: dict[str, str | None]) -> Label:
    return Label("Namespace", namespace, None, labels)


def expect_all(probes: tuple[tuple[int, str], ...], matrix: str) -> tuple[Expect, ...]:
    """The same matrix on several (port, protocol) probes."""
    return tuple(Expect(port, protocol, matrix) for port, protocol in probes)


TCP80, TCP81, UDP80, UDP81 = (80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")

# --- matrices used by several scenarios (rows: from, columns: to) ------------------------------

ALL_REACHABLE = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   .   .   .   .   .   .   .   .
x/b    .   .   .   .   .   .   .   .   .
x/c    .   .   .   .   .   .   .   .   .
y/a    .   .   .   .   .   .   .   .   .
y/b    .   .   .   .   .   .   .   .   .
y/c    .   .   .   .   .   .   .   .   .
z/a    .   .   .   .   .   .   .   .   .
z/b    .   .   .   .   .   .   .   .   .
z/c    .   .   .   .   .   .   .   .   .
"""

ONLY_SELF = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   X   X   X   X   X   X   X   X
x/b    X   .   X   X   X   X   X   X   X
x/c    X   X   .   X   X   X   X   X   X
y/a    X   X   X   .   X   X   X   X   X
y/b    X   X   X   X   .   X   X   X   X
y/c    X   X   X   X   X   .   X   X   X
z/a    X   X   X   X   X   X   .   X   X
z/b    X   X   X   X   X   X   X   .   X
z/c    X   X   X   X   X   X   X   X   .
"""

# Every pod of x is isolated for ingress and nothing is allowed in.
X_INGRESS_DENIED = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   X   X   .   .   .   .   .   .
x/b    X   .   X   .   .   .   .   .   .
x/c    X   X   .   .   .   .   .   .   .
y/a    X   X   X   .   .   .   .   .   .
y/b    X   X   X   .   .   .   .   .   .
y/c    X   X   X   .   .   .   .   .   .
z/a    X   X   X   .   .   .   .   .   .
z/b    X   X   X   .   .   .   .   .   .
z/c    X   X   X   .   .   .   .   .   .
"""

# Every pod of x is isolated for egress and nothing is allowed out. Connections into x still work:
# "Reply traffic for those allowed connections will also be implicitly allowed."
X_EGRESS_DENIED = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   X   X   X   X   X   X   X   X
x/b    X   .   X   X   X   X   X   X   X
x/c    X   X   .   X   X   X   X   X   X
y/a    .   .   .   .   .   .   .   .   .
y/b    .   .   .   .   .   .   .   .   .
y/c    .   .   .   .   .   .   .   .   .
z/a    .   .   .   .   .   .   .   .   .
z/b    .   .   .   .   .   .   .   .   .
z/c    .   .   .   .   .   .   .   .   .
"""

X_ALL_DENIED = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   X   X   X   X   X   X   X   X
x/b    X   .   X   X   X   X   X   X   X
x/c    X   X   .   X   X   X   X   X   X
y/a    X   X   X   .   .   .   .   .   .
y/b    X   X   X   .   .   .   .   .   .
y/c    X   X   X   .   .   .   .   .   .
z/a    X   X   X   .   .   .   .   .   .
z/b    X   X   X   .   .   .   .   .   .
z/c    X   X   X   .   .   .   .   .   .
"""

# x/a is isolated for ingress and nothing is allowed in on this port and protocol.
XA_INGRESS_DENIED = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   .   .   .   .   .   .   .   .
x/b    X   .   .   .   .   .   .   .   .
x/c    X   .   .   .   .   .   .   .   .
y/a    X   .   .   .   .   .   .   .   .
y/b    X   .   .   .   .   .   .   .   .
y/c    X   .   .   .   .   .   .   .   .
z/a    X   .   .   .   .   .   .   .   .
z/b    X   .   .   .   .   .   .   .   .
z/c    X   .   .   .   .   .   .   .   .
"""

# x/a is isolated for egress and nothing is allowed out on this port and protocol.
XA_EGRESS_DENIED = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   X   X   X   X   X   X   X   X
x/b    .   .   .   .   .   .   .   .   .
x/c    .   .   .   .   .   .   .   .   .
y/a    .   .   .   .   .   .   .   .   .
y/b    .   .   .   .   .   .   .   .   .
y/c    .   .   .   .   .   .   .   .   .
z/a    .   .   .   .   .   .   .   .   .
z/b    .   .   .   .   .   .   .   .   .
z/c    .   .   .   .   .   .   .   .   .
"""

XA_FROM_XB = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   .   .   .   .   .   .   .   .
x/b    .   .   .   .   .   .   .   .   .
x/c    X   .   .   .   .   .   .   .   .
y/a    X   .   .   .   .   .   .   .   .
y/b    X   .   .   .   .   .   .   .   .
y/c    X   .   .   .   .   .   .   .   .
z/a    X   .   .   .   .   .   .   .   .
z/b    X   .   .   .   .   .   .   .   .
z/c    X   .   .   .   .   .   .   .   .
"""

XA_FROM_XC = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   .   .   .   .   .   .   .   .
x/b    X   .   .   .   .   .   .   .   .
x/c    .   .   .   .   .   .   .   .   .
y/a    X   .   .   .   .   .   .   .   .
y/b    X   .   .   .   .   .   .   .   .
y/c    X   .   .   .   .   .   .   .   .
z/a    X   .   .   .   .   .   .   .   .
z/b    X   .   .   .   .   .   .   .   .
z/c    X   .   .   .   .   .   .   .   .
"""

# x/a admits x/b and every pod of y.
XA_FROM_XB_OR_Y = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   .   .   .   .   .   .   .   .
x/b    .   .   .   .   .   .   .   .   .
x/c    X   .   .   .   .   .   .   .   .
y/a    .   .   .   .   .   .   .   .   .
y/b    .   .   .   .   .   .   .   .   .
y/c    .   .   .   .   .   .   .   .   .
z/a    X   .   .   .   .   .   .   .   .
z/b    X   .   .   .   .   .   .   .   .
z/c    X   .   .   .   .   .   .   .   .
"""

# x/a admits the b pods of every namespace (the pods on node2).
XA_FROM_EVERY_B = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   .   .   .   .   .   .   .   .
x/b    .   .   .   .   .   .   .   .   .
x/c    X   .   .   .   .   .   .   .   .
y/a    X   .   .   .   .   .   .   .   .
y/b    .   .   .   .   .   .   .   .   .
y/c    X   .   .   .   .   .   .   .   .
z/a    X   .   .   .   .   .   .   .   .
z/b    .   .   .   .   .   .   .   .   .
z/c    X   .   .   .   .   .   .   .   .
"""

# The pods of x admit each other and nobody else.
X_FROM_X = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   .   .   .   .   .   .   .   .
x/b    .   .   .   .   .   .   .   .   .
x/c    .   .   .   .   .   .   .   .   .
y/a    X   X   X   .   .   .   .   .   .
y/b    X   X   X   .   .   .   .   .   .
y/c    X   X   X   .   .   .   .   .   .
z/a    X   X   X   .   .   .   .   .   .
z/b    X   X   X   .   .   .   .   .   .
z/c    X   X   X   .   .   .   .   .   .
"""

# The pods of x admit every pod of y, and nobody else (not even each other).
X_FROM_Y = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   X   X   .   .   .   .   .   .
x/b    X   .   X   .   .   .   .   .   .
x/c    X   X   .   .   .   .   .   .   .
y/a    .   .   .   .   .   .   .   .   .
y/b    .   .   .   .   .   .   .   .   .
y/c    .   .   .   .   .   .   .   .   .
z/a    X   X   X   .   .   .   .   .   .
z/b    X   X   X   .   .   .   .   .   .
z/c    X   X   X   .   .   .   .   .   .
"""

# The pods of x admit every pod of z, and nobody else.
X_FROM_Z = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   X   X   .   .   .   .   .   .
x/b    X   .   X   .   .   .   .   .   .
x/c    X   X   .   .   .   .   .   .   .
y/a    X   X   X   .   .   .   .   .   .
y/b    X   X   X   .   .   .   .   .   .
y/c    X   X   X   .   .   .   .   .   .
z/a    .   .   .   .   .   .   .   .   .
z/b    .   .   .   .   .   .   .   .   .
z/c    .   .   .   .   .   .   .   .   .
"""

# The pods of x admit every pod of x and of z, not y.
X_FROM_X_AND_Z = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   .   .   .   .   .   .   .   .
x/b    .   .   .   .   .   .   .   .   .
x/c    .   .   .   .   .   .   .   .   .
y/a    X   X   X   .   .   .   .   .   .
y/b    X   X   X   .   .   .   .   .   .
y/c    X   X   X   .   .   .   .   .   .
z/a    .   .   .   .   .   .   .   .   .
z/b    .   .   .   .   .   .   .   .   .
z/c    .   .   .   .   .   .   .   .   .
"""

# The pods of x admit x/b and x/c only.
X_FROM_XB_XC = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   X   X   .   .   .   .   .   .
x/b    .   .   .   .   .   .   .   .   .
x/c    .   .   .   .   .   .   .   .   .
y/a    X   X   X   .   .   .   .   .   .
y/b    X   X   X   .   .   .   .   .   .
y/c    X   X   X   .   .   .   .   .   .
z/a    X   X   X   .   .   .   .   .   .
z/b    X   X   X   .   .   .   .   .   .
z/c    X   X   X   .   .   .   .   .   .
"""

# The pods of x admit x/c only.
X_FROM_XC = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   X   X   .   .   .   .   .   .
x/b    X   .   X   .   .   .   .   .   .
x/c    .   .   .   .   .   .   .   .   .
y/a    X   X   X   .   .   .   .   .   .
y/b    X   X   X   .   .   .   .   .   .
y/c    X   X   X   .   .   .   .   .   .
z/a    X   X   X   .   .   .   .   .   .
z/b    X   X   X   .   .   .   .   .   .
z/c    X   X   X   .   .   .   .   .   .
"""

# The pods of x may connect to every pod of y, and nowhere else.
X_TO_Y = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   X   X   .   .   .   X   X   X
x/b    X   .   X   .   .   .   X   X   X
x/c    X   X   .   .   .   .   X   X   X
y/a    .   .   .   .   .   .   .   .   .
y/b    .   .   .   .   .   .   .   .   .
y/c    .   .   .   .   .   .   .   .   .
z/a    .   .   .   .   .   .   .   .   .
z/b    .   .   .   .   .   .   .   .   .
z/c    .   .   .   .   .   .   .   .   .
"""

XA_TO_Y = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   X   X   .   .   .   X   X   X
x/b    .   .   .   .   .   .   .   .   .
x/c    .   .   .   .   .   .   .   .   .
y/a    .   .   .   .   .   .   .   .   .
y/b    .   .   .   .   .   .   .   .   .
y/c    .   .   .   .   .   .   .   .   .
z/a    .   .   .   .   .   .   .   .   .
z/b    .   .   .   .   .   .   .   .   .
z/c    .   .   .   .   .   .   .   .   .
"""

XA_TO_Z = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   X   X   X   X   X   .   .   .
x/b    .   .   .   .   .   .   .   .   .
x/c    .   .   .   .   .   .   .   .   .
y/a    .   .   .   .   .   .   .   .   .
y/b    .   .   .   .   .   .   .   .   .
y/c    .   .   .   .   .   .   .   .   .
z/a    .   .   .   .   .   .   .   .   .
z/b    .   .   .   .   .   .   .   .   .
z/c    .   .   .   .   .   .   .   .   .
"""

XA_TO_XB = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   .   X   X   X   X   X   X   X
x/b    .   .   .   .   .   .   .   .   .
x/c    .   .   .   .   .   .   .   .   .
y/a    .   .   .   .   .   .   .   .   .
y/b    .   .   .   .   .   .   .   .   .
y/c    .   .   .   .   .   .   .   .   .
z/a    .   .   .   .   .   .   .   .   .
z/b    .   .   .   .   .   .   .   .   .
z/c    .   .   .   .   .   .   .   .   .
"""

# x/a may connect to the b pods of every namespace (the pods on node2).
XA_TO_EVERY_B = """
      x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a    .   .   X   X   .   X   X   .   X
x/b    .   .   .   .   .   .   .   .   .
x/c    .   .   .   .   .   .   .   .   .
y/a    .   .   .   .   .   .   .   .   .
y/b    .   .   .   .   .   .   .   .   .
y/c    .   .   .   .   .   .   .   .   .
z/a    .   .   .   .   .   .   .   .   .
z/b    .   .   .   .   .   .   .   .   .
z/c    .   .   .   .   .   .   .   .   .
"""


# --- the scenarios -----------------------------------------------------------------------------

# fmt: off
# The scenarios are a hand-laid table: policies and matrices read best as written.
DENY_INGRESS_X = policy("x", "deny-ingress", """
    podSelector: {}
    policyTypes: [Ingress]
""")

DENY_EGRESS_X = policy("x", "deny-egress", """
    podSelector: {}
    policyTypes: [Egress]
""")

SCENARIOS: tuple[Scenario, ...] = (
    # --- isolation and the default policies ----------------------------------------------------
    Scenario(
        "no-policy",
        "without any NetworkPolicy every pod reaches every pod, on both ports and protocols",
        expect_all((TCP80, TCP81, UDP80, UDP81), ALL_REACHABLE),
    ),
    Scenario(
        "deny-ingress-namespace-x",
        "an empty podSelector selects every pod of the namespace; no ingress rules admit nobody",
        (DENY_INGRESS_X, *expect_all((TCP80, UDP81), X_INGRESS_DENIED)),
    ),
    Scenario(
        "deny-ingress-by-default-policy-type",
        "a policy without policyTypes and without rules is an Ingress policy (Ingress is always set)",
        (
            policy("x", "isolate", """
                podSelector: {}
            """),
            *expect_all((TCP81, UDP80), X_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "deny-egress-namespace-x",
        "an Egress policy without rules stops all connections out of x, but not replies to connections in",
        (DENY_EGRESS_X, *expect_all((TCP80, UDP80), X_EGRESS_DENIED)),
    ),
    Scenario(
        "deny-all-namespace-x",
        "a policy with both policyTypes and no rules isolates x both ways",
        (
            policy("x", "deny-all", """
                podSelector: {}
                policyTypes: [Ingress, Egress]
            """),
            *expect_all((TCP80, UDP81), X_ALL_DENIED),
        ),
    ),
    Scenario(
        "deny-ingress-every-namespace",
        "default-deny ingress in all three namespaces leaves each pod reaching only itself",
        (
            DENY_INGRESS_X,
            policy("y", "deny-ingress", "podSelector: {}\npolicyTypes: [Ingress]"),
            policy("z", "deny-ingress", "podSelector: {}\npolicyTypes: [Ingress]"),
            *expect_all((TCP80, UDP80), ONLY_SELF),
        ),
    ),
    Scenario(
        "allow-all-ingress-beside-deny",
        "policies are additive: `ingress: [{}]` beside a default deny admits everyone again",
        (
            DENY_INGRESS_X,
            Expect(80, "TCP", X_INGRESS_DENIED),
            policy("x", "allow-all-ingress", """
                podSelector: {}
                ingress: [{}]
            """),
            *expect_all((TCP80, UDP81), ALL_REACHABLE),
        ),
    ),
    Scenario(
        "allow-all-egress-beside-deny",
        "`egress: [{}]` beside a default egress deny lets x connect anywhere again",
        (
            DENY_EGRESS_X,
            Expect(80, "TCP", X_EGRESS_DENIED),
            policy("x", "allow-all-egress", """
                podSelector: {}
                policyTypes: [Egress]
                egress: [{}]
            """),
            *expect_all((TCP80, UDP80), ALL_REACHABLE),
        ),
    ),
    # --- peers: podSelector, namespaceSelector, both ---------------------------------------------
    Scenario(
        "ingress-from-pod-in-own-namespace",
        "a peer podSelector alone selects pods of the policy's namespace only (x/b, not y/b or z/b)",
        (
            policy("x", "a-from-b", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - podSelector: {matchLabels: {pod: b}}
            """),
            *expect_all((TCP80, UDP81), XA_FROM_XB),
        ),
    ),
    Scenario(
        "ingress-from-all-pods-in-own-namespace",
        "a peer with an empty podSelector admits every pod of the policy's namespace and no other",
        (
            policy("x", "from-own-namespace", """
                podSelector: {}
                ingress:
                - from:
                  - podSelector: {}
            """),
            Expect(80, "TCP", X_FROM_X),
        ),
    ),
    Scenario(
        "ingress-from-namespace",
        "a namespaceSelector alone admits every pod of the selected namespaces (not the policy's own)",
        (
            policy("x", "from-y", """
                podSelector: {}
                ingress:
                - from:
                  - namespaceSelector: {matchLabels: {ns: "y"}}
            """),
            *expect_all((TCP80, UDP80), X_FROM_Y),
        ),
    ),
    Scenario(
        "ingress-from-namespace-by-metadata-name",
        "the automatic kubernetes.io/metadata.name label selects a namespace by its name",
        (
            policy("x", "from-z-by-name", """
                podSelector: {}
                ingress:
                - from:
                  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}
            """),
            Expect(80, "TCP", X_FROM_Z),
        ),
    ),
    Scenario(
        "ingress-namespace-and-pod-in-one-peer",
        "namespaceSelector and podSelector in one peer are ANDed: only y/b reaches x/a",
        (
            policy("x", "a-from-y-b", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - namespaceSelector: {matchLabels: {ns: "y"}}
                    podSelector: {matchLabels: {pod: b}}
            """),
            Expect(80, "TCP", """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   .   .   .   .   .   .   .   .
            x/b    X   .   .   .   .   .   .   .   .
            x/c    X   .   .   .   .   .   .   .   .
            y/a    X   .   .   .   .   .   .   .   .
            y/b    .   .   .   .   .   .   .   .   .
            y/c    X   .   .   .   .   .   .   .   .
            z/a    X   .   .   .   .   .   .   .   .
            z/b    X   .   .   .   .   .   .   .   .
            z/c    X   .   .   .   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "ingress-namespace-or-pod-as-two-peers",
        "the same selectors as two peers are ORed: every pod of y, and x/b of the policy's namespace",
        (
            policy("x", "a-from-y-or-b", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - namespaceSelector: {matchLabels: {ns: "y"}}
                  - podSelector: {matchLabels: {pod: b}}
            """),
            Expect(80, "TCP", XA_FROM_XB_OR_Y),
        ),
    ),
    Scenario(
        "ingress-from-pod-in-any-namespace",
        "an empty namespaceSelector with a podSelector selects that pod in every namespace",
        (
            policy("x", "a-from-every-b", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - namespaceSelector: {}
                    podSelector: {matchLabels: {pod: b}}
            """),
            Expect(80, "TCP", XA_FROM_EVERY_B),
        ),
    ),
    Scenario(
        "ingress-from-every-namespace-on-one-port",
        "an empty namespaceSelector admits every pod, but only on the rule's port",
        (
            policy("x", "a-from-everywhere-80", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - namespaceSelector: {}
                  ports:
                  - {port: 80, protocol: TCP}
            """),
            Expect(80, "TCP", ALL_REACHABLE),
            Expect(81, "TCP", XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "ingress-combined-match-expressions",
        "matchExpressions in both selectors of one peer: pods not b, in namespaces x or y, reach z",
        (
            policy("z", "from-xy-not-b", """
                podSelector: {}
                ingress:
                - from:
                  - namespaceSelector:
                      matchExpressions:
                      - {key: ns, operator: In, values: [x, "y"]}
                    podSelector:
                      matchExpressions:
                      - {key: pod, operator: NotIn, values: [b]}
            """),
            *expect_all((TCP80, UDP81), """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   .   .   .   .   .   .   .   .
            x/b    .   .   .   .   .   .   X   X   X
            x/c    .   .   .   .   .   .   .   .   .
            y/a    .   .   .   .   .   .   .   .   .
            y/b    .   .   .   .   .   .   X   X   X
            y/c    .   .   .   .   .   .   .   .   .
            z/a    .   .   .   .   .   .   .   X   X
            z/b    .   .   .   .   .   .   X   .   X
            z/c    .   .   .   .   .   .   X   X   .
            """),
        ),
    ),
    # --- matchExpressions ------------------------------------------------------------------------
    Scenario(
        "peer-pod-selector-in",
        "podSelector operator In admits the pods whose label has one of the values",
        (
            policy("x", "from-a-or-b", """
                podSelector: {}
                ingress:
                - from:
                  - podSelector:
                      matchExpressions:
                      - {key: pod, operator: In, values: [a, b]}
            """),
            Expect(80, "TCP", """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   .   .   .   .   .   .   .   .
            x/b    .   .   .   .   .   .   .   .   .
            x/c    X   X   .   .   .   .   .   .   .
            y/a    X   X   X   .   .   .   .   .   .
            y/b    X   X   X   .   .   .   .   .   .
            y/c    X   X   X   .   .   .   .   .   .
            z/a    X   X   X   .   .   .   .   .   .
            z/b    X   X   X   .   .   .   .   .   .
            z/c    X   X   X   .   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "peer-pod-selector-not-in",
        "podSelector operator NotIn admits the pods whose label has none of the values",
        (
            policy("x", "from-not-a", """
                podSelector: {}
                ingress:
                - from:
                  - podSelector:
                      matchExpressions:
                      - {key: pod, operator: NotIn, values: [a]}
            """),
            Expect(80, "TCP", X_FROM_XB_XC),
        ),
    ),
    Scenario(
        "peer-not-in-matches-pods-without-the-key",
        "NotIn also selects pods that lack the key: x/a and x/c (no tier label) get in, x/b (tier=web) not",
        (
            label_pod("x/b", {"tier": "web"}),
            policy("x", "from-not-web", """
                podSelector: {}
                ingress:
                - from:
                  - podSelector:
                      matchExpressions:
                      - {key: tier, operator: NotIn, values: [web]}
            """),
            Expect(80, "TCP", """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   .   .   .   .   .   .   .   .
            x/b    X   .   X   .   .   .   .   .   .
            x/c    .   .   .   .   .   .   .   .   .
            y/a    X   X   X   .   .   .   .   .   .
            y/b    X   X   X   .   .   .   .   .   .
            y/c    X   X   X   .   .   .   .   .   .
            z/a    X   X   X   .   .   .   .   .   .
            z/b    X   X   X   .   .   .   .   .   .
            z/c    X   X   X   .   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "peer-pod-selector-exists-then-label-removed",
        "Exists admits the one labelled pod; removing its label takes the access away",
        (
            label_pod("x/c", {"tier": "db"}),
            policy("x", "from-tiered", """
                podSelector: {}
                ingress:
                - from:
                  - podSelector:
                      matchExpressions:
                      - {key: tier, operator: Exists}
            """),
            Expect(80, "TCP", X_FROM_XC),
            label_pod("x/c", {"tier": None}),
            Expect(80, "TCP", X_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "peer-pod-selector-does-not-exist",
        "DoesNotExist admits the pods without the key: x/b and x/c, not the labelled x/a",
        (
            label_pod("x/a", {"tier": "web"}),
            policy("x", "from-untiered", """
                podSelector: {}
                ingress:
                - from:
                  - podSelector:
                      matchExpressions:
                      - {key: tier, operator: DoesNotExist}
            """),
            Expect(80, "TCP", X_FROM_XB_XC),
        ),
    ),
    Scenario(
        "peer-namespace-selector-in",
        "namespaceSelector operator In with two values admits x and z, not y",
        (
            policy("x", "from-x-or-z", """
                podSelector: {}
                ingress:
                - from:
                  - namespaceSelector:
                      matchExpressions:
                      - {key: ns, operator: In, values: [x, z]}
            """),
            Expect(80, "TCP", X_FROM_X_AND_Z),
        ),
    ),
    Scenario(
        "peer-namespace-selector-not-in",
        "namespaceSelector operator NotIn [x, y] admits only z, not even the policy's own namespace",
        (
            policy("x", "from-not-x-or-y", """
                podSelector: {}
                ingress:
                - from:
                  - namespaceSelector:
                      matchExpressions:
                      - {key: ns, operator: NotIn, values: [x, "y"]}
            """),
            Expect(80, "TCP", X_FROM_Z),
        ),
    ),
    Scenario(
        "peer-namespace-selector-exists-then-label-removed",
        "namespaceSelector Exists follows a namespace label as it is added and removed",
        (
            label_namespace("z", {"team": "blue"}),
            policy("x", "from-teams", """
                podSelector: {}
                ingress:
                - from:
                  - namespaceSelector:
                      matchExpressions:
                      - {key: team, operator: Exists}
            """),
            Expect(80, "TCP", X_FROM_Z),
            label_namespace("z", {"team": None}),
            Expect(80, "TCP", X_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "peer-namespace-selector-does-not-exist",
        "namespaceSelector DoesNotExist admits the namespaces without the key: x and z, not y",
        (
            label_namespace("y", {"team": "blue"}),
            policy("x", "from-teamless", """
                podSelector: {}
                ingress:
                - from:
                  - namespaceSelector:
                      matchExpressions:
                      - {key: team, operator: DoesNotExist}
            """),
            Expect(80, "TCP", X_FROM_X_AND_Z),
        ),
    ),
    Scenario(
        "policy-pod-selector-in",
        "matchExpressions In in the policy's own podSelector isolates x/a and x/c and leaves x/b open",
        (
            policy("x", "isolate-a-and-c", """
                podSelector:
                  matchExpressions:
                  - {key: pod, operator: In, values: [a, c]}
                policyTypes: [Ingress]
            """),
            Expect(80, "TCP", """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   .   X   .   .   .   .   .   .
            x/b    X   .   X   .   .   .   .   .   .
            x/c    X   .   .   .   .   .   .   .   .
            y/a    X   .   X   .   .   .   .   .   .
            y/b    X   .   X   .   .   .   .   .   .
            y/c    X   .   X   .   .   .   .   .   .
            z/a    X   .   X   .   .   .   .   .   .
            z/b    X   .   X   .   .   .   .   .   .
            z/c    X   .   X   .   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "policy-pod-selector-not-in-egress",
        "matchExpressions NotIn in the policy's podSelector: y/a and y/c lose egress, y/b keeps it",
        (
            policy("y", "isolate-not-b", """
                podSelector:
                  matchExpressions:
                  - {key: pod, operator: NotIn, values: [b]}
                policyTypes: [Egress]
            """),
            *expect_all((TCP80, UDP80), """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   .   .   .   .   .   .   .   .
            x/b    .   .   .   .   .   .   .   .   .
            x/c    .   .   .   .   .   .   .   .   .
            y/a    X   X   X   .   X   X   X   X   X
            y/b    .   .   .   .   .   .   .   .   .
            y/c    X   X   X   X   X   .   X   X   X
            z/a    .   .   .   .   .   .   .   .   .
            z/b    .   .   .   .   .   .   .   .   .
            z/c    .   .   .   .   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "policy-pod-selector-does-not-exist",
        "DoesNotExist in the policy's podSelector isolates the pods without the key: x/a, x/b, not x/c",
        (
            label_pod("x/c", {"exempt": "yes"}),
            policy("x", "isolate-unexempt", """
                podSelector:
                  matchExpressions:
                  - {key: exempt, operator: DoesNotExist}
                policyTypes: [Ingress]
            """),
            *expect_all((TCP80, UDP81), """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   X   .   .   .   .   .   .   .
            x/b    X   .   .   .   .   .   .   .   .
            x/c    X   X   .   .   .   .   .   .   .
            y/a    X   X   .   .   .   .   .   .   .
            y/b    X   X   .   .   .   .   .   .   .
            y/c    X   X   .   .   .   .   .   .   .
            z/a    X   X   .   .   .   .   .   .   .
            z/b    X   X   .   .   .   .   .   .   .
            z/c    X   X   .   .   .   .   .   .   .
            """),
        ),
    ),
    # --- changes: labels, updates, deletion ------------------------------------------------------
    Scenario(
        "policy-selects-pod-once-labelled",
        "a policy selecting by a label nobody has changes nothing until x/b gets it, and again once removed",
        (
            policy("x", "quarantine", """
                podSelector:
                  matchExpressions:
                  - {key: quarantine, operator: Exists}
                policyTypes: [Ingress, Egress]
            """),
            Expect(80, "TCP", ALL_REACHABLE),
            label_pod("x/b", {"quarantine": "true"}),
            Expect(80, "TCP", """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   X   .   .   .   .   .   .   .
            x/b    X   .   X   X   X   X   X   X   X
            x/c    .   X   .   .   .   .   .   .   .
            y/a    .   X   .   .   .   .   .   .   .
            y/b    .   X   .   .   .   .   .   .   .
            y/c    .   X   .   .   .   .   .   .   .
            z/a    .   X   .   .   .   .   .   .   .
            z/b    .   X   .   .   .   .   .   .   .
            z/c    .   X   .   .   .   .   .   .   .
            """),
            label_pod("x/b", {"quarantine": None}),
            Expect(80, "TCP", ALL_REACHABLE),
        ),
    ),
    Scenario(
        "peer-selects-pod-once-labelled",
        "relabelling x/c into a peer's podSelector admits it; relabelling it out shuts it out again",
        (
            policy("x", "a-from-clients", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - podSelector: {matchLabels: {role: client}}
            """),
            Expect(80, "TCP", XA_INGRESS_DENIED),
            label_pod("x/c", {"role": "client"}),
            Expect(80, "TCP", XA_FROM_XC),
            label_pod("x/c", {"role": None}),
            Expect(80, "TCP", XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "namespace-relabelled",
        "namespaceSelector follows labels, not names: after y and z swap ns labels, z gets in and y not",
        (
            policy("x", "from-ns-y", """
                podSelector: {}
                ingress:
                - from:
                  - namespaceSelector: {matchLabels: {ns: "y"}}
            """),
            Expect(80, "TCP", X_FROM_Y),
            label_namespace("y", {"ns": "z"}),
            label_namespace("z", {"ns": "y"}),
            Expect(80, "TCP", X_FROM_Z),
        ),
    ),
    Scenario(
        "policy-updated-in-place",
        "applying a changed policy of the same name replaces its rules: x/b loses access, x/c gains it",
        (
            policy("x", "a-from-one-pod", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - podSelector: {matchLabels: {pod: b}}
            """),
            Expect(80, "TCP", XA_FROM_XB),
            policy("x", "a-from-one-pod", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - podSelector: {matchLabels: {pod: c}}
            """),
            Expect(80, "TCP", XA_FROM_XC),
        ),
    ),
    Scenario(
        "policy-deleted",
        "deleting the only policy selecting x's pods makes them non-isolated again",
        (
            DENY_INGRESS_X,
            Expect(80, "TCP", X_INGRESS_DENIED),
            delete_policy("x", "deny-ingress"),
            *expect_all((TCP80, UDP81), ALL_REACHABLE),
        ),
    ),
    Scenario(
        "policies-union-of-peers",
        "two policies selecting x/a: what either admits gets in (x/b from one, namespace y from the other)",
        (
            policy("x", "a-from-b", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - podSelector: {matchLabels: {pod: b}}
            """),
            policy("x", "a-from-y", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - namespaceSelector: {matchLabels: {ns: "y"}}
            """),
            Expect(80, "TCP", XA_FROM_XB_OR_Y),
        ),
    ),
    Scenario(
        "policies-union-keeps-each-rule-whole",
        "a union of rules does not mix their parts: x/b only on 80, x/c only on 81",
        (
            policy("x", "a-from-b-on-80", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - podSelector: {matchLabels: {pod: b}}
                  ports:
                  - {port: 80, protocol: TCP}
            """),
            policy("x", "a-from-c-on-81", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - podSelector: {matchLabels: {pod: c}}
                  ports:
                  - {port: 81, protocol: TCP}
            """),
            Expect(80, "TCP", XA_FROM_XB),
            Expect(81, "TCP", XA_FROM_XC),
        ),
    ),
    Scenario(
        "policy-in-y-does-not-affect-x",
        "a policy only selects pods of its own namespace: y's policy for pod a isolates y/a, not x/a or z/a",
        (
            policy("y", "isolate-a", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Ingress]
            """),
            Expect(80, "TCP", """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   .   .   X   .   .   .   .   .
            x/b    .   .   .   X   .   .   .   .   .
            x/c    .   .   .   X   .   .   .   .   .
            y/a    .   .   .   .   .   .   .   .   .
            y/b    .   .   .   X   .   .   .   .   .
            y/c    .   .   .   X   .   .   .   .   .
            z/a    .   .   .   X   .   .   .   .   .
            z/b    .   .   .   X   .   .   .   .   .
            z/c    .   .   .   X   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "empty-from-list-admits-all-sources",
        "`from: []` matches every source; the rule's ports still restrict",
        (
            policy("x", "a-on-80", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from: []
                  ports:
                  - {port: 80, protocol: TCP}
            """),
            Expect(80, "TCP", ALL_REACHABLE),
            Expect(81, "TCP", XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "empty-ports-list-admits-all-ports",
        "`ports: []` matches every port and protocol; the rule's peers still restrict",
        (
            policy("x", "a-from-b-any-port", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - podSelector: {matchLabels: {pod: b}}
                  ports: []
            """),
            *expect_all((TCP80, TCP81, UDP81), XA_FROM_XB),
        ),
    ),
    # --- ports, protocols, named ports, ranges ---------------------------------------------------
    Scenario(
        "ingress-port-by-number",
        "a numbered TCP port admits that port only: not the other port, not the same number over UDP",
        (
            policy("x", "a-on-tcp-80", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - ports:
                  - {port: 80, protocol: TCP}
            """),
            Expect(80, "TCP", ALL_REACHABLE),
            Expect(81, "TCP", XA_INGRESS_DENIED),
            Expect(80, "UDP", XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "ingress-port-protocol-defaults-to-tcp",
        "a port without protocol is TCP: TCP 81 gets in, UDP 81 and TCP 80 not",
        (
            policy("x", "a-on-81", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - ports:
                  - port: 81
            """),
            Expect(81, "TCP", ALL_REACHABLE),
            Expect(81, "UDP", XA_INGRESS_DENIED),
            Expect(80, "TCP", XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "ingress-named-port",
        "a named port (serve-80-tcp) admits the container port it names, TCP 80, and nothing else",
        (
            policy("x", "a-on-serve-80-tcp", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - ports:
                  - port: serve-80-tcp
            """),
            Expect(80, "TCP", ALL_REACHABLE),
            Expect(81, "TCP", XA_INGRESS_DENIED),
            Expect(80, "UDP", XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "ingress-named-udp-port",
        "a named UDP port with protocol UDP admits UDP 81 only",
        (
            policy("x", "a-on-serve-81-udp", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - ports:
                  - {port: serve-81-udp, protocol: UDP}
            """),
            Expect(81, "UDP", ALL_REACHABLE),
            Expect(80, "UDP", XA_INGRESS_DENIED),
            Expect(81, "TCP", XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "named-port-on-the-wrong-protocol",
        "a named port matches only on its protocol: serve-80-udp as TCP and serve-80-tcp as UDP open nothing",
        (
            policy("x", "a-on-mismatched-names", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - ports:
                  - {port: serve-80-udp, protocol: TCP}
                  - {port: serve-80-tcp, protocol: UDP}
            """),
            Expect(80, "TCP", XA_INGRESS_DENIED),
            Expect(80, "UDP", XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "end-port-range-80-to-81",
        "endPort makes an inclusive range: 80-81 over TCP admits both ports, and still not UDP",
        (
            policy("x", "a-on-80-to-81", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - ports:
                  - {port: 80, endPort: 81, protocol: TCP}
            """),
            Expect(80, "TCP", ALL_REACHABLE),
            Expect(81, "TCP", ALL_REACHABLE),
            Expect(80, "UDP", XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "end-port-range-81-to-81",
        "a one-port range 81-81 admits 81 and not 80",
        (
            policy("x", "a-on-81-to-81", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - ports:
                  - {port: 81, endPort: 81, protocol: TCP}
            """),
            Expect(81, "TCP", ALL_REACHABLE),
            Expect(80, "TCP", XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "end-port-range-udp-79-to-80",
        "a UDP range 79-80 admits UDP 80, not UDP 81 above it, and not TCP 80",
        (
            policy("x", "a-on-udp-79-to-80", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - ports:
                  - {port: 79, endPort: 80, protocol: UDP}
            """),
            Expect(80, "UDP", ALL_REACHABLE),
            Expect(81, "UDP", XA_INGRESS_DENIED),
            Expect(80, "TCP", XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "udp-only-rule-does-not-admit-tcp",
        "a port entry with protocol UDP and no port admits every UDP port and no TCP port",
        (
            policy("x", "a-on-any-udp", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - ports:
                  - protocol: UDP
            """),
            *expect_all((UDP80, UDP81), ALL_REACHABLE),
            *expect_all((TCP80, TCP81), XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "sctp-ingress-rule-opens-no-tcp-or-udp",
        "an ingress rule for SCTP 80 isolates x/a and admits neither TCP 80 nor UDP 80",
        (
            policy("x", "a-on-sctp-80", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - ports:
                  - {port: 80, protocol: SCTP}
            """),
            Expect(80, "TCP", XA_INGRESS_DENIED),
            Expect(80, "UDP", XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "sctp-egress-rule-opens-no-tcp-or-udp",
        "an egress rule for any SCTP port plus TCP 81 to y opens TCP 81 to y only, not TCP 80 or UDP 81",
        (
            policy("x", "a-to-y-sctp", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Egress]
                egress:
                - to:
                  - namespaceSelector: {matchLabels: {ns: "y"}}
                  ports:
                  - protocol: SCTP
                  - {port: 81, protocol: TCP}
            """),
            Expect(81, "TCP", XA_TO_Y),
            Expect(80, "TCP", XA_EGRESS_DENIED),
            Expect(81, "UDP", XA_EGRESS_DENIED),
        ),
    ),
    # --- policyTypes and directions --------------------------------------------------------------
    Scenario(
        "policy-types-ingress-ignores-egress-rules",
        "with policyTypes [Ingress] the egress rules are ignored: x/a is not isolated for egress",
        (
            policy("x", "a-ingress-only", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Ingress]
                ingress:
                - from:
                  - podSelector: {matchLabels: {pod: b}}
                egress:
                - to:
                  - podSelector: {matchLabels: {pod: b}}
            """),
            *expect_all((TCP80, UDP80), XA_FROM_XB),
        ),
    ),
    Scenario(
        "policy-types-egress-ignores-ingress-rules",
        "with policyTypes [Egress] the ingress rules are ignored: x/a is not isolated for ingress",
        (
            policy("x", "a-egress-only", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Egress]
                ingress:
                - from:
                  - podSelector: {matchLabels: {pod: c}}
                egress:
                - to:
                  - podSelector: {matchLabels: {pod: b}}
            """),
            *expect_all((TCP80, UDP80), XA_TO_XB),
        ),
    ),
    Scenario(
        "policy-types-both",
        "ingress from x/b and egress to x/c: x/b may open to x/a but x/a may not open to x/b",
        (
            policy("x", "a-both-ways", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Ingress, Egress]
                ingress:
                - from:
                  - podSelector: {matchLabels: {pod: b}}
                egress:
                - to:
                  - podSelector: {matchLabels: {pod: c}}
            """),
            *expect_all((TCP80, UDP81), """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   X   .   X   X   X   X   X   X
            x/b    .   .   .   .   .   .   .   .   .
            x/c    X   .   .   .   .   .   .   .   .
            y/a    X   .   .   .   .   .   .   .   .
            y/b    X   .   .   .   .   .   .   .   .
            y/c    X   .   .   .   .   .   .   .   .
            z/a    X   .   .   .   .   .   .   .   .
            z/b    X   .   .   .   .   .   .   .   .
            z/c    X   .   .   .   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "policy-types-inferred-from-egress-rules",
        "without policyTypes, egress rules make it [Ingress, Egress]: x/a admits nobody and reaches only x/b",
        (
            policy("x", "a-to-b", """
                podSelector: {matchLabels: {pod: a}}
                egress:
                - to:
                  - podSelector: {matchLabels: {pod: b}}
            """),
            Expect(80, "TCP", """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   .   X   X   X   X   X   X   X
            x/b    X   .   .   .   .   .   .   .   .
            x/c    X   .   .   .   .   .   .   .   .
            y/a    X   .   .   .   .   .   .   .   .
            y/b    X   .   .   .   .   .   .   .   .
            y/c    X   .   .   .   .   .   .   .   .
            z/a    X   .   .   .   .   .   .   .   .
            z/b    X   .   .   .   .   .   .   .   .
            z/c    X   .   .   .   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "egress-to-namespace",
        "egress to a namespaceSelector lets x's pods reach y only (not each other, not z)",
        (
            policy("x", "to-y", """
                podSelector: {}
                policyTypes: [Egress]
                egress:
                - to:
                  - namespaceSelector: {matchLabels: {ns: "y"}}
            """),
            *expect_all((TCP80, UDP81), X_TO_Y),
        ),
    ),
    Scenario(
        "egress-to-own-namespace",
        "egress to an empty podSelector lets x's pods reach each other and nothing outside x",
        (
            policy("x", "to-own-namespace", """
                podSelector: {}
                policyTypes: [Egress]
                egress:
                - to:
                  - podSelector: {}
            """),
            Expect(80, "TCP", """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   .   .   X   X   X   X   X   X
            x/b    .   .   .   X   X   X   X   X   X
            x/c    .   .   .   X   X   X   X   X   X
            y/a    .   .   .   .   .   .   .   .   .
            y/b    .   .   .   .   .   .   .   .   .
            y/c    .   .   .   .   .   .   .   .   .
            z/a    .   .   .   .   .   .   .   .   .
            z/b    .   .   .   .   .   .   .   .   .
            z/c    .   .   .   .   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "egress-named-port",
        "egress to named port serve-81-tcp (resolved on each destination) opens TCP 81 to all, nothing else",
        (
            policy("x", "a-to-serve-81-tcp", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Egress]
                egress:
                - ports:
                  - port: serve-81-tcp
            """),
            Expect(81, "TCP", ALL_REACHABLE),
            Expect(80, "TCP", XA_EGRESS_DENIED),
            Expect(81, "UDP", XA_EGRESS_DENIED),
        ),
    ),
    Scenario(
        "egress-named-udp-port-to-namespace",
        "egress to namespace z on the named port serve-80-udp: UDP 80 to z only, and no TCP",
        (
            policy("x", "a-to-z-serve-80-udp", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Egress]
                egress:
                - to:
                  - namespaceSelector: {matchLabels: {ns: z}}
                  ports:
                  - {port: serve-80-udp, protocol: UDP}
            """),
            Expect(80, "UDP", XA_TO_Z),
            Expect(80, "TCP", XA_EGRESS_DENIED),
        ),
    ),
    Scenario(
        "egress-isolated-source-to-non-isolated-destination",
        "each direction is decided on its own side: x/a's egress admits y, y/b's ingress still refuses",
        (
            policy("x", "a-to-y", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Egress]
                egress:
                - to:
                  - namespaceSelector: {matchLabels: {ns: "y"}}
            """),
            policy("y", "isolate-b", """
                podSelector: {matchLabels: {pod: b}}
                policyTypes: [Ingress]
            """),
            *expect_all((TCP80, UDP80), """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   X   X   .   X   .   X   X   X
            x/b    .   .   .   .   X   .   .   .   .
            x/c    .   .   .   .   X   .   .   .   .
            y/a    .   .   .   .   X   .   .   .   .
            y/b    .   .   .   .   .   .   .   .   .
            y/c    .   .   .   .   X   .   .   .   .
            z/a    .   .   .   .   X   .   .   .   .
            z/b    .   .   .   .   X   .   .   .   .
            z/c    .   .   .   .   X   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "ingress-allowed-but-source-egress-denied",
        "y/a admits all of x, but x/a's egress is denied: x/a cannot reach y/a while x/b and x/c can",
        (
            policy("y", "a-from-x", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - namespaceSelector: {matchLabels: {ns: x}}
            """),
            policy("x", "a-no-egress", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Egress]
            """),
            Expect(80, "TCP", """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   X   X   X   X   X   X   X   X
            x/b    .   .   .   .   .   .   .   .   .
            x/c    .   .   .   .   .   .   .   .   .
            y/a    .   .   .   .   .   .   .   .   .
            y/b    .   .   .   X   .   .   .   .   .
            y/c    .   .   .   X   .   .   .   .   .
            z/a    .   .   .   X   .   .   .   .   .
            z/b    .   .   .   X   .   .   .   .   .
            z/c    .   .   .   X   .   .   .   .   .
            """),
        ),
    ),
    # --- ipBlock ---------------------------------------------------------------------------------
    Scenario(
        "ingress-ip-block",
        "an ingress ipBlock of node2's block admits the pods on node2 (x/b, y/b, z/b)",
        (
            policy("x", "a-from-node2-block", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - ipBlock:
                      cidr: {cidr:y/b/26}
            """),
            Expect(80, "TCP", XA_FROM_EVERY_B),
        ),
    ),
    Scenario(
        "ingress-ip-block-except",
        "an ingress ipBlock with except leaves out the excepted pod (y/b) of the block",
        (
            policy("x", "a-from-node2-block-but-y-b", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - ipBlock:
                      cidr: {cidr:x/b/26}
                      except:
                      - {cidr:y/b/32}
            """),
            *expect_all((TCP80, UDP80), """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   .   .   .   .   .   .   .   .
            x/b    .   .   .   .   .   .   .   .   .
            x/c    X   .   .   .   .   .   .   .   .
            y/a    X   .   .   .   .   .   .   .   .
            y/b    X   .   .   .   .   .   .   .   .
            y/c    X   .   .   .   .   .   .   .   .
            z/a    X   .   .   .   .   .   .   .   .
            z/b    .   .   .   .   .   .   .   .   .
            z/c    X   .   .   .   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "ingress-ip-block-single-pod",
        "an ingress ipBlock of one pod's /32 (/128) admits that pod only",
        (
            policy("x", "b-from-z-a", """
                podSelector: {matchLabels: {pod: b}}
                ingress:
                - from:
                  - ipBlock:
                      cidr: {cidr:z/a/32}
            """),
            Expect(80, "TCP", """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   X   .   .   .   .   .   .   .
            x/b    .   .   .   .   .   .   .   .   .
            x/c    .   X   .   .   .   .   .   .   .
            y/a    .   X   .   .   .   .   .   .   .
            y/b    .   X   .   .   .   .   .   .   .
            y/c    .   X   .   .   .   .   .   .   .
            z/a    .   .   .   .   .   .   .   .   .
            z/b    .   X   .   .   .   .   .   .   .
            z/c    .   X   .   .   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "ingress-ip-block-on-one-port",
        "an ingress ipBlock of everything on UDP 81 admits UDP 81 from all and nothing on UDP 80",
        (
            policy("x", "a-from-anywhere-udp-81", """
                podSelector: {matchLabels: {pod: a}}
                ingress:
                - from:
                  - ipBlock:
                      cidr: {cidr:all}
                  ports:
                  - {port: 81, protocol: UDP}
            """),
            Expect(81, "UDP", ALL_REACHABLE),
            Expect(80, "UDP", XA_INGRESS_DENIED),
        ),
    ),
    Scenario(
        "egress-ip-block-except",
        "an egress ipBlock of node3's block except z/c reaches x/c and y/c only",
        (
            policy("x", "a-to-node3-block-but-z-c", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Egress]
                egress:
                - to:
                  - ipBlock:
                      cidr: {cidr:x/c/26}
                      except:
                      - {cidr:z/c/32}
            """),
            *expect_all((TCP80, UDP81), """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   X   .   X   X   .   X   X   X
            x/b    .   .   .   .   .   .   .   .   .
            x/c    .   .   .   .   .   .   .   .   .
            y/a    .   .   .   .   .   .   .   .   .
            y/b    .   .   .   .   .   .   .   .   .
            y/c    .   .   .   .   .   .   .   .   .
            z/a    .   .   .   .   .   .   .   .   .
            z/b    .   .   .   .   .   .   .   .   .
            z/c    .   .   .   .   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "egress-ip-block-single-pod",
        "an egress ipBlock of one pod's /32 (/128) reaches that pod only",
        (
            policy("x", "a-to-y-c", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Egress]
                egress:
                - to:
                  - ipBlock:
                      cidr: {cidr:y/c/32}
            """),
            Expect(80, "TCP", """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   X   X   X   X   .   X   X   X
            x/b    .   .   .   .   .   .   .   .   .
            x/c    .   .   .   .   .   .   .   .   .
            y/a    .   .   .   .   .   .   .   .   .
            y/b    .   .   .   .   .   .   .   .   .
            y/c    .   .   .   .   .   .   .   .   .
            z/a    .   .   .   .   .   .   .   .   .
            z/b    .   .   .   .   .   .   .   .   .
            z/c    .   .   .   .   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "egress-ip-block-except-allowed-by-another-peer",
        "an address in one peer's except but in another peer's cidr is allowed (peers are ORed)",
        (
            policy("x", "a-to-node2-block", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Egress]
                egress:
                - to:
                  - ipBlock:
                      cidr: {cidr:x/b/26}
                      except:
                      - {cidr:y/b/32}
                  - ipBlock:
                      cidr: {cidr:y/b/32}
            """),
            Expect(80, "TCP", XA_TO_EVERY_B),
        ),
    ),
    Scenario(
        "egress-ip-block-everything-except-a-node",
        "an egress ipBlock of the whole family except node3's block reaches every pod but the c pods",
        (
            policy("x", "a-to-all-but-node3", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Egress]
                egress:
                - to:
                  - ipBlock:
                      cidr: {cidr:all}
                      except:
                      - {cidr:z/c/26}
            """),
            *expect_all((TCP81, UDP80), """
                  x/a x/b x/c y/a y/b y/c z/a z/b z/c
            x/a    .   .   X   .   .   X   .   .   X
            x/b    .   .   .   .   .   .   .   .   .
            x/c    .   .   .   .   .   .   .   .   .
            y/a    .   .   .   .   .   .   .   .   .
            y/b    .   .   .   .   .   .   .   .   .
            y/c    .   .   .   .   .   .   .   .   .
            z/a    .   .   .   .   .   .   .   .   .
            z/b    .   .   .   .   .   .   .   .   .
            z/c    .   .   .   .   .   .   .   .   .
            """),
        ),
    ),
    Scenario(
        "ip-block-ipv4-cidr-does-not-match-ipv6",
        "an egress ipBlock 0.0.0.0/0 covers no IPv6 address: over IPv6 x/a reaches nobody",
        (
            policy("x", "a-to-all-ipv4", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Egress]
                egress:
                - to:
                  - ipBlock:
                      cidr: 0.0.0.0/0
            """),
            Expect(80, "TCP", XA_EGRESS_DENIED),
        ),
        families=(6,),
    ),
    Scenario(
        "ip-block-ipv6-cidr-does-not-match-ipv4",
        "an egress ipBlock ::/0 covers no IPv4 address: over IPv4 x/a reaches nobody",
        (
            policy("x", "a-to-all-ipv6", """
                podSelector: {matchLabels: {pod: a}}
                policyTypes: [Egress]
                egress:
                - to:
                  - ipBlock:
                      cidr: ::/0
            """),
            Expect(80, "TCP", XA_EGRESS_DENIED),
        ),
        families=(4,),
    ),
)
# fmt: on


def scenario_named(name: str) -> Scenario:
    for scenario in SCENARIOS:
        if scenario.name == name:
            return scenario
    raise KeyError(f"no scenario named {name!r}; see SCENARIOS in {__name__}")


def cases() -> list[tuple[Scenario, int]]:
    """Every (scenario, family) pair to run, for pytest.mark.parametrize."""
    return [(scenario, family) for scenario in SCENARIOS for family in scenario.families]
