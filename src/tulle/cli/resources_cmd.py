"""`tulle apply`, `get`, `delete` and `label`: kubectl's resource commands, on Tulle's datastore.

The same YAML works here and with kubectl on a cluster, and the answers read the same:
`networkpolicy.networking.k8s.io/deny created`, `Error from server (NotFound): ...`.

    tulle apply -f policy.yaml --lab demo
    tulle get netpol -n web -o yaml --lab demo
    tulle label ns web team=blue --lab demo
    tulle delete ns web --lab demo
"""

from __future__ import annotations

import argparse
import calendar
import datetime
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from tulle.agent.node import is_ready, with_ready_condition
from tulle.cli.common import UserError, add_datastore_args, atomic_writer, open_datastore, print_json, print_table
from tulle.cli.conventions import CliParser
from tulle.cli.related import NodeShare, node_addresses, node_shares, pod_addresses, routing_mode, sorted_cidrs
from tulle.datastore.base import Applied, Conflict, Datastore, DatastoreError, Obj, PartlyApplied
from tulle.model import kinds, selectors
from tulle.model.kinds import (
    IP_POOL,
    IPAM_BLOCK,
    NAMESPACE,
    NETWORK_POLICY,
    NODE,
    POD,
    WORKLOAD_ENDPOINT,
    Kind,
    resource,
)
from tulle.model.node_report import underlay_of
from tulle.model.pod_status import with_node_presence
from tulle.model.validation import (
    ADMITTED,
    AdmissionError,
    AdmissionErrors,
    admit_all,
    check_delete,
    label_value,
    qualified_name,
)


class _FlagsAnywhere(CliParser):
    """kubectl takes flags between names (`get pod -n web a`, `label pod a -n web k=v`); argparse
    does that only when asked for intermixed parsing, which a parser without subparsers allows."""

    _parsing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._parsing:
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def _add_parser(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, **kwargs)
    parser.__class__ = _FlagsAnywhere  # add_parser builds the main parser's class; only ours parse so
    return parser


def register(sub: Any) -> None:
    p = _add_parser(
        sub,
        "apply",
        help="create or update objects from YAML or JSON, all or nothing",
        description="Create or update the objects in the files (YAML, multi-document YAML, JSON, a List). "
        "Every object is checked first; if any is refused, nothing is written.",
    )
    p.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE",
        help="a file, a directory of .yaml/.yml/.json files, or - for stdin (repeatable)",
    )
    p.add_argument("-n", "--namespace", help="namespace for objects that name none")
    p.add_argument("--dry-run", action="store_true", help="check and report, write nothing")
    add_datastore_args(p)
    p.set_defaults(func=cmd_apply)

    p = _add_parser(
        sub,
        "get",
        help="list objects, or show some by name",
        description="Show objects of one kind: KIND is kubectl's name for it (netpol, ns, po...).",
    )
    p.add_argument("kind", metavar="KIND", help="networkpolicy|netpol, namespace|ns, pod|po, ippool, ... or KIND/NAME")
    p.add_argument("names", nargs="*", metavar="NAME", help="the objects to show (default: all)")
    _namespace_args(p)
    p.add_argument("-A", "--all-namespaces", action="store_true", help="list across all namespaces")
    p.add_argument("-o", "--output", choices=("json", "yaml", "wide", "name"), help="output format")
    p.add_argument("-l", "--selector", help="label selector, e.g. app=web,tier!=db or 'env in (a,b)'")
    p.add_argument("--show-labels", action="store_true", help="add a LABELS column")
    add_datastore_args(p)
    p.set_defaults(func=cmd_get)

    p = _add_parser(
        sub,
        "delete",
        help="delete objects by name",
        description="Delete objects; deleting a Namespace deletes its Pods, NetworkPolicies and WorkloadEndpoints.",
    )
    p.add_argument("kind", metavar="KIND", help="kubectl's name for the kind, or KIND/NAME")
    p.add_argument("names", nargs="*", metavar="NAME", help="the objects to delete")
    _namespace_args(p)
    p.add_argument("--ignore-not-found", action="store_true", help="an object that is not there is no error")
    add_datastore_args(p)
    p.set_defaults(func=cmd_delete)

    p = _add_parser(
        sub,
        "label",
        help="add, change or remove labels",
        description="KEY=VALUE sets a label (changing one needs --overwrite); KEY- removes it.",
    )
    p.add_argument("kind", metavar="KIND", help="kubectl's name for the kind, or KIND/NAME")
    p.add_argument(
        "args", nargs="+", metavar="NAME|KEY=VALUE|KEY-", help="the object's name (unless KIND/NAME), then the changes"
    )
    _namespace_args(p)
    p.add_argument("--overwrite", action="store_true", help="allow changing the value of an existing label")
    add_datastore_args(p)
    p.set_defaults(func=cmd_label)


def _namespace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="namespace of namespaced kinds (default: default)")


# --- names kubectl prints ----------------------------------------------------------------------


def ref(kind: Kind) -> str:
    """kubectl's `singular.group`, as in `networkpolicy.networking.k8s.io/x created`."""
    group = kind.api_version.rpartition("/")[0]
    return f"{kind.singular}.{group}" if group else kind.singular


def _kind(name: str) -> Kind:
    try:
        return kinds.lookup(name)
    except kinds.UnknownKind as exc:
        raise UserError(str(exc)) from None


def _kind_and_names(kind_arg: str, names: list[str]) -> tuple[Kind, list[str]]:
    """`netpol x y` or `netpol/x`."""
    if "/" in kind_arg:
        kind_name, _, name = kind_arg.partition("/")
        return _kind(kind_name), [name, *names]
    return _kind(kind_arg), names


def _server_error(reason: str, message: str) -> None:
    print(f"Error from server ({reason}): {message}", file=sys.stderr)


def _not_found(kind: Kind, name: str) -> None:
    _server_error("NotFound", f'{resource(kind)} "{name}" not found')


class _Session:
    """The store for one command, closed at the end; datastore failures become UserErrors."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.store: Datastore | None = None

    def __enter__(self) -> Datastore:
        self.store = open_datastore(self.args)
        return self.store

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.store is not None:
            self.store.close()
        if isinstance(exc, DatastoreError):
            raise UserError(str(exc)) from exc


# --- apply -------------------------------------------------------------------------------------


@dataclass
class Document:
    """One object of the input and where it came from, for the messages."""

    obj: Any
    source: str
    index: int  # 1-based document number in the source
    item: int | None = None  # 1-based position in a List

    def where(self) -> str:
        item = f", item {self.item}" if self.item is not None else ""
        return f'"{self.source}" (document {self.index}{item})'


def _sources(paths: list[str]) -> Iterator[tuple[str, str]]:
    for path in paths:
        if path == "-":
            yield "STDIN", sys.stdin.read()
        elif os.path.isdir(path):
            for entry in sorted(os.listdir(path)):
                if entry.endswith((".yaml", ".yml", ".json")):
                    full = os.path.join(path, entry)
                    with open(full) as f:
                        yield full, f.read()
        elif os.path.exists(path):
            with open(path) as f:
                yield path, f.read()
        else:
            raise UserError(f'the path "{path}" does not exist')


# What YAML aliases may stand for in one document: a few lines of aliases to aliases can stand
# for billions of values ("billion laughs"), or for themselves. A value is counted against the
# first limit when it is reached through an alias (a map or list met again); values written out
# are bounded by the text itself.
MAX_ALIASED_VALUES = 100_000
MAX_DOCUMENT_DEPTH = 100


class _Plain:
    """YAML's own types as the API server's JSON has them (sigs.k8s.io/yaml converts YAML to JSON
    before anything reads it): an unquoted timestamp is a string, keys are strings, a set is a
    map of nulls, binary data a string; NaN and infinities have no JSON form and are refused.
    Raises UserError for those and for a document whose aliases stand for too much."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.aliased_left = MAX_ALIASED_VALUES
        self.seen: set[int] = set()  # the maps and lists met so far, by identity

    def value(self, value: Any, depth: int = 0, aliased: bool = False) -> Any:
        if depth > MAX_DOCUMENT_DEPTH:
            raise UserError(f"error parsing {self.source}: nested more than {MAX_DOCUMENT_DEPTH} deep")
        if isinstance(value, dict | list):
            aliased = aliased or id(value) in self.seen
            self.seen.add(id(value))
        if aliased:
            self.aliased_left -= 1
            if self.aliased_left < 0:
                raise UserError(
                    f"error parsing {self.source}: its YAML aliases stand for more than {MAX_ALIASED_VALUES} values"
                )
        if isinstance(value, dict):
            return {self.key(k): self.value(v, depth + 1, aliased) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v, depth + 1, aliased) for v in value]
        if isinstance(value, set):
            return {self.key(k): None for k in value}
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            raise UserError(f"error parsing {self.source}: {value} is not a JSON value")
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        return self.scalar(value)

    def key(self, key: Any) -> str:
        if isinstance(key, str):
            return key
        if isinstance(key, bool) or key is None:
            return json.dumps(key)
        return str(self.scalar(key))

    @staticmethod
    def scalar(value: Any) -> Any:
        if isinstance(value, datetime.datetime):
            if value.tzinfo is not None:
                value = value.astimezone(datetime.UTC).replace(tzinfo=None)
            return value.strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(value, datetime.date):
            return value.isoformat()
        return value


def _load(source: str, text: str) -> list[Any]:
    """The documents of one input, as YAML (or JSON) reads them; UserError for what does not read."""
    try:
        if text.lstrip().startswith("{"):
            try:
                return [json.loads(text)]
            except json.JSONDecodeError:
                pass
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise UserError(f"error parsing {source}: {exc}") from None
    except ValueError as exc:  # a timestamp PyYAML reads that is not a date: 2001-13-45
        raise UserError(f"error parsing {source}: {exc}") from None
    except RecursionError:
        raise UserError(f"error parsing {source}: nested too deeply") from None


def parse_documents(source: str, text: str) -> list[Document]:
    """The objects in one input: YAML documents or JSON; a `kind: List` (or `...List`) gives its items."""
    out: list[Document] = []
    for index, doc in enumerate(_load(source, text), start=1):
        if doc is None:
            continue  # an empty document, as between two `---`
        doc = _Plain(source).value(doc)
        kind = doc.get("kind") if isinstance(doc, dict) else None
        if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
            out += [Document(item, source, index, n) for n, item in enumerate(doc["items"], start=1)]
        else:
            out.append(Document(doc, source, index))
    return out


def _key_of(obj: Any, namespace: str | None) -> tuple[Kind, str | None, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return None
    kind = kinds.by_kind(obj.get("kind", "")) if isinstance(obj.get("kind"), str) else None
    name = obj["metadata"].get("name")
    if kind is None or not isinstance(name, str):
        return None
    ns = (obj["metadata"].get("namespace") or namespace or "default") if kind.namespaced else None
    if ns is not None and not isinstance(ns, str):
        return None  # a namespace of the wrong type: admission names the field
    return kind, ns, name


def _prepare(docs: list[Document], namespace: str | None) -> None:
    """What kubectl does before it sends: the -n namespace, and status left out (it is not applied)."""
    seen: dict[tuple[Kind, str | None, str], Document] = {}
    for doc in docs:
        if not isinstance(doc.obj, dict):
            continue
        doc.obj.pop("status", None)
        meta = doc.obj.get("metadata")
        kind = kinds.by_kind(doc.obj.get("kind", "")) if isinstance(doc.obj.get("kind"), str) else None
        if namespace and kind is not None and kind.namespaced and isinstance(meta, dict):
            given = meta.get("namespace")
            if given and given != namespace:
                raise UserError(
                    f'the namespace from the provided object "{given}" does not match the namespace '
                    f'"{namespace}" ({doc.where()}). '
                    f"You must pass '--namespace={given}' to perform this operation."
                )
            meta["namespace"] = namespace
        key = _key_of(doc.obj, namespace)
        if key is None:
            continue
        if key in seen:
            kind_, ns, name = key
            where = f" in namespace {ns}" if ns else ""
            raise UserError(
                f"{doc.where()} and {seen[key].where()} both define {ref(kind_)}/{name}{where}: "
                "keep one; nothing was applied"
            )
        seen[key] = doc


def cmd_apply(args: argparse.Namespace) -> int:
    docs = [doc for source, text in _sources(args.filename) for doc in parse_documents(source, text)]
    if not docs:
        raise UserError("no objects passed to apply")
    _prepare(docs, args.namespace)
    with _Session(args) as store:
        try:
            applied = atomic_writer(store).apply_many([d.obj for d in docs], admit=admit_all, dry_run=args.dry_run)
        except AdmissionErrors as errs:
            for i, err in errs.errors:
                _server_error(err.reason, f"error when applying {docs[i].where()}: {err}")
            raise UserError(f"nothing was applied: {len(errs.errors)} of {len(docs)} objects refused") from None
        except Conflict as exc:
            _server_error("Conflict", f"{exc}; nothing was applied")
            return 1
        except PartlyApplied as exc:
            _print_applied(exc.applied, "")
            _server_error("Conflict", f"{exc.cause}; the objects above were applied, the others were not")
            return 1
    _print_applied(applied, " (server dry run)" if args.dry_run else "")
    return 0


def _print_applied(applied: Applied, suffix: str) -> None:
    for obj, verdict in applied:
        kind = kinds.by_kind(obj["kind"])
        assert kind is not None
        print(f"{ref(kind)}/{obj['metadata']['name']} {verdict}{suffix}")


# --- get ---------------------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """An age as kubectl prints it (k8s.io/apimachinery/pkg/util/duration.HumanDuration).

    >>> human_duration(90), human_duration(400), human_duration(7200), human_duration(3 * 86400 + 3600)
    ('90s', '6m40s', '120m', '3d1h')
    """
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def _age(obj: Obj, now: float) -> str:
    stamp = obj.get("metadata", {}).get("creationTimestamp")
    try:
        created = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    except (TypeError, ValueError):
        return "<unknown>"
    return human_duration(now - created)


def selector_text(selector: Any) -> str:
    """A LabelSelector as kubectl's POD-SELECTOR column shows it: `app=web,tier in (a,b)`, `<none>`."""
    try:
        parsed = selectors.parse_selector(selector)
    except selectors.SelectorError:
        return "<invalid>"
    return "<none>" if parsed.empty else parsed.text()


def _labels_text(obj: Obj) -> str:
    labels = obj.get("metadata", {}).get("labels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "<none>"


@dataclass
class _Related:
    """What rows show of other objects: the nodes' blocks and pods, the pods' endpoints."""

    shares: dict[str, NodeShare] = field(default_factory=dict)
    endpoints: list[Obj] = field(default_factory=list)


def _related(store: Datastore, kind: Kind, wide: bool) -> _Related:
    if kind is NODE:
        pods, endpoints, blocks = (store.list(k)[0] for k in (POD, WORKLOAD_ENDPOINT, IPAM_BLOCK))
        return _Related(shares=node_shares([], pods, endpoints, blocks))
    if kind is POD and wide:
        return _Related(endpoints=store.list(WORKLOAD_ENDPOINT)[0])
    return _Related()


def _columns(kind: Kind, wide: bool, related: _Related | None = None) -> tuple[list[str], Any]:
    """The headers and a row function for a kind, like kubectl's table printers."""
    related = related or _Related()

    def pod(obj: Obj) -> list[str]:
        status = obj.get("status") or {}
        containers = (obj.get("spec") or {}).get("containers") or []
        statuses = status.get("containerStatuses") or []
        ready = sum(1 for s in statuses if s.get("ready"))
        restarts = sum(int(s.get("restartCount", 0)) for s in statuses)
        row = [f"{ready}/{len(containers)}", status.get("phase") or "Pending", str(restarts)]
        if wide:
            addresses = ",".join(pod_addresses(obj, related.endpoints))
            row += [addresses or "<none>", (obj.get("spec") or {}).get("nodeName") or "<none>"]
        return row

    def node(obj: Obj) -> list[str]:
        share = related.shares.get(obj["metadata"]["name"]) or NodeShare()
        row = [
            "Ready" if is_ready(obj) else "NotReady",
            routing_mode(obj),
            ",".join(node_addresses(obj)) or "<none>",
            str(len(share.blocks)),
            str(len(share.pods)),
        ]
        if wide:
            row += [",".join(sorted_cidrs(share.blocks)) or "<none>", underlay_of(obj) or "<unknown>"]
        return row

    def network_policy(obj: Obj) -> list[str]:
        spec = obj.get("spec") or {}
        row = [selector_text(spec.get("podSelector"))]
        if wide:
            row.append(",".join(str(t) for t in spec.get("policyTypes") or []) or "<none>")
        return row

    if kind is POD:
        return ["READY", "STATUS", "RESTARTS", "AGE", *(["IP", "NODE"] if wide else [])], pod
    if kind is NAMESPACE:
        return ["STATUS", "AGE"], lambda o: [(o.get("status") or {}).get("phase") or "Active"]
    if kind is NODE:
        headers = ["STATUS", "MODE", "ADDRESSES", "BLOCKS", "PODS", "AGE"]
        return headers + (["BLOCK-CIDRS", "UNDERLAY"] if wide else []), node
    if kind is NETWORK_POLICY:
        return ["POD-SELECTOR", "AGE", *(["POLICY-TYPES"] if wide else [])], network_policy
    if kind is IP_POOL:
        return ["CIDR", "BLOCKSIZE", "AGE"], lambda o: [
            str((o.get("spec") or {}).get("cidr", "")),
            str((o.get("spec") or {}).get("blockSize", "")),
        ]
    return ["AGE"], lambda o: []


def _print_table(kind: Kind, objects: list[Obj], args: argparse.Namespace, related: _Related | None = None) -> None:
    headers, row = _columns(kind, args.output == "wide", related)
    # AGE sits before the wide columns, as in kubectl
    age_at = headers.index("AGE")
    show_ns = kind.namespaced and args.all_namespaces
    now = time.time()
    rows = []
    for obj in objects:
        cells = row(obj)
        cells.insert(age_at, _age(obj, now))
        line = [obj["metadata"]["name"], *cells]
        if show_ns:
            line.insert(0, obj["metadata"].get("namespace", ""))
        if args.show_labels:
            line.append(_labels_text(obj))
        rows.append(line)
    full = ["NAME", *headers]
    if show_ns:
        full.insert(0, "NAMESPACE")
    if args.show_labels:
        full.append("LABELS")
    print_table(full, rows)


def _print_objects(
    kind: Kind, objects: list[Obj], args: argparse.Namespace, single: bool, related: _Related | None = None
) -> None:
    if args.output in ("json", "yaml"):
        data: Any = objects[0] if single else {
            "apiVersion": "v1", "kind": "List", "items": objects, "metadata": {"resourceVersion": ""}
        }  # fmt: skip
        if args.output == "json":
            print_json(data)
        else:
            sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    elif args.output == "name":
        for obj in objects:
            print(f"{ref(kind)}/{obj['metadata']['name']}")
    elif objects:
        _print_table(kind, objects, args, related)


def _split_top(text: str) -> list[str]:
    """Split at the commas outside parentheses: `a=b,c in (d,e)` is two requirements."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts]


def parse_label_query(text: str) -> selectors.LabelSelector:
    """kubectl's `-l` notation (k8s.io/apimachinery/pkg/labels.Parse) as a LabelSelector.

    >>> parse_label_query("app=web, env in (a, b),!old").text()
    'app=web,env in (a,b),!old'
    """
    requirements = []
    for part in _split_top(text):
        if not part:
            raise UserError(f"unable to parse requirement: an empty requirement in {text!r}")
        req = _parse_requirement(part)
        for msg in qualified_name(req.key):
            raise UserError(f'unable to parse requirement: invalid label key "{req.key}": {msg}')
        for value in req.values:
            for msg in label_value(value):
                raise UserError(f'unable to parse requirement: invalid label value: "{value}": {msg}')
        requirements.append(req)
    return selectors.LabelSelector(tuple(sorted(set(requirements))))


def _parse_requirement(part: str) -> selectors.Requirement:
    if part.startswith("!"):
        return selectors.Requirement(part[1:].strip(), selectors.DOES_NOT_EXIST)
    for word, operator in ((" notin ", selectors.NOT_IN), (" in ", selectors.IN)):
        if word in part:
            key, _, rest = part.partition(word)
            rest = rest.strip()
            if not (rest.startswith("(") and rest.endswith(")")):
                raise UserError(f"unable to parse requirement: {word.strip()} needs (values) in {part!r}")
            values = tuple(sorted({v.strip() for v in rest[1:-1].split(",") if v.strip()}))
            if not values:
                raise UserError(f"unable to parse requirement: {word.strip()} needs at least one value in {part!r}")
            return selectors.Requirement(key.strip(), operator, values)
    for op, operator in (("!=", selectors.NOT_IN), ("==", selectors.IN), ("=", selectors.IN)):
        if op in part:
            key, _, value = part.partition(op)
            return selectors.Requirement(key.strip(), operator, (value.strip(),))
    return selectors.Requirement(part.strip(), selectors.EXISTS)


def _with_liveness(store: Datastore, nodes: list[Obj]) -> list[Obj]:
    """Nodes with their Ready condition, from their agents' heartbeats."""
    alive = store.live_nodes()
    return [with_ready_condition(n, n["metadata"]["name"] in alive) for n in nodes]


def _with_node_presence(store: Datastore, pods: list[Obj]) -> list[Obj]:
    """Pods, those of a node that is gone shown as lost (phase Unknown, not ready)."""
    if not any((p.get("spec") or {}).get("nodeName") for p in pods):
        return pods
    nodes = {n["metadata"]["name"] for n in store.list(NODE)[0]}
    return with_node_presence(pods, nodes)


def cmd_get(args: argparse.Namespace) -> int:
    kind, names = _kind_and_names(args.kind, args.names)
    if names and args.all_namespaces:
        raise UserError("a resource cannot be retrieved by name across all namespaces")
    if names and args.selector:
        raise UserError("name cannot be provided when a selector is specified")
    wanted = parse_label_query(args.selector) if args.selector else selectors.EVERYTHING
    namespace = None if not kind.namespaced or args.all_namespaces else (args.namespace or "default")
    status = 0
    with _Session(args) as store:
        if names:
            found = []
            for name in names:
                obj = store.get(kind, name, namespace)
                if obj is None:
                    _not_found(kind, name)
                    status = 1
                else:
                    found.append(obj)
            if kind is NODE:
                found = _with_liveness(store, found)
            if kind is POD:
                found = _with_node_presence(store, found)
            if found:
                related = _related(store, kind, args.output == "wide") if args.output in (None, "wide") else None
                _print_objects(kind, found, args, single=len(names) == 1, related=related)
            return status
        objects, _ = store.list(kind, namespace)
        if kind is NODE:
            objects = _with_liveness(store, objects)
        if kind is POD:
            objects = _with_node_presence(store, objects)
        objects = [o for o in objects if selectors.matches(wanted, o.get("metadata", {}).get("labels") or {})]
        related = _related(store, kind, args.output == "wide") if objects and args.output in (None, "wide") else None
    if not objects and args.output not in ("json", "yaml"):
        where = f" in {namespace} namespace" if namespace else ""
        print(f"No resources found{where}.", file=sys.stderr)
        return 0
    _print_objects(kind, objects, args, single=False, related=related)
    return 0


# --- delete ------------------------------------------------------------------------------------


def cmd_delete(args: argparse.Namespace) -> int:
    kind, names = _kind_and_names(args.kind, args.names)
    if not names:
        raise UserError(f"resource(s) were provided, but no name was specified: tulle delete {args.kind} NAME")
    namespace = (args.namespace or "default") if kind.namespaced else None
    status = 0
    with _Session(args) as store:
        for name in names:
            try:
                check_delete(kind, name)
            except AdmissionError as err:
                _server_error(err.reason, str(err))
                status = 1
                continue
            gone = (
                atomic_writer(store).delete_namespace(name)
                if kind is NAMESPACE
                else store.delete(kind, name, namespace)
            )
            if gone:
                print(f'{ref(kind)} "{name}" deleted')
            elif not args.ignore_not_found:
                _not_found(kind, name)
                status = 1
    return status


# --- label -------------------------------------------------------------------------------------


def parse_label_args(items: list[str]) -> tuple[dict[str, str], list[str]]:
    """`k=v` to set and `k-` to remove, as kubectl label takes them.

    >>> parse_label_args(["app=web", "old-"])
    ({'app': 'web'}, ['old'])
    """
    to_set: dict[str, str] = {}
    to_remove: list[str] = []
    for item in items:
        if "=" in item:
            key, _, value = item.partition("=")
            to_set[key] = value
        elif item.endswith("-"):
            to_remove.append(item[:-1])
        else:
            raise UserError(f"invalid label spec: {item!r}: give KEY=VALUE to set a label or KEY- to remove one")
    both = sorted(set(to_set) & set(to_remove))
    if both:
        raise UserError(f"can not both modify and remove a label in the same command: {', '.join(both)}")
    return to_set, to_remove


def cmd_label(args: argparse.Namespace) -> int:
    if "/" in args.kind:
        kind, names = _kind_and_names(args.kind, [])
        name, label_items = names[0], args.args
    else:
        kind, name, label_items = _kind(args.kind), args.args[0], args.args[1:]
    if not label_items:
        raise UserError("at least one label update is required: KEY=VALUE or KEY-")
    if kind not in ADMITTED:
        raise UserError(
            f"{kind.plural} are written by the Tulle agents; label one of {', '.join(k.plural for k in ADMITTED)}"
        )
    to_set, to_remove = parse_label_args(label_items)
    namespace = (args.namespace or "default") if kind.namespaced else None
    with _Session(args) as store:
        for _ in range(5):
            obj = store.get(kind, name, namespace)
            if obj is None:
                _not_found(kind, name)
                return 1
            labels = dict(obj["metadata"].get("labels") or {})
            for key, value in to_set.items():
                if key in labels and labels[key] != value and not args.overwrite:
                    raise UserError(f"'{key}' already has a value ({labels[key]}), and --overwrite is false")
                labels[key] = value
            for key in to_remove:
                if key not in labels:
                    print(f'label "{key}" not found.', file=sys.stderr)
                labels.pop(key, None)
            obj["metadata"]["labels"] = labels
            try:
                # resourceVersion is the one read: a compare-and-swap on it
                [(_, verdict)] = atomic_writer(store).apply_many([obj], admit=admit_all)
            except AdmissionErrors as errs:
                err = errs.errors[0][1]
                _server_error(err.reason, str(err))
                return 1
            except Conflict:
                continue
            done = "not labeled" if verdict == "unchanged" else ("labeled" if to_set else "unlabeled")
            print(f"{ref(kind)}/{name} {done}")
            return 0
    _server_error("Conflict", f'{resource(kind)} "{name}" keeps changing; try again')
    return 1
