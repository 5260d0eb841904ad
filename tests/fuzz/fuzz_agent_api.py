"""Fuzz the agent's unix-socket protocol: fuzzed request bytes (raw, or a CNI request whose fields
are fuzzed) handed to the real `_Handler` of tulle.agent.api over a socket pair, dispatched by
the agent's own `Agent.dispatch` to the real CniService on the in-memory datastore, with a pod
network that records what it is asked to make.

Properties, for every request:
- the answer is one JSON object, {"result": ...} or {"error": <the spec's error object>}, and never
  error 102 (the agent's "an exception nobody expected");
- it comes within 2 s;
- a request that failed leaves nothing behind: a failed ADD leaves no endpoint record, no IPAM
  allocation, no WorkloadEndpoint and no interface for its attachment, and changes nothing else;
  any other failed request changes nothing at all;
- after every request, the agent's records agree: each endpoint is ready, holds addresses in
  IPAM, is published and has its interface; nothing else does.

    python -m tests.fuzz.fuzz_agent_api [CORPUS_DIR] -runs=100000
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import atheris

with atheris.instrument_imports(include=["tulle"]):
    from tulle.agent import api
    from tulle.agent.cni_service import CniContext, CniService
    from tulle.agent.endpoints import EndpointRegistry, host_ifname_for
    from tulle.agent.main import Agent
    from tulle.agent.pending import PendingDeletes
    from tulle.datastore.factory import open_datastore
    from tulle.datastore.memory import forget_server, memory_server
    from tulle.ipam.allocator import NodeAllocator
    from tulle.model.endpoints import WorkloadEndpoint, handle_for
    from tulle.model.kinds import WORKLOAD_ENDPOINT
    from tulle.model.pools import parse_pool, pool_object

from tests.fakes import RecordingPodNetwork
from tests.fuzz.values import Values, fuzz, scratch_dir

POOLS = [parse_pool(pool_object("v4", "10.244.0.0/16", 26)), parse_pool(pool_object("v6", "fd00:10:244::/104", 122))]
COMMANDS = ["ADD", "ADD", "DEL", "CHECK", "GC", "STATUS", "AGENT_STATUS"]
MAX_SECONDS = 2.0
MAX_ENDPOINTS = 30  # then the agent starts afresh, so that each request stays cheap


@dataclass
class State:
    """What the agent holds, per attachment handle, in each of its records."""

    endpoints: dict[str, dict[str, Any]]
    allocations: dict[str, list[str]]
    published: dict[str, dict[str, Any]]
    interfaces: dict[str, str]  # host interface -> handle-less name
    pending: list[str]

    def without(self, handle: str, host_ifname: str) -> State:
        return State(
            {h: e for h, e in self.endpoints.items() if h != handle},
            {h: a for h, a in self.allocations.items() if h != handle},
            {h: w for h, w in self.published.items() if h != handle},
            {i: n for i, n in self.interfaces.items() if i != host_ifname},
            self.pending,
        )


class AgentApiHarness:
    def __init__(self) -> None:
        self.base = scratch_dir("tulle-fuzz-agent-")
        self.netns = os.path.join(self.base, "netns")
        with open(self.netns, "w"):
            pass
        self.name = ""
        self.results: list[dict[str, Any]] = []
        self.fresh_agent()

    def fresh_agent(self) -> None:
        if self.name:
            forget_server(self.name)
            shutil.rmtree(self.state_dir, ignore_errors=True)
        self.name = f"fuzz-agent-{uuid.uuid4().hex[:8]}"
        memory_server(self.name)
        self.ds = open_datastore(f"memory://{self.name}")
        for pool in ("v4", "10.244.0.0/16", 26), ("v6", "fd00:10:244::/104", 122):
            self.ds.create(pool_object(*pool))
        self.state_dir = os.path.join(self.base, self.name)
        self.registry = EndpointRegistry(self.state_dir)
        self.pending = PendingDeletes(self.state_dir)
        self.allocator = NodeAllocator(self.ds, "me", lambda: POOLS)
        self.podnet = RecordingPodNetwork()
        ctx = CniContext(
            node="me",
            datastore=self.ds,
            registry=self.registry,
            allocator=self.allocator,
            pending=self.pending,
            families=lambda: [4, 6],
            pod_mtu=lambda: 1450,
            address_holders=self._holders,
            sync_policy=lambda: None,
            endpoints_changed=lambda _h: None,
            readiness_problems=lambda: [],
            remove_stray_interfaces=lambda: 0,
            podnet=self.podnet,
        )
        agent = SimpleNamespace(cni=CniService(ctx), status=SimpleNamespace(describe=lambda: {"ready": True}))
        self.server = SimpleNamespace(dispatch=lambda request: Agent.dispatch(agent, request))  # type: ignore[arg-type]

    def _holders(self, address: str) -> list[WorkloadEndpoint]:
        weps = [WorkloadEndpoint.from_object(o) for o in self.ds.list(WORKLOAD_ENDPOINT)[0]]
        return [w for w in weps if address in w.ips]

    # -- the records ---------------------------------------------------------------------------

    def state(self) -> State:
        weps = [WorkloadEndpoint.from_object(o) for o in self.ds.list(WORKLOAD_ENDPOINT)[0]]
        return State(
            endpoints={ep.handle: ep.to_dict() for ep in self.registry.all()},
            allocations={h: sorted(a) for h, a in self.allocator.allocations().items()},
            published={w.handle: WorkloadEndpoint.to_object(w) for w in weps},
            interfaces={name: pod.netns for name, pod in self.podnet.made.items()},
            pending=self.pending.names(),
        )

    def check_records_agree(self, state: State) -> None:
        assert all(ep["state"] == "ready" for ep in state.endpoints.values()), state.endpoints
        assert set(state.allocations) == set(state.endpoints), (state.allocations, state.endpoints)
        assert set(state.published) == set(state.endpoints), (state.published, state.endpoints)
        assert set(state.interfaces) == {ep["host_ifname"] for ep in state.endpoints.values()}, state.interfaces
        assert state.pending == [], state.pending

    # -- the input ------------------------------------------------------------------------------

    def request(self, v: Values) -> dict[str, Any]:
        config: dict[str, Any] = {"name": v.maybe(v.string_or(["tulle", "other"]), 95)}
        if v.chance(20):
            config["mtu"] = v.maybe(v.fdp.ConsumeIntInRange(0, 70000), 60)
        if v.chance(40):
            prev = v.pick(self.results) if self.results and v.chance(70) else v.json(3)
            config["prevResult"] = v.maybe(prev, 80)
        if v.chance(30):
            attachments = [
                {"containerID": v.maybe(v.string_or(["c1", "c2", "c3"])), "ifname": v.maybe("eth0")}
                for _ in range(v.fdp.ConsumeIntInRange(0, 3))
            ]
            config["cni.dev/valid-attachments"] = v.maybe(attachments)
        request: dict[str, Any] = {"command": v.maybe(v.string_or(COMMANDS, 12), 95)}
        for field, good in (
            ("containerID", ["c1", "c2", "c3", "C_4.x"]),
            ("ifname", ["eth0", "net1"]),
            ("netns", [self.netns, self.netns, "/run/netns/missing"]),
        ):
            if v.chance(95):
                request[field] = v.maybe(v.string_or(good), 95)
        if v.chance(85):
            args = {"K8S_POD_NAMESPACE": v.string_or(["web", "default"]), "K8S_POD_NAME": v.string_or(["a", "b.c"])}
            request["args"] = v.maybe({k: val for k, val in args.items() if v.chance(85)}, 95)
        request["config"] = v.maybe(config, 95)
        return request

    def data(self, v: Values) -> tuple[bytes, dict[str, Any] | None]:
        way = v.fdp.ConsumeIntInRange(0, 9)
        if way == 0:
            return v.fdp.ConsumeBytes(v.fdp.ConsumeIntInRange(0, 4000)), None
        if way == 1:
            return json.dumps(v.json(4)).encode(), None
        request = self.request(v)
        raw = json.dumps(request).encode()
        if way == 2:
            at = v.fdp.ConsumeIntInRange(0, len(raw))
            return raw[:at] + v.fdp.ConsumeBytes(v.fdp.ConsumeIntInRange(0, 40)) + raw[at:], None
        return raw, request

    # -- one execution --------------------------------------------------------------------------

    def exchange(self, data: bytes) -> bytes:
        """One connection: the request's bytes in, the handler's answer out."""
        client, served = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        answer: list[bytes] = []

        def talk() -> None:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            while chunk := client.recv(1 << 16):
                answer.append(chunk)

        talker = threading.Thread(target=talk)
        talker.start()
        try:
            api._Handler(served, "", self.server)  # type: ignore[arg-type]  # reads, dispatches, answers
        finally:
            served.close()
            talker.join(MAX_SECONDS)
            client.close()
        return b"".join(answer)

    def one_input(self, data: bytes) -> None:
        v = Values(atheris.FuzzedDataProvider(data))
        if len(self.registry.all()) > MAX_ENDPOINTS:
            self.fresh_agent()
            self.results.clear()
        raw, request = self.data(v)
        before = self.state()
        started = time.monotonic()
        answer = json.loads(self.exchange(raw))
        elapsed = time.monotonic() - started
        assert elapsed < MAX_SECONDS, f"the request took {elapsed:.1f} s"
        assert isinstance(answer, dict) and len(answer) == 1 and set(answer) <= {"result", "error"}, answer
        after = self.state()
        self.check_records_agree(after)
        if "result" in answer:
            if isinstance(answer["result"], dict) and "ips" in answer["result"]:
                self.results = [*self.results[-9:], answer["result"]]
            return
        error = answer["error"]
        assert isinstance(error.get("code"), int) and isinstance(error.get("msg"), str), error
        assert error["code"] != 102, f"the agent failed on a request: {error}"
        self.check_nothing_left(request, before, after)

    def check_nothing_left(self, request: dict[str, Any] | None, before: State, after: State) -> None:
        attachment = attachment_of(request)
        if request is not None and request.get("command") == "ADD" and attachment is not None:
            # A repeated ADD tears the old attachment down first: it may be gone, or still there.
            handle, host_ifname = attachment
            assert after in (before, before.without(handle, host_ifname)), "a failed ADD left state behind"
            return
        command = request.get("command") if request is not None else "request"
        assert after == before, f"a failed {command} changed the agent's state"


def attachment_of(request: dict[str, Any] | None) -> tuple[str, str] | None:
    """(IPAM handle, host interface) of the request's attachment, if it names one."""
    if request is None or not isinstance(request.get("config"), dict):
        return None
    network, container_id, ifname = (request["config"].get("name"), request.get("containerID"), request.get("ifname"))
    if not (isinstance(network, str) and isinstance(container_id, str) and isinstance(ifname, str)):
        return None
    return handle_for(network, container_id, ifname), host_ifname_for(network, container_id, ifname)


def main() -> None:
    fuzz(AgentApiHarness)


if __name__ == "__main__":
    main()
