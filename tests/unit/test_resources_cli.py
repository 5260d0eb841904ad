"""`tulle apply|get|delete|label` against a real etcd, and the transactions under them.

Invariants guarded here:
- a multi-document apply is all or nothing: one refused object and the datastore is untouched
  (also when it holds more objects than one etcd transaction and is written in batches);
- an admission decision cannot be overtaken by a concurrent writer (the reads guard the commit);
- deleting a Namespace deletes what is in it in the same transaction.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Sequence
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.unit.conftest import Tulle
from tulle.datastore.base import AtomicWriter, Conflict, Datastore, PartlyApplied, Reader
from tulle.datastore.etcd import APPLY_BATCH
from tulle.datastore.etcd_client import EtcdClient
from tulle.lab.etcd_server import EtcdServer
from tulle.model.kinds import IP_POOL, NAMESPACE, NETWORK_POLICY, POD
from tulle.model.validation import AdmissionErrors, admit_all

Obj = dict[str, Any]


def dump(*docs: Obj) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def write(tmp_path: Any, text: str, name: str = "in.yaml") -> str:
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


@pytest.fixture
def datastore(etcd_server: EtcdServer) -> Any:
    """The session's etcd, key by key: to see that nothing at all was written."""
    client = EtcdClient(etcd_server.url, tls=etcd_server.client_tls)
    yield client
    client.close()


def contents(datastore: EtcdClient, prefix: str) -> list[tuple[str, int]]:
    """Every key under the test's prefix with its revision: equal before and after = nothing written."""
    kvs, _ = datastore.list(prefix + "/")
    return [(kv.key, kv.mod_revision) for kv in kvs]


@pytest.fixture
def atomic(store: Datastore) -> AtomicWriter:
    assert isinstance(store, AtomicWriter)
    return store


def ns(name: str, **labels: str) -> Obj:
    meta: Obj = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def netpol(name: str, namespace: str = "default", spec: Obj | None = None, **labels: str) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = labels
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": spec if spec is not None else {"podSelector": {}},
    }


def pod(name: str, namespace: str = "default", **labels: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "containers": [{"name": "main", "image": "busybox", "ports": [{"containerPort": 80, "name": "http"}]}]
        },
    }


def pool(name: str, cidr: str) -> Obj:
    return {
        "apiVersion": "tulle.dev/v1",
        "kind": "IPPool",
        "metadata": {"name": name},
        "spec": {"cidr": cidr},
    }


BAD_PORT = {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 79}]}]}


# --- apply ------------------------------------------------------------------------------------------


def test_apply_creates_every_object_and_says_so_like_kubectl(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    path = write(
        tmp_path,
        dump(ns("web"), netpol("allow", "web"), pod("p1", "web", app="web"), pool("a", "10.0.0.0/16")),
    )
    out = tulle.ok("apply", "-f", path)
    assert out.splitlines() == [
        "namespace/web created",
        "networkpolicy.networking.k8s.io/allow created",
        "pod/p1 created",
        "ippool.tulle.dev/a created",
    ]
    stored = store.get(NETWORK_POLICY, "allow", "web")
    assert stored is not None
    assert stored["spec"]["policyTypes"] == ["Ingress"]  # defaulted as the API server does
    assert store.get(NAMESPACE, "web")["metadata"]["labels"] == {"kubernetes.io/metadata.name": "web"}  # type: ignore[index]
    assert store.get(IP_POOL, "a")["spec"]["blockSize"] == 26  # type: ignore[index]


def test_apply_writes_all_objects_in_one_transaction(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(ns("web"), netpol("a", "web"), netpol("b", "web"))))
    revisions = {
        store.get(NAMESPACE, "web")["metadata"]["resourceVersion"],  # type: ignore[index]
        store.get(NETWORK_POLICY, "a", "web")["metadata"]["resourceVersion"],  # type: ignore[index]
        store.get(NETWORK_POLICY, "b", "web")["metadata"]["resourceVersion"],  # type: ignore[index]
    }
    assert len(revisions) == 1


def test_apply_again_is_unchanged_and_a_change_is_configured(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    path = write(tmp_path, dump(netpol("a"), netpol("b")))
    tulle.ok("apply", "-f", path)
    uid = store.get(NETWORK_POLICY, "a", "default")["metadata"]["uid"]  # type: ignore[index]
    assert tulle.ok("apply", "-f", path).splitlines() == [
        "networkpolicy.networking.k8s.io/a unchanged",
        "networkpolicy.networking.k8s.io/b unchanged",
    ]
    changed = write(tmp_path, dump(netpol("a", app="x"), netpol("b")), "changed.yaml")
    assert tulle.ok("apply", "-f", changed).splitlines() == [
        "networkpolicy.networking.k8s.io/a configured",
        "networkpolicy.networking.k8s.io/b unchanged",
    ]
    after = store.get(NETWORK_POLICY, "a", "default")
    assert after is not None
    assert after["metadata"]["uid"] == uid
    assert after["metadata"]["labels"] == {"app": "x"}


def test_a_refused_last_document_leaves_the_datastore_unchanged(
    tulle: Tulle, tmp_path: Any, datastore: EtcdClient, prefix: str
) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(netpol("existing")), "first.yaml"))
    before = contents(datastore, prefix)
    docs = [
        ns("web"),
        netpol("existing", app="changed"),
        pool("a", "10.0.0.0/16"),
        netpol("bad", spec=BAD_PORT),
    ]
    code, out, err = tulle("apply", "-f", write(tmp_path, dump(*docs)))
    assert code == 1
    assert out == ""
    assert "document 4" in err
    assert (
        'NetworkPolicy.networking.k8s.io "bad" is invalid: '
        "spec.ingress[0].ports[0].endPort: Invalid value: 79: must be greater than or equal to port"
    ) in err
    assert "Error from server (Invalid)" in err
    assert "nothing was applied: 1 of 4 objects refused" in err
    assert contents(datastore, prefix) == before


def test_apply_of_more_objects_than_one_etcd_transaction_holds_writes_them_all(
    tulle: Tulle, tmp_path: Any, store: Datastore
) -> None:
    """A real policy set is bigger than etcd's 128 operations a transaction; the Namespace comes
    last in the file, as it may in a directory, and is still written before what is in it."""
    many = 3 * APPLY_BATCH + 7
    docs = [netpol(f"p{i}", "bulk") for i in range(many)] + [ns("bulk")]
    out = tulle.ok("apply", "-f", write(tmp_path, dump(*docs))).splitlines()
    assert out[0] == "networkpolicy.networking.k8s.io/p0 created"
    assert out[-1] == "namespace/bulk created"
    assert len(out) == many + 1
    assert sorted(p["metadata"]["name"] for p in store.list(NETWORK_POLICY, "bulk")[0]) == sorted(
        f"p{i}" for i in range(many)
    )
    again = tulle.ok("apply", "-f", write(tmp_path, dump(*docs)))
    assert again.count(" unchanged") == many + 1


def test_a_refused_object_among_many_leaves_the_datastore_unchanged(
    tulle: Tulle, tmp_path: Any, datastore: EtcdClient, prefix: str
) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(ns("bulk")), "ns.yaml"))
    before = contents(datastore, prefix)
    docs = [netpol(f"p{i}", "bulk") for i in range(3 * APPLY_BATCH)] + [netpol("bad", "bulk", spec=BAD_PORT)]
    code, out, err = tulle("apply", "-f", write(tmp_path, dump(*docs)))
    assert code == 1
    assert out == ""
    assert f"nothing was applied: 1 of {3 * APPLY_BATCH + 1} objects refused" in err
    assert contents(datastore, prefix) == before


def test_every_refused_object_is_reported(tulle: Tulle, tmp_path: Any, datastore: EtcdClient, prefix: str) -> None:
    docs = [netpol("bad1", spec={}), netpol("fine"), netpol("bad2", spec={"podSelector": {}, "foo": 1})]
    code, _, err = tulle("apply", "-f", write(tmp_path, dump(*docs)))
    assert code == 1
    assert '(document 1): NetworkPolicy.networking.k8s.io "bad1" is invalid: spec.podSelector: Required value' in err
    assert 'Error from server (BadRequest): error when applying "' in err
    assert '(document 3): NetworkPolicy in version "v1" cannot be handled as a NetworkPolicy: ' in err
    assert 'unknown field "spec.foo"' in err
    assert contents(datastore, prefix) == []


def test_apply_takes_a_list_json_stdin_and_directories(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    listed = {"apiVersion": "v1", "kind": "List", "items": [netpol("l1"), netpol("l2")]}
    assert tulle.ok("apply", "-f", write(tmp_path, dump(listed))).count("created") == 2
    assert (
        tulle.ok("apply", "-f", "-", stdin=json.dumps(netpol("j1"))) == "networkpolicy.networking.k8s.io/j1 created\n"
    )
    directory = tmp_path / "dir"
    directory.mkdir()
    write(directory, dump(netpol("d1")), "a.yaml")
    write(directory, json.dumps(netpol("d2")), "b.json")
    write(directory, "not: applied", "README.md")
    assert tulle.ok("apply", "-f", str(directory)).splitlines() == [
        "networkpolicy.networking.k8s.io/d1 created",
        "networkpolicy.networking.k8s.io/d2 created",
    ]
    names = [o["metadata"]["name"] for o in store.list(NETWORK_POLICY, "default")[0]]
    assert names == ["d1", "d2", "j1", "l1", "l2"]


def test_apply_reports_the_item_of_a_list(tulle: Tulle, tmp_path: Any) -> None:
    listed = {"apiVersion": "v1", "kind": "List", "items": [netpol("l1"), netpol("l2", spec={})]}
    code, _, err = tulle("apply", "-f", write(tmp_path, dump(listed)))
    assert code == 1
    assert "(document 1, item 2)" in err


def test_apply_refuses_the_same_object_twice(tulle: Tulle, tmp_path: Any, datastore: EtcdClient, prefix: str) -> None:
    code, _, err = tulle("apply", "-f", write(tmp_path, dump(netpol("a"), ns("web"), netpol("a", app="x"))))
    assert code == 1
    assert "both define networkpolicy.networking.k8s.io/a in namespace default" in err
    assert contents(datastore, prefix) == []


def test_apply_into_a_missing_namespace_is_not_found(
    tulle: Tulle, tmp_path: Any, datastore: EtcdClient, prefix: str
) -> None:
    code, _, err = tulle("apply", "-f", write(tmp_path, dump(netpol("a"), netpol("b", "nowhere"))))
    assert code == 1
    assert 'Error from server (NotFound): error when applying "' in err
    assert '(document 2): namespaces "nowhere" not found' in err
    assert contents(datastore, prefix) == []


def test_apply_namespace_flag_fills_in_and_must_agree(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(ns("web")), "ns.yaml"))
    policy = netpol("a")
    del policy["metadata"]["namespace"]
    tulle.ok("apply", "-n", "web", "-f", write(tmp_path, dump(policy), "p.yaml"))
    assert store.get(NETWORK_POLICY, "a", "web") is not None
    code, _, err = tulle("apply", "-n", "web", "-f", write(tmp_path, dump(netpol("b", "default")), "q.yaml"))
    assert code == 1
    assert 'the namespace from the provided object "default" does not match the namespace "web"' in err


def test_apply_dry_run_writes_nothing(tulle: Tulle, tmp_path: Any, datastore: EtcdClient, prefix: str) -> None:
    out = tulle.ok("apply", "--dry-run", "-f", write(tmp_path, dump(ns("web"), netpol("a", "web"))))
    assert out.splitlines() == [
        "namespace/web created (server dry run)",
        "networkpolicy.networking.k8s.io/a created (server dry run)",
    ]
    assert contents(datastore, prefix) == []


def test_overlapping_pools_are_refused_in_one_file_and_against_the_store(
    tulle: Tulle, tmp_path: Any, datastore: EtcdClient, prefix: str
) -> None:
    code, _, err = tulle("apply", "-f", write(tmp_path, dump(pool("a", "10.0.0.0/16"), pool("b", "10.0.5.0/24"))))
    assert code == 1
    assert 'spec.cidr: Invalid value: "10.0.5.0/24": overlaps IPPool a (10.0.0.0/16)' in err
    assert contents(datastore, prefix) == []
    tulle.ok("apply", "-f", write(tmp_path, dump(pool("a", "10.0.0.0/16")), "a.yaml"))
    code, _, err = tulle("apply", "-f", write(tmp_path, dump(pool("b", "10.0.0.0/8")), "b.yaml"))
    assert code == 1
    assert 'IPPool.tulle.dev "b" is invalid: spec.cidr: Invalid value: "10.0.0.0/8": overlaps IPPool a' in err


def test_a_pool_cidr_cannot_change(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(pool("a", "10.0.0.0/16")), "a.yaml"))
    code, _, err = tulle("apply", "-f", write(tmp_path, dump(pool("a", "10.9.0.0/16")), "b.yaml"))
    assert code == 1
    assert 'spec.cidr: Invalid value: "10.9.0.0/16": field is immutable' in err
    assert store.get(IP_POOL, "a")["spec"]["cidr"] == "10.0.0.0/16"  # type: ignore[index]


def test_apply_keeps_the_status_others_wrote(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    path = write(tmp_path, dump(pod("p1", app="a")))
    tulle.ok("apply", "-f", path)
    current = store.get(POD, "p1", "default")
    assert current is not None
    current["status"] = {"phase": "Running", "podIP": "10.0.0.5"}
    store.update(current)
    with_status = pod("p1", app="b")
    with_status["status"] = {"phase": "Failed"}  # status in a file is not applied, as with kubectl
    tulle.ok("apply", "-f", write(tmp_path, dump(with_status), "b.yaml"))
    after = store.get(POD, "p1", "default")
    assert after is not None
    assert after["status"] == {"phase": "Running", "podIP": "10.0.0.5"}
    assert after["metadata"]["labels"] == {"app": "b"}


def test_get_output_applies_back_unchanged(tulle: Tulle, tmp_path: Any) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(ns("web"), netpol("a", "web", app="x"))))
    exported = tulle.ok("get", "netpol", "a", "-n", "web", "-o", "yaml")
    assert tulle.ok("apply", "-f", write(tmp_path, exported, "exported.yaml")) == (
        "networkpolicy.networking.k8s.io/a unchanged\n"
    )


def test_apply_with_a_stale_resource_version_is_a_conflict(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(netpol("a"))))
    exported = yaml.safe_load(tulle.ok("get", "netpol", "a", "-o", "yaml"))
    tulle.ok("label", "netpol", "a", "x=y")
    exported["metadata"]["labels"] = {"z": "1"}
    code, _, err = tulle("apply", "-f", write(tmp_path, dump(exported), "stale.yaml"))
    assert code == 1
    assert "Error from server (Conflict): Operation cannot be fulfilled on networkpolicies.networking.k8s.io" in err
    assert store.get(NETWORK_POLICY, "a", "default")["metadata"]["labels"] == {"x": "y"}  # type: ignore[index]


def test_apply_without_objects_or_file_is_an_error(tulle: Tulle, tmp_path: Any) -> None:
    code, _, err = tulle("apply", "-f", write(tmp_path, "---\n"))
    assert (code, err) == (1, "error: no objects passed to apply\n")
    code, _, err = tulle("apply", "-f", str(tmp_path / "missing.yaml"))
    assert code == 1
    assert "does not exist" in err
    code, _, err = tulle("apply", "-f", write(tmp_path, "a: [", "broken.yaml"))
    assert code == 1
    assert "error parsing" in err


def test_unquoted_yaml_timestamps_are_taken_as_strings(tulle: Tulle, tmp_path: Any) -> None:
    text = """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a, creationTimestamp: 2024-01-01T00:00:00Z}
        spec: {podSelector: {}}
    """
    assert tulle.ok("apply", "-f", write(tmp_path, text)) == "networkpolicy.networking.k8s.io/a created\n"


# --- get --------------------------------------------------------------------------------------------


def test_get_lists_a_table(tulle: Tulle, tmp_path: Any) -> None:
    tulle.ok(
        "apply",
        "-f",
        write(tmp_path, dump(netpol("a", spec={"podSelector": {"matchLabels": {"app": "web"}}}))),
    )
    lines = tulle.ok("get", "netpol").splitlines()
    assert lines[0].split() == ["NAME", "POD-SELECTOR", "AGE"]
    assert lines[1].split()[:2] == ["a", "app=web"]


@pytest.mark.parametrize(
    "name",
    ["networkpolicy", "networkpolicies", "netpol", "NetworkPolicy", "networkpolicies.networking.k8s.io"],
)
def test_get_takes_kubectl_names_for_a_kind(tulle: Tulle, tmp_path: Any, name: str) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(netpol("a"))))
    assert tulle.ok("get", name, "-o", "name") == "networkpolicy.networking.k8s.io/a\n"


def test_get_short_names(tulle: Tulle, tmp_path: Any) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(ns("web"), pod("p1", "web"))))
    assert tulle.ok("get", "ns", "-o", "name") == "namespace/web\n"
    assert tulle.ok("get", "po", "-n", "web", "-o", "name") == "pod/p1\n"
    assert tulle.ok("get", "po/p1", "-n", "web", "-o", "name") == "pod/p1\n"


def test_get_json_of_an_empty_list(tulle: Tulle) -> None:
    assert json.loads(tulle.ok("get", "networkpolicies", "-o", "json")) == {
        "apiVersion": "v1",
        "kind": "List",
        "items": [],
        "metadata": {"resourceVersion": ""},
    }
    assert list(json.loads(tulle.ok("get", "ns", "-o", "json"))) == [
        "apiVersion",
        "kind",
        "items",
        "metadata",
    ]


def test_get_json_list_and_single_object(tulle: Tulle, tmp_path: Any) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(netpol("a"), netpol("b"))))
    listed = json.loads(tulle.ok("get", "netpol", "-o", "json"))
    assert [o["metadata"]["name"] for o in listed["items"]] == ["a", "b"]
    one = json.loads(tulle.ok("get", "netpol", "a", "-o", "json"))
    assert one["kind"] == "NetworkPolicy"
    assert one["metadata"]["name"] == "a"
    assert one["metadata"]["resourceVersion"]


def test_get_missing_is_not_found(tulle: Tulle) -> None:
    code, out, err = tulle("get", "netpol", "x")
    assert (code, out) == (1, "")
    assert err == 'Error from server (NotFound): networkpolicies.networking.k8s.io "x" not found\n'
    code, _, err = tulle("get", "ns", "x", "-o", "json")
    assert (code, err) == (1, 'Error from server (NotFound): namespaces "x" not found\n')


def test_get_empty_table_says_no_resources_found(tulle: Tulle) -> None:
    code, out, err = tulle("get", "netpol", "-n", "web")
    assert (code, out, err) == (0, "", "No resources found in web namespace.\n")


def test_get_namespace_defaults_to_default_and_all_namespaces(tulle: Tulle, tmp_path: Any) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(ns("web"), netpol("a"), netpol("b", "web"))))
    assert tulle.ok("get", "netpol", "-o", "name") == "networkpolicy.networking.k8s.io/a\n"
    lines = tulle.ok("get", "netpol", "-A").splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "POD-SELECTOR", "AGE"]
    assert [line.split()[:2] for line in lines[1:]] == [["default", "a"], ["web", "b"]]


def test_get_by_label_selector(tulle: Tulle, tmp_path: Any) -> None:
    pols = [netpol("a", app="web", tier="fe"), netpol("b", app="db"), netpol("c")]
    tulle.ok("apply", "-f", write(tmp_path, dump(*pols)))

    def names(selector: str) -> list[str]:
        return [
            o["metadata"]["name"] for o in json.loads(tulle.ok("get", "netpol", "-l", selector, "-o", "json"))["items"]
        ]

    assert names("app=web") == ["a"]
    assert names("app!=web") == ["b", "c"]
    assert names("app in (web,db)") == ["a", "b"]
    assert names("app notin (web)") == ["b", "c"]
    assert names("app") == ["a", "b"]
    assert names("!app") == ["c"]
    assert names("app=web,tier=fe") == ["a"]
    code, _, err = tulle("get", "netpol", "-l", "bad key=x")
    assert code == 1
    assert "unable to parse requirement" in err


def test_get_pods_wide_and_labels(tulle: Tulle, tmp_path: Any) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(pod("p1", app="web"))))
    lines = tulle.ok("get", "pods", "-o", "wide", "--show-labels").splitlines()
    assert lines[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE", "LABELS"]
    assert lines[1].split()[:4] == ["p1", "0/1", "Pending", "0"]
    assert lines[1].split()[-1] == "app=web"


def test_flags_may_come_between_names_as_with_kubectl(tulle: Tulle, tmp_path: Any) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(ns("web"), netpol("a", "web"), netpol("b", "web"))))
    assert tulle.ok("get", "netpol", "-n", "web", "a", "-o", "name", "b").splitlines() == [
        "networkpolicy.networking.k8s.io/a",
        "networkpolicy.networking.k8s.io/b",
    ]
    assert tulle.ok("label", "netpol", "a", "-n", "web", "k=v") == "networkpolicy.networking.k8s.io/a labeled\n"
    assert tulle.ok("delete", "netpol", "-n", "web", "b") == 'networkpolicy.networking.k8s.io "b" deleted\n'


def test_get_unknown_kind(tulle: Tulle) -> None:
    code, _, err = tulle("get", "frobs")
    assert code == 1
    assert 'the server doesn\'t have a resource type "frobs"' in err


# --- delete -----------------------------------------------------------------------------------------


def test_delete_says_deleted_and_not_found(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(netpol("a"))))
    assert tulle.ok("delete", "netpol", "a") == 'networkpolicy.networking.k8s.io "a" deleted\n'
    assert store.get(NETWORK_POLICY, "a", "default") is None
    code, _, err = tulle("delete", "networkpolicy", "a")
    assert (code, err) == (
        1,
        'Error from server (NotFound): networkpolicies.networking.k8s.io "a" not found\n',
    )
    assert tulle.ok("delete", "netpol", "a", "--ignore-not-found") == ""


def test_deleting_a_namespace_deletes_what_is_in_it(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    docs = [ns("web"), ns("db"), netpol("a", "web"), pod("p1", "web"), netpol("keep", "db"), pod("web", "db")]
    tulle.ok("apply", "-f", write(tmp_path, dump(*docs)))
    assert tulle.ok("delete", "ns", "web") == 'namespace "web" deleted\n'
    assert store.get(NAMESPACE, "web") is None
    assert store.list(NETWORK_POLICY, "web")[0] == []
    assert store.list(POD, "web")[0] == []
    assert [o["metadata"]["name"] for o in store.list(NETWORK_POLICY)[0]] == ["keep"]
    assert [o["metadata"]["name"] for o in store.list(POD)[0]] == ["web"]


def test_system_namespaces_cannot_be_deleted(tulle: Tulle) -> None:
    code, _, err = tulle("delete", "ns", "default")
    assert code == 1
    assert err == (
        'Error from server (Forbidden): namespaces "default" is forbidden: this namespace may not be deleted\n'
    )


# --- label ------------------------------------------------------------------------------------------


def test_label_adds_changes_with_overwrite_and_removes(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(netpol("a"))))

    def labels() -> Obj:
        return store.get(NETWORK_POLICY, "a", "default")["metadata"]["labels"]  # type: ignore[index,no-any-return]

    assert tulle.ok("label", "netpol", "a", "app=web", "tier=fe") == "networkpolicy.networking.k8s.io/a labeled\n"
    assert labels() == {"app": "web", "tier": "fe"}
    code, _, err = tulle("label", "netpol", "a", "app=db")
    assert (code, err) == (1, "error: 'app' already has a value (web), and --overwrite is false\n")
    assert labels() == {"app": "web", "tier": "fe"}
    tulle.ok("label", "netpol", "a", "app=db", "--overwrite")
    assert labels() == {"app": "db", "tier": "fe"}
    assert tulle.ok("label", "netpol/a", "tier-") == "networkpolicy.networking.k8s.io/a unlabeled\n"
    assert labels() == {"app": "db"}
    assert tulle.ok("label", "netpol", "a", "app=db") == "networkpolicy.networking.k8s.io/a not labeled\n"


def test_label_is_validated_like_apply(tulle: Tulle, tmp_path: Any, datastore: EtcdClient, prefix: str) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(ns("web"), pod("p1", "web"))))
    before = contents(datastore, prefix)
    code, _, err = tulle("label", "pod", "p1", "-n", "web", "bad key=x")
    assert code == 1
    assert err.startswith('Error from server (Invalid): Pod "p1" is invalid: metadata.labels: Invalid value: "bad key"')
    code, _, err = tulle("label", "ns", "web", "team=not ok")
    assert code == 1
    assert 'Namespace "web" is invalid: metadata.labels: Invalid value: "not ok"' in err
    assert contents(datastore, prefix) == before


def test_namespace_keeps_its_name_label(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    tulle.ok("apply", "-f", write(tmp_path, dump(ns("web"))))
    assert tulle.ok("label", "ns", "web", "kubernetes.io/metadata.name-") == "namespace/web not labeled\n"
    tulle.ok("label", "ns", "web", "kubernetes.io/metadata.name=other", "team=a", "--overwrite")
    assert store.get(NAMESPACE, "web")["metadata"]["labels"] == {  # type: ignore[index]
        "kubernetes.io/metadata.name": "web",
        "team": "a",
    }


def test_label_missing_object_and_bad_arguments(tulle: Tulle, tmp_path: Any) -> None:
    code, _, err = tulle("label", "pod", "nope", "a=b")
    assert (code, err) == (1, 'Error from server (NotFound): pods "nope" not found\n')
    tulle.ok("apply", "-f", write(tmp_path, dump(netpol("a"))))
    code, _, err = tulle("label", "netpol", "a", "justakey")
    assert code == 1
    assert "invalid label spec" in err
    code, _, err = tulle("label", "netpol", "a", "k=v", "k-")
    assert code == 1
    assert "can not both modify and remove" in err
    code, _, err = tulle("label", "wep", "a", "k=v")
    assert code == 1
    assert "written by the Tulle agents" in err


def test_the_installed_command_runs(etcd_server: EtcdServer, prefix: str, tmp_path: Any) -> None:
    path = write(tmp_path, dump(ns("web"), netpol("a", "web")))
    tulle = os.path.join(REPO, ".venv", "bin", "tulle")
    common = ["--datastore", etcd_server.url, "--prefix", prefix]
    done = subprocess.run([tulle, "apply", "-f", path, *common], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["namespace/web created", "networkpolicy.networking.k8s.io/a created"]
    done = subprocess.run([tulle, "get", "netpol", "zzz", "-n", "web", *common], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr == 'Error from server (NotFound): networkpolicies.networking.k8s.io "zzz" not found\n'


# --- the transactions under the commands ------------------------------------------------------------


def test_apply_many_retries_when_a_pool_appears_meanwhile_and_then_refuses_the_overlap(
    store: Datastore,
    atomic: AtomicWriter,
) -> None:
    """An address is never given twice: a pool created between admission and commit is seen."""
    calls = []

    def racing_admit(objects: Sequence[Obj], reader: Reader) -> list[Obj]:
        calls.append(1)
        out = admit_all(objects, reader)
        if len(calls) == 1:  # another writer slips a pool in after admission read the pools
            store.create(admit_all([pool("other", "10.0.0.0/8")])[0])
        return out

    with pytest.raises(AdmissionErrors) as info:
        atomic.apply_many([pool("mine", "10.1.0.0/16")], admit=racing_admit)
    assert "overlaps IPPool other" in str(info.value)
    assert len(calls) == 2
    assert store.get(IP_POOL, "mine") is None


def test_apply_many_is_guarded_by_the_namespace_it_read(store: Datastore, atomic: AtomicWriter) -> None:
    atomic.apply_many([ns("web")], admit=admit_all)
    calls = []

    def racing_admit(objects: Sequence[Obj], reader: Reader) -> list[Obj]:
        calls.append(1)
        out = admit_all(objects, reader)
        if len(calls) == 1:
            atomic.delete_namespace("web")  # deleted after admission saw it
        return out

    with pytest.raises(AdmissionErrors) as info:
        atomic.apply_many([netpol("a", "web")], admit=racing_admit)
    assert 'namespaces "web" not found' in str(info.value)
    assert len(calls) == 2
    assert store.list(NETWORK_POLICY, "web")[0] == []


def test_a_batched_apply_overtaken_by_another_writer_says_what_it_wrote(store: Datastore, atomic: AtomicWriter) -> None:
    """Checked whole, then written in batches: a namespace deleted between two batches stops
    the apply after the first, and the caller learns exactly which objects were written."""
    atomic.apply_many([ns("early"), ns("late")], admit=admit_all)
    docs = [netpol(f"e{i}", "early") for i in range(APPLY_BATCH)] + [netpol(f"l{i}", "late") for i in range(5)]
    calls = []

    def racing_admit(objects: Sequence[Obj], reader: Reader) -> list[Obj]:
        calls.append(len(objects))
        if len(calls) == 3:  # whole check, first batch, then this: the second batch
            atomic.delete_namespace("late")
        return admit_all(objects, reader)

    with pytest.raises(PartlyApplied) as info:
        atomic.apply_many(docs, admit=racing_admit)
    assert calls[:3] == [APPLY_BATCH + 5, APPLY_BATCH, 5]
    assert [obj["metadata"]["name"] for obj, _ in info.value.applied] == [f"e{i}" for i in range(APPLY_BATCH)]
    assert 'namespaces "late" not found' in str(info.value.cause)
    assert len(store.list(NETWORK_POLICY, "early")[0]) == APPLY_BATCH
    assert store.list(NETWORK_POLICY, "late")[0] == []


def test_apply_many_refuses_a_resource_version_for_an_object_that_is_gone(
    store: Datastore, atomic: AtomicWriter
) -> None:
    obj = netpol("a")
    obj["metadata"]["resourceVersion"] = "5"
    with pytest.raises(Conflict, match="does not exist"):
        atomic.apply_many([obj], admit=admit_all)
