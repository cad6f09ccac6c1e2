"""The node agent's loop: every ``interval`` seconds, which pod holds which GPU (the kubelet's
pod-resources API and this node's pods), each GPU's readings, the power limits to set or
restore, and the energy each pod's GPUs used; then a new snapshot for /metrics.

The decisions are pure (``ledger``, ``limits``); this module does the I/O, and keeps the
ledger in ``state_dir`` (a hostPath), written after every update, so a restart loses none
of a pod's energy. Started, it first restores the default limit of every GPU that no pod
asks a limit for: one left lowered while the agent was down reaches no new tenant.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from joule.nodeagent import ledger as ledger_mod
from joule.nodeagent.exporter import Snapshot, SnapshotCollector
from joule.nodeagent.gpu import GpuError, GpuReading, Gpus, LimitRefused
from joule.nodeagent.ledger import Holder, Meter, Record
from joule.nodeagent.limits import Limits, Refusal, Request, parse_annotation, plan, wanted
from joule.nodeagent.podresources import PodDevices, PodResourcesError, gpu_id
from joule.nodeagent.pods import PodInfo
from joule.nodeagent.rapl import counter_increase, read_packages

log = logging.getLogger("joule.nodeagent")
LEDGER_FILE = "ledger.json"


@dataclass
class AgentConfig:
    node: str
    state_dir: Path
    interval: float = 5.0
    resource: str = "nvidia.com/gpu"
    rapl_root: Path = Path("/sys/class/powercap")
    boot_id_file: Path = Path("/proc/sys/kernel/random/boot_id")


@dataclass
class _Rapl:
    last: dict[str, int] = field(default_factory=dict)
    joules: dict[str, float] = field(default_factory=dict)


class Agent:
    """One update at a time; ``run`` calls ``update`` every interval until stopped."""

    def __init__(
        self,
        config: AgentConfig,
        gpus: Gpus,
        list_devices: Callable[[], list[PodDevices]],
        pod: Callable[[str, str], PodInfo | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.gpus = gpus
        self.list_devices = list_devices
        self.pod = pod
        self.clock = clock
        self.collector = SnapshotCollector()
        self.ledger: dict[tuple[str, str], Record] = self._load_ledger()
        self.refused: dict[str, Refusal] = {}
        self.errors: Counter[str] = Counter()
        self.last_success: float | None = None  # time.monotonic() of the last full update
        self._rapl = _Rapl()
        self._stop = threading.Event()

    # -- state --------------------------------------------------------------------------

    def _ledger_path(self) -> Path:
        return self.config.state_dir / LEDGER_FILE

    def _load_ledger(self) -> dict[tuple[str, str], Record]:
        try:
            saved = json.loads(self._ledger_path().read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ledger %s unreadable (%s): pods' records start afresh",
                        self._ledger_path(), exc)  # fmt: skip
            return {}
        if not isinstance(saved, dict):
            return {}
        ledger = ledger_mod.load(saved.get("records"))
        if saved.get("boot") != self.boot_id():
            # The node rebooted: every GPU counter started again from 0 (a pod that lived
            # through it keeps its joules; what the counters show now is all new).
            ledger = ledger_mod.rebooted(ledger)
        return ledger

    def _save_ledger(self) -> None:
        path = self._ledger_path()
        tmp = path.with_suffix(".tmp")
        saved = {"boot": self.boot_id(), "records": ledger_mod.dump(self.ledger)}
        tmp.write_text(json.dumps(saved))
        os.replace(tmp, path)  # never a half-written ledger

    def boot_id(self) -> str:
        try:
            return self.config.boot_id_file.read_text().strip()
        except OSError:
            return ""

    # -- one update ---------------------------------------------------------------------

    def holders(self) -> tuple[dict[str, list[Holder]], dict[str, list[Request]]]:
        """Each held GPU's pods, and what they ask of its power limit."""
        holders: dict[str, list[Holder]] = {}
        requests: dict[str, list[Request]] = {}
        for entry in self.list_devices():
            ids = entry.device_ids(self.config.resource)
            if not ids:
                continue
            info = self.pod(entry.namespace, entry.name)
            if info is None or info.finished:
                continue  # not yet in the watch, or done: it holds nothing that draws power
            request = parse_annotation(info.limit)
            for gpu in dict.fromkeys(gpu_id(d) for d in ids):
                holders.setdefault(gpu, []).append(
                    Holder(info.uid, info.namespace, info.name, info.job)
                )
                requests.setdefault(gpu, []).append(request)
        return holders, requests

    def update(self) -> Snapshot:
        now = self.clock()
        try:
            holders, requests = self.holders()
        except PodResourcesError as exc:
            self.errors["pod-resources"] += 1
            log.warning("%s", exc)
            raise
        readings = self._read_all()
        self._apply_limits(requests, readings, now)
        meters = {gpu: Meter(r.energy_joules, r.power_watts) for gpu, r in readings.items()}
        self.ledger = ledger_mod.update(self.ledger, holders, meters, now)
        self._save_ledger()
        asked = {gpu: w for gpu, reqs in requests.items() if (w := wanted(reqs)) is not None}
        refused = {gpu: why for gpu, why in self.refused.items() if gpu in holders}
        for gpu, reqs in requests.items():
            # An annotation the agent cannot read is reported as refused; the GPU runs at
            # its default meanwhile (plan reads the request as "no limit").
            bad = next((r.error for r in reqs if r.error), None)
            if bad is not None:
                refused.setdefault(gpu, Refusal(None, bad, now))
        snap = Snapshot(
            node=self.config.node,
            source=self.gpus.source,
            updated=now,
            gpus=readings,
            holders=holders,
            requested=asked,
            refused=refused,
            ledger=dict(self.ledger),
            cpu_joules=self._read_rapl(),
            errors=dict(self.errors),
            unmeasured={gpu: pods for gpu, pods in holders.items() if gpu not in readings},
        )
        self.collector.snapshot = snap
        self.last_success = time.monotonic()
        return snap

    def _read_all(self) -> dict[str, GpuReading]:
        out = {}
        for uuid in self.gpus.uuids():
            try:
                out[uuid] = self.gpus.read(uuid)
            except GpuError as exc:
                self.errors["gpu-read"] += 1
                log.warning("GPU %s: %s", uuid, exc)
        return out

    def _apply_limits(
        self, requests: Mapping[str, list[Request]], readings: dict[str, GpuReading], now: float
    ) -> None:
        limits = {
            gpu: Limits(r.power_limit_watts, r.default_limit_watts) for gpu, r in readings.items()
        }
        for action in plan(requests, limits, self.refused, now):
            what = "default" if action.watts is None else f"{action.watts:g} W"
            try:
                enforced = self.gpus.set_limit(action.gpu, action.watts)
            except LimitRefused as exc:
                self.refused[action.gpu] = Refusal(action.watts, exc.nvml_error, now)
                self.errors["power-limit"] += 1
                log.warning("%s", exc)
                continue
            except GpuError as exc:
                self.refused[action.gpu] = Refusal(action.watts, str(exc), now)
                self.errors["power-limit"] += 1
                log.warning("GPU %s: setting the %s limit failed: %s", action.gpu, what, exc)
                continue
            self.refused.pop(action.gpu, None)
            log.info("GPU %s: power limit -> %s (%.1f W in force)", action.gpu, what, enforced)
            with contextlib.suppress(GpuError):  # report what is in force
                readings[action.gpu] = self.gpus.read(action.gpu)
        for gpu in list(self.refused):
            if wanted(requests.get(gpu, [])) != self.refused[gpu].watts:
                del self.refused[gpu]  # the request changed: the old refusal no longer holds

    def _read_rapl(self) -> dict[str, float]:
        current = read_packages(self.config.rapl_root)
        for zone, (value, max_range) in current.items():
            last = self._rapl.last.get(zone)
            if last is not None:
                added = counter_increase(last, value, max_range) / 1e6
                self._rapl.joules[zone] = self._rapl.joules.get(zone, 0.0) + added
            else:
                self._rapl.joules.setdefault(zone, 0.0)
            self._rapl.last[zone] = value
        return dict(self._rapl.joules)

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.update()
            except PodResourcesError:
                pass  # counted and logged; the GPUs are read again next time
            except Exception:
                self.errors["update"] += 1
                log.exception("update failed")
            self._stop.wait(max(self.config.interval - (time.monotonic() - started), 0.1))

    def stop(self) -> None:
        self._stop.set()

    def restore_all(self) -> None:
        """Every GPU back at its default limit (on the way out)."""
        for uuid, r in self._read_all().items():
            lowered = r.power_limit_watts is not None and r.default_limit_watts is not None
            if lowered and abs(r.power_limit_watts - r.default_limit_watts) > 0.5:  # type: ignore[operator]
                try:
                    self.gpus.set_limit(uuid, None)
                    log.info("GPU %s: power limit back to its default on exit", uuid)
                except (LimitRefused, GpuError) as exc:
                    log.warning("GPU %s: could not restore the default limit: %s", uuid, exc)

    def healthy(self) -> bool:
        """Live while updates succeed: three intervals (and 30 s) without one is wedged."""
        if self.last_success is None:
            return True  # starting: the kubelet's initial delay covers the first update
        return time.monotonic() - self.last_success < max(3 * self.config.interval, 30.0)


def serve(agent: Agent, port: int, host: str = "") -> ThreadingHTTPServer:
    """/metrics (the agent's series) and /healthz, in a thread."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(agent.collector)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/metrics":
                body, status, kind = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif self.path == "/healthz":
                ok = agent.healthy()
                body = b"ok\n" if ok else b"no successful update lately\n"
                status, kind = (200 if ok else 503), "text/plain"
            else:
                body, status, kind = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a scrape every few seconds would drown the log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
