"""DELs that wait: recorded by the plugin when the agent is away, or by the agent when the
datastore is, and carried out as soon as both answer. One file per attachment (the plugin's
format, `tulle.cni.plugin.record_pending_del`), so a repeated DEL replaces its record."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

from tulle.agent.endpoints import Endpoint
from tulle.cni.plugin import record_pending_del
from tulle.cni.spec import CniError
from tulle.datastore.base import DatastoreError

log = logging.getLogger(__name__)


def deferred_del(ep: Endpoint) -> dict[str, Any]:
    """The DEL request that gives back what `ep` holds in the datastore, to be replayed later."""
    return {
        "command": "DEL",
        "containerID": ep.container_id,
        "ifname": ep.ifname,
        "netns": ep.netns,
        "args": {"K8S_POD_NAMESPACE": ep.namespace, "K8S_POD_NAME": ep.pod},
        "config": {"name": ep.network},
    }


class PendingDeletes:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.folder = os.path.join(state_dir, "pending-del")

    def record(self, request: dict[str, Any]) -> None:
        record_pending_del(self.state_dir, request)

    def names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.folder) if n.endswith(".json"))
        except FileNotFoundError:
            return []

    def replay(self, delete_now: Callable[[dict[str, Any]], None]) -> int:
        """Carry out every waiting DEL with `delete_now`, which raises DatastoreError while the
        datastore is away: the rest then wait too (they would only wait out the same timeout)."""
        done = 0
        for name in self.names():
            path = os.path.join(self.folder, name)
            try:
                with open(path) as f:
                    request = json.load(f)
                request["config"]["name"], request["containerID"], request["ifname"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("dropping an unreadable pending DEL", extra={"file": path, "error": str(exc)})
                os.unlink(path)
                continue
            try:
                delete_now(request)
            except DatastoreError:
                break
            except CniError as exc:  # refused as it is (a pod name no API server takes): it never will pass
                log.error("dropping a pending DEL that is not valid", extra={"file": path, "error": str(exc)})
                os.unlink(path)
                continue
            except Exception as exc:  # kept: the next replay tries it again
                log.error("a pending DEL failed", extra={"file": path, "error": str(exc)})
                continue
            os.unlink(path)
            done += 1
        if done:
            log.info("carried out pending DELs", extra={"count": done})
        return done
