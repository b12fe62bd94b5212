"""The gateway's replica set while it runs: `tidal gateway --replicas-file FILE`.

Replicas come and go (autoscaling, a restarted pod with a new address, a node drained). Without
Kubernetes, the gateway follows a plain file instead of an API server: one replica per line, its URL
and optionally its KV events endpoint, '#' starts a comment:

    http://10.0.0.5:8000  tcp://10.0.0.5:5557
    http://10.0.0.6:8000

Owns: reading that file (`read_replicas_file`), the EDS document Envoy's replica cluster reads
(`eds_document` / `write_eds`: Envoy's `path_config_source` picks up a file moved into place, so it is
written to a temporary name and renamed), and `ReplicaFileWatcher`, which polls the file and hands
every changed set to a callback (gateway.py applies it to the picker, the ext_proc server's known
replicas and the EDS file). A file that fails to parse keeps the last good set, with a warning.
Must not: start processes, pick endpoints, or write Envoy's bootstrap (envoy_config.py does).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from tidal.errors import TidalError
from tidal.fleet.addresses import endpoint_of, socket_address

log = logging.getLogger("tidal.fleet")
EDS_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

Entry = tuple[str, "str | None"]   # ('host:port', KV events endpoint or None)


def read_replicas_file(path: str | Path) -> list[Entry]:
    """The file's replicas in order, each once; a TidalError naming the line for anything malformed."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise TidalError(f"--replicas-file {path}: {e.strerror or e}") from None
    entries: dict[str, str | None] = {}
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and not fields[1].startswith("tcp://")):
            raise TidalError(f"--replicas-file {path}, line {n}: expected 'URL [tcp://HOST:PORT]', got {line.strip()!r}")
        try:
            address = endpoint_of(fields[0])
        except TidalError as e:
            raise TidalError(f"--replicas-file {path}, line {n}: {e}") from None
        entries[address] = fields[1] if len(fields) == 2 else None
    return list(entries.items())


def eds_document(cluster: str, addresses: list[str], version: int) -> dict:
    """An EDS DiscoveryResponse for `cluster` with `addresses` ('IP:port'; no replica is allowed)."""
    endpoints = [{"lb_endpoints": [{"endpoint": {"address": socket_address(a)}} for a in addresses]}] if addresses else []
    return {"version_info": str(version),
            "resources": [{"@type": EDS_TYPE, "cluster_name": cluster, "endpoints": endpoints}]}


def write_eds(path: str, cluster: str, addresses: list[str], version: int) -> None:
    """Write the EDS file atomically (Envoy watches for a file moved into place)."""
    tmp = f"{path}.{version}.tmp"
    with open(tmp, "w") as f:
        json.dump(eds_document(cluster, addresses, version), f)
    os.replace(tmp, path)


class ReplicaFileWatcher:
    """Polls `path` every `interval_s`; calls `on_change(entries)` when the set of replicas changes."""

    def __init__(self, path: str, on_change: Callable[[list[Entry]], None], current: list[Entry],
                 interval_s: float = 1.0):
        self.path, self.on_change, self.interval_s = path, on_change, interval_s
        self.current = list(current)
        self._stamp = self._stat()
        self._task: asyncio.Task | None = None

    def _stat(self):
        try:
            st = os.stat(self.path)
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.check()

    def check(self) -> bool:
        """Re-read the file if it changed on disk; True when the replica set changed."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            entries = read_replicas_file(self.path)
        except TidalError as e:
            log.warning("%s; keeping the %d replica(s) from before", e, len(self.current))
            return False
        if entries == self.current:
            return False
        log.info("replicas file %s: %d -> %d replica(s)", self.path, len(self.current), len(entries))
        self.current = entries
        self.on_change(entries)
        return True
