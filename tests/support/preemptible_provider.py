"""Ray's fake multi-node provider with spot reclaims, for the local autoscaling cluster.

A cloud takes a spot VM back by itself: the VM's processes stop at once and the cloud's API
stops listing it, so the autoscaler sees one node fewer and launches another for the demand
still there. The fake provider has no such path (killing a fake node's processes from outside
leaves it listed, and the autoscaler then waits for it forever as a node still starting), so
this one adds it: a file named after a node id in the config's ``reclaim_dir`` makes the
provider — in the head's monitor process, where the autoscaler runs it — kill every process of
that node with SIGKILL and drop it from its listing, then rename the file ``<id>.done``.
A cloud's VM also takes minutes to boot, where a fake node takes seconds: ``boot_delay_s`` in the
provider config holds every launch that long before the node starts (in the autoscaler's
launcher threads, as a cloud launch call returns only once the VM is up), so that the order of
events — a reclaimed node known dead, the run restarted on what is left, then the replacement —
is the cloud's.
Used as ``provider: {type: external, module: preemptible_provider.PreemptibleFakeProvider}``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

POLL_S = 0.2


class PreemptibleFakeProvider(FakeMultiNodeProvider):
    def __init__(self, provider_config: dict, cluster_name: str):
        super().__init__(provider_config, cluster_name)
        self._reclaim_dir = Path(provider_config["reclaim_dir"])
        self._reclaim_dir.mkdir(parents=True, exist_ok=True)
        self._boot_delay_s = float(provider_config.get("boot_delay_s", 0))
        threading.Thread(target=self._watch_reclaims, name="spot-reclaims", daemon=True).start()

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        time.sleep(self._boot_delay_s)  # the VM boots (the node counts as a pending launch meanwhile)
        super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)

    def _watch_reclaims(self) -> None:
        stop = threading.Event()
        while not stop.wait(POLL_S):
            for request in self._reclaim_dir.iterdir():
                if not request.name.endswith(".done"):
                    self._reclaim(request.name)
                    request.rename(request.with_name(f"{request.name}.done"))

    def _reclaim(self, node_id: str) -> None:
        with self.lock:
            node = self._nodes.pop(node_id, None)
        if node is None:
            return
        # Every process of the node: those the node started and everything under them (its Ray workers).
        roots = [info.process.pid for infos in node["node"].all_processes.values() for info in infos]
        for pid in [*roots, *(child for root in roots for child in _descendants(root))]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node["node"].kill_all_processes(check_alive=False, allow_graceful=False, wait=True)  # reaps them


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The parent pid is the 2nd field after the command, which is in parentheses.
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
