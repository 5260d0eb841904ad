"""Two of the API server's rules as `tulle apply` and `tulle delete` meet them, on a real etcd:

- an update of a Pod changes its spec only where ValidatePodUpdate lets it; a refused one names
  each field (`field is immutable`) and writes nothing, while labels, annotations and images
  still change (`tulle label` too);
- deleting a Namespace deletes its Pods, NetworkPolicies and WorkloadEndpoints, and nothing of
  another namespace.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.unit.conftest import Tulle
from tests.unit.test_resources_cli import contents, write
from tulle.datastore.base import Datastore, Obj
from tulle.datastore.etcd_client import EtcdClient
from tulle.lab.etcd_server import EtcdServer
from tulle.model.endpoints import WorkloadEndpoint
from tulle.model.kinds import NAMESPACE, NETWORK_POLICY, POD, WORKLOAD_ENDPOINT


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> Any:
    client = EtcdClient(etcd_server.url, tls=etcd_server.client_tls)
    yield client
    client.close()


WEB: Obj = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {
        "nodeName": "node1",
        "containers": [{"name": "main", "image": "busybox", "ports": [{"name": "http", "containerPort": 80}]}],
    },
}
SHOP: Obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}


def _apply(tulle: Tulle, tmp_path: Any, *objects: Obj) -> tuple[int, str, str]:
    return tulle("apply", "-f", write(tmp_path, yaml.safe_dump_all(objects, sort_keys=False)))


def test_apply_refuses_a_pod_update_the_api_server_refuses_and_writes_nothing(
    tulle: Tulle, tmp_path: Any, etcd: EtcdClient, prefix: str
) -> None:
    assert _apply(tulle, tmp_path, SHOP, WEB)[0] == 0
    before = contents(etcd, prefix)
    moved = copy.deepcopy(WEB)
    moved["spec"]["nodeName"] = "node2"
    moved["spec"]["containers"][0]["ports"][0]["containerPort"] = 8080
    code, out, err = _apply(tulle, tmp_path, moved)
    assert (code, out) == (1, "")
    assert "Error from server (Invalid): error when applying" in err
    assert "spec.containers[0].ports[0].containerPort: Forbidden: field is immutable" in err
    assert "spec.nodeName: Forbidden: field is immutable" in err
    assert "pod updates may not change fields other than `spec.containers[*].image`" in err
    assert contents(etcd, prefix) == before  # nothing written


def test_labels_annotations_and_images_of_a_pod_still_change(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    assert _apply(tulle, tmp_path, SHOP, WEB)[0] == 0
    changed = copy.deepcopy(WEB)
    changed["metadata"]["labels"]["tier"] = "front"
    changed["metadata"]["annotations"] = {"note": "x"}
    changed["spec"]["containers"][0]["image"] = "nginx"
    code, out, err = _apply(tulle, tmp_path, changed)
    assert (code, out) == (0, "pod/web configured\n"), err
    assert tulle.ok("label", "pod", "web", "-n", "shop", "team=blue") == "pod/web labeled\n"
    stored = store.get(POD, "web", "shop")
    assert stored is not None and stored["spec"]["containers"][0]["image"] == "nginx"
    assert stored["metadata"]["labels"] == {"app": "web", "tier": "front", "team": "blue"}


def test_delete_namespace_takes_its_pods_policies_and_endpoints(tulle: Tulle, tmp_path: Any, store: Datastore) -> None:
    other = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "shop"},
        "spec": {"podSelector": {}},
    }
    elsewhere = copy.deepcopy(WEB)
    elsewhere["metadata"]["namespace"] = "other"
    assert _apply(tulle, tmp_path, SHOP, other, WEB, elsewhere, policy)[0] == 0
    for namespace in ("shop", "other"):  # what the agent of node1 published for the two pods
        endpoint = WorkloadEndpoint(namespace, "web", "node1", "tulle", f"c-{namespace}", "eth0", ("10.0.0.1",))
        store.create(endpoint.to_object())
    assert tulle.ok("delete", "ns", "shop") == 'namespace "shop" deleted\n'
    assert store.get(NAMESPACE, "shop") is None
    for kind in (POD, NETWORK_POLICY, WORKLOAD_ENDPOINT):
        assert store.list(kind, "shop")[0] == [], kind.kind
    assert [e["metadata"]["namespace"] for e in store.list(WORKLOAD_ENDPOINT)[0]] == ["other"]
    assert store.get(POD, "web", "other") is not None
