"""Fuzz admission: `tulle apply`'s path from text to the datastore — `parse_documents` (YAML or
JSON), kubectl's preparation (`_prepare`), then `apply_many(objects, admit=admit_all)` on the
in-memory datastore — with fuzzed text, or with objects of every kind whose fields are fuzzed
(wrong types, unknown fields, `../`, NUL, very long strings, NaN).

Properties:
- the only exceptions are the documented ones: UserError from parsing and preparing, and from
  `apply_many` AdmissionErrors, Conflict (a resourceVersion that does not match) and ValueError
  (an object given twice);
- a refused batch writes nothing: the datastore's objects and revision are as they were;
- what is admitted can be stored as the etcd backend stores it (`objects.encode`).

    python -m tests.fuzz.fuzz_admission [CORPUS_DIR] -runs=100000
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import atheris
import yaml

with atheris.instrument_imports(include=["tulle"]):
    from tulle.cli.common import UserError
    from tulle.cli.resources_cmd import _prepare, parse_documents
    from tulle.datastore.base import Conflict, Datastore
    from tulle.datastore.factory import open_datastore
    from tulle.datastore.memory import MemoryServer, forget_server, memory_server
    from tulle.datastore.objects import encode
    from tulle.model.validation import AdmissionErrors, admit_all

from tests.fuzz.values import Values, fuzz

NAMES = ["web", "default", "kube-system", "a.b", "db-1", "x" * 63, "pool-a"]
LABEL_KEYS = ["app", "kubernetes.io/metadata.name", "example.com/tier", "a/b/c", ""]
CIDRS = ["10.244.0.0/16", "10.244.1.0/24", "fd00:10:244::/104", "10.0.0.0/8", "10.244.0.1/16", "::/0"]
KINDS = [
    ("v1", "Namespace"),
    ("v1", "Pod"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("tulle.dev/v1", "IPPool"),
    ("tulle.dev/v1", "WorkloadEndpoint"),
    ("v1", "Node"),
    ("v1", "List"),
    ("apps/v1", "Deployment"),
]
# YAML that PyYAML reads into what JSON has no room for, or reads at a cost: timestamps that are
# not dates, binary and set values, keys that are not strings, NaN, aliases (also to themselves),
# deep nesting, merge keys.
YAML_SNIPPETS = [
    "2001-13-45",
    "2001-12-14t21:59:43.10+25:00",
    "0000-01-01",
    "!!binary AAAA",
    "!!set {a, b}",
    "!!omap [a: 1]",
    ".nan",
    "-.inf",
    "{2001-01-01: a}",
    "{1: a, null: b, true: c, 1.5: d}",
    "&a [*a]",
    "&b {x: *b}",
    "<<: {a: 1}",
    "[" * 3000,
    "{a: " * 3000,
    "\n---\n",
    "\n...\n",
    "? [1]\n: 2",
]
# Objects a refused batch must leave as they are: more than this and the datastore starts afresh.
MAX_STORED = 100


class AdmissionHarness:
    def __init__(self) -> None:
        self.server: MemoryServer
        self.store: Datastore
        self.name = ""
        self.fresh_store()

    def fresh_store(self) -> None:
        if self.name:
            forget_server(self.name)
        self.name = f"fuzz-admission-{uuid.uuid4().hex[:8]}"
        self.server = memory_server(self.name)
        self.store = open_datastore(f"memory://{self.name}")

    # -- objects --------------------------------------------------------------------------------

    def labels(self, v: Values) -> Any:
        return v.maybe(
            {v.string_or(LABEL_KEYS): v.string_or(["web", "", "a" * 64]) for _ in range(v.fdp.ConsumeIntInRange(0, 3))}
        )

    def selector(self, v: Values) -> Any:
        sel: dict[str, Any] = {}
        if v.chance(60):
            sel["matchLabels"] = self.labels(v)
        if v.chance(30):
            sel["matchExpressions"] = v.maybe(
                [
                    {
                        "key": v.maybe(v.string_or(LABEL_KEYS)),
                        "operator": v.maybe(v.string_or(["In", "NotIn", "Exists", "DoesNotExist"])),
                        "values": v.maybe([v.string_or(["a", "b"]) for _ in range(v.fdp.ConsumeIntInRange(0, 2))]),
                    }
                ]
            )
        return v.maybe(sel)

    def port(self, v: Values) -> Any:
        port: dict[str, Any] = {"protocol": v.maybe(v.string_or(["TCP", "UDP", "SCTP"]))}
        if v.chance(70):
            port["port"] = v.maybe(v.fdp.ConsumeIntInRange(-1, 70000) if v.chance(60) else v.string_or(["http", "dns"]))
        if v.chance(20):
            port["endPort"] = v.maybe(v.fdp.ConsumeIntInRange(-1, 70000))
        return v.maybe(port)

    def peer(self, v: Values) -> Any:
        peer: dict[str, Any] = {}
        for field in ("podSelector", "namespaceSelector"):
            if v.chance(40):
                peer[field] = self.selector(v)
        if v.chance(30):
            peer["ipBlock"] = v.maybe({"cidr": v.maybe(v.string_or(CIDRS)), "except": v.maybe([v.string_or(CIDRS)])})
        return v.maybe(peer)

    def rules(self, v: Values, peers: str) -> Any:
        return v.maybe(
            [
                {
                    "ports": v.maybe([self.port(v) for _ in range(v.fdp.ConsumeIntInRange(0, 2))]),
                    peers: v.maybe([self.peer(v) for _ in range(v.fdp.ConsumeIntInRange(0, 2))]),
                }
                for _ in range(v.fdp.ConsumeIntInRange(0, 2))
            ]
        )

    def spec(self, v: Values, kind: str) -> Any:
        if kind == "Pod":
            container = {
                "name": v.maybe(v.string_or(["app", "side"])),
                "image": v.maybe(v.string_or(["busybox"])),
                "ports": v.maybe(
                    [
                        {
                            "name": v.maybe(v.string_or(["http", "dns"])),
                            "containerPort": v.maybe(v.fdp.ConsumeIntInRange(-1, 70000)),
                            "protocol": v.maybe(v.string_or(["TCP", "UDP"])),
                        }
                    ]
                ),
            }
            return {"containers": v.maybe([container] * v.fdp.ConsumeIntInRange(0, 2))}
        if kind == "NetworkPolicy":
            return {
                "podSelector": self.selector(v),
                "ingress": self.rules(v, "from"),
                "egress": self.rules(v, "to"),
                "policyTypes": v.maybe(
                    [v.string_or(["Ingress", "Egress"]) for _ in range(v.fdp.ConsumeIntInRange(0, 3))]
                ),
            }
        if kind == "IPPool":
            return {"cidr": v.maybe(v.string_or(CIDRS)), "blockSize": v.maybe(v.fdp.ConsumeIntInRange(-1, 130))}
        return v.json(2)

    def obj(self, v: Values, depth: int = 0) -> Any:
        api_version, kind = v.pick(KINDS)
        obj: dict[str, Any] = {"apiVersion": v.maybe(api_version, 95), "kind": v.maybe(kind, 95)}
        if kind == "List" and depth == 0:
            obj["items"] = [self.obj(v, 1) for _ in range(v.fdp.ConsumeIntInRange(0, 3))]
            return obj
        meta: dict[str, Any] = {"name": v.maybe(v.string_or(NAMES))}
        if v.chance(50):
            meta["namespace"] = v.maybe(v.string_or(NAMES))
        if v.chance(30):
            meta["labels"] = self.labels(v)
        if v.chance(15):
            meta["annotations"] = v.maybe({v.text(20): v.text(20)})
        if v.chance(10):
            meta["resourceVersion"] = v.maybe(str(v.fdp.ConsumeIntInRange(0, 50)))
        obj["metadata"] = v.maybe(meta, 95)
        if v.chance(90):
            obj["spec"] = v.maybe(self.spec(v, kind), 90)
        if v.chance(10):
            obj[v.text(10)] = v.json(1)  # an unknown field
        if v.chance(5):
            obj["status"] = v.json(2)
        return obj

    def text(self, v: Values, objects: list[Any]) -> str:
        """The objects as YAML or JSON text, perhaps cut or spliced with fuzzed text."""
        way = v.fdp.ConsumeIntInRange(0, 3)
        if way == 0:
            return v.fdp.ConsumeUnicodeNoSurrogates(v.fdp.ConsumeIntInRange(0, 3000))
        if way == 1 and len(objects) == 1:
            text = json.dumps(objects[0])
        else:
            text = yaml.safe_dump_all(objects, sort_keys=False)
        for _ in range(v.fdp.ConsumeIntInRange(0, 2)):
            at = v.fdp.ConsumeIntInRange(0, len(text))
            if v.chance(50):
                inserted = v.pick(YAML_SNIPPETS)
            else:
                inserted = v.fdp.ConsumeUnicodeNoSurrogates(v.fdp.ConsumeIntInRange(0, 200))
            text = text[:at] + inserted + text[at:]
        if v.chance(2):  # rare: a refused bomb still costs its 100,000 values
            text += self.alias_bomb(v.fdp.ConsumeIntInRange(1, 7))
        return text

    @staticmethod
    def alias_bomb(levels: int) -> str:
        """A few lines that stand for 10**levels values once their aliases are expanded."""
        lines = ["---", "apiVersion: v1", "kind: Namespace", "metadata: {name: bomb}", 'spec: {x0: &x0 ["lol"]']
        for i in range(1, levels + 1):
            lines.append(f"  , x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]")
        lines.append("}")
        return "\n".join(lines) + "\n"

    # -- one execution --------------------------------------------------------------------------

    def one_input(self, data: bytes) -> None:
        v = Values(atheris.FuzzedDataProvider(data))
        objects = [self.obj(v) for _ in range(v.fdp.ConsumeIntInRange(1, 4))]
        if v.chance(60):
            try:
                docs = parse_documents("fuzz.yaml", self.text(v, objects))
                _prepare(docs, v.pick([None, "web", v.text(10)]))
            except UserError:
                return
            objects = [doc.obj for doc in docs]
        self.apply(objects)

    def apply(self, objects: list[Any]) -> None:
        if len(self.server.objects) > MAX_STORED:
            self.fresh_store()
        before = (self.server.revision, copy.deepcopy(self.server.objects))
        try:
            applied = self.store.apply_many(objects, admit=admit_all)
        except (AdmissionErrors, Conflict, ValueError):
            after = (self.server.revision, self.server.objects)
            assert after == before, "a refused batch changed the datastore"
            return
        for obj, _verdict in applied:
            encode(obj)  # as etcd stores it: raises for what JSON cannot hold


def main() -> None:
    fuzz(AdmissionHarness)


if __name__ == "__main__":
    main()
