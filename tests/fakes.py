"""Stand-ins for the kernel side where a test or a fuzz harness drives the agent without root."""

from __future__ import annotations

from tulle.dataplane.podnet import PodInterface


class RecordingPodNetwork:
    """The pod's veth work, as a record: which host interfaces exist."""

    def __init__(self) -> None:
        self.made: dict[str, PodInterface] = {}

    def create(self, pod: PodInterface) -> str:
        self.made[pod.host_ifname] = pod
        return "02:00:00:00:00:01"

    def delete(self, host_ifname: str) -> bool:
        return self.made.pop(host_ifname, None) is not None

    def check(self, pod: PodInterface, expect_routes: list[str]) -> list[str]:
        return [] if pod.host_ifname in self.made else ["gone"]
