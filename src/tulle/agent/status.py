"""What the agent says of itself (`tulle status`, CNI STATUS): readiness and why not, its pods,
policy drops, its newest error. Read from what the controllers already know: a report never
waits on the datastore, which may be the thing that is down."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tulle.agent.controller import Controller
from tulle.agent.endpoints import EndpointRegistry
from tulle.datastore.base import Datastore


@dataclass
class AgentStatus:
    node: str
    mode: str
    datastore: Datastore
    registry: EndpointRegistry
    underlay: Callable[[], list[str]]
    families: Callable[[], list[int]]
    mtu: Callable[[], int]
    problem_sources: list[Callable[[], list[str]]] = field(default_factory=list)
    reconcilers: list[Controller] = field(default_factory=list)  # their failures are problems
    drops: Callable[[], list[dict[str, Any]]] = lambda: []
    last_reconcile: Callable[[], float] = lambda: 0.0
    _noted: tuple[float, str] = (0.0, "")

    def note_error(self, message: str) -> None:
        """An error met outside the controllers (a start-up step), for `lastError`."""
        self._noted = (time.time(), message)

    def readiness_problems(self) -> list[str]:
        problems = []
        outage = self.datastore.reachability.describe()
        if outage:
            problems.append(outage)
        for source in self.problem_sources:
            problems.extend(source())
        for controller in self.reconcilers:
            if controller.last_error:
                problems.append(f"last {controller.name} reconcile failed: {controller.last_error}")
        return problems

    def last_error(self) -> str:
        """The newest error the agent met, with its time ('' if none yet)."""
        candidates = [self._noted]
        reach = self.datastore.reachability
        if not reach.reachable:
            candidates.append((reach.since, reach.error))
        candidates += [(c.last_error_at, f"{c.name}: {c.last_error}") for c in self.reconcilers if c.last_error]
        when, message = max(candidates)
        if not message:
            return ""
        return f"{time.strftime('%H:%M:%S', time.localtime(when))} {message}"

    def describe(self) -> dict[str, Any]:
        endpoints = [
            {"pod": f"{ep.namespace}/{ep.pod}", "ips": ep.ips, "interface": ep.host_ifname, "state": ep.state}
            for ep in self.registry.all()
        ]
        try:
            drops = self.drops()
        except Exception as exc:  # status must answer even if policy is broken
            drops = [{"error": str(exc)}]
        problems = self.readiness_problems()
        return {
            "node": self.node,
            "mode": self.mode,
            "families": self.families(),
            "mtu": self.mtu(),
            "underlay": self.underlay(),
            "endpoints": endpoints,
            "drops": drops,
            "lastReconcile": self.last_reconcile(),
            "lastError": self.last_error(),
            "problems": problems,
            "ready": not problems,
        }
