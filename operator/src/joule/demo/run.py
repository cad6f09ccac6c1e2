"""`joule demo`: the control plane, the CRD, the operator and a local node, all on this
machine; the examples applied; a live view until Ctrl-C; everything torn down on exit.

Ctrl-C, SIGTERM and SIGHUP (the terminal closed) all tear down the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config

from joule.cluster import ClusterInfo, ClusterSettings, down, up
from joule.cluster.lifecycle import kubectl
from joule.constants import COMPONENT, GROUP, KIND, LABEL_JOB, METRICS_PORT, PLURAL, VERSION
from joule.demo.view import job_row, render
from joule.trainer_metrics import TrainerReading, parse_trainer_metrics

ROOT = Path(__file__).resolve().parents[4]  # the repository (the package is installed -e)
DEMO_CLUSTER = "demo"
# examples/demo/ keeps its checkpoints here (hostPath), the demo its logs and the workers'
# logs: cleared when a demo starts, kept after it ends for reading.
DEMO_DATA = Path("/tmp/joule-demo")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
Say = Callable[[str], None]


@dataclass
class Options:
    examples: Path
    until_done: bool = False
    timeout: float | None = None
    refresh: float = 2.0
    gpus: int = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Interrupts:
    """SIGINT (Ctrl-C), SIGTERM (`kill`, a CI timeout) and SIGHUP (the terminal closed) all
    end the demo the same way: a KeyboardInterrupt where it is, then the teardown.

    Only the first one interrupts. Closing a terminal sends SIGHUP twice (the kernel to the
    foreground group, the shell to its jobs), and a second interrupt inside the teardown would
    cut it short and leave everything running.
    """

    def __init__(self) -> None:
        self.stopping = False

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            # An ignored signal stays ignored: `nohup make demo` means to outlive the terminal.
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        raise KeyboardInterrupt


class Child:
    """A `joule` subcommand in a process of its own, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _joule(*args: str) -> list[str]:
    return [sys.executable, "-m", "joule", *args]


def _kubectl(info: ClusterInfo, *args: str) -> str:
    return kubectl(info.kubectl, info.kubeconfig, list(args))


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def _quiet(say: Say) -> Say:
    """Output that cannot fail: after SIGHUP the terminal is gone and every write to it is
    EIO, which must not stop the teardown half way."""

    def safe(message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            say(message)

    return safe


def _print(text: str = "") -> None:
    with contextlib.suppress(OSError, ValueError):
        print(text, flush=True)


def scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.read().decode()
    except OSError:
        return None


class Demo:
    def __init__(self, options: Options, say: Say, interrupts: Interrupts | None = None) -> None:
        self.options, self.say = options, _quiet(say)
        self.interrupts = interrupts or Interrupts()
        self.settings = ClusterSettings(name=DEMO_CLUSTER, nodes=0)
        self.children: list[Child] = []
        self.started = time.monotonic()
        self.first_step_s: float | None = None

    def up(self) -> None:
        say = self.say
        info = up(self.settings, progress=say)
        self.info = info
        shutil.rmtree(DEMO_DATA, ignore_errors=True)
        logs = DEMO_DATA / "logs"
        logs.mkdir(parents=True)
        env = {**os.environ, "KUBECONFIG": str(info.kubeconfig)}
        say("installing the TrainingJob CRD")
        _kubectl(info, "apply", "-f", str(ROOT / "crds"))
        _kubectl(info, "wait", "--for=condition=Established", "crd/trainingjobs.joule.dev")
        self.operator_port = free_port()
        say(f"starting the operator (log: {logs / 'operator.log'})")
        op_env = {**env, "JOULE_METRICS_PORT": str(self.operator_port), "JOULE_LOG_FORMAT": "plain"}
        self.children.append(Child("operator", _joule("operator"), op_env, logs / "operator.log"))
        say(f"starting the local node agent (log: {logs / 'node-agent.log'})")
        agent_argv = _joule(
            "node-agent", "--name", "local", "--gpus", str(self.options.gpus),
            "--state-dir", str(DEMO_DATA / "node"),
        )  # fmt: skip
        self.children.append(Child("node-agent", agent_argv, env, logs / "node-agent.log"))
        self.api = config.new_client_from_config(config_file=str(info.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

        def node_ready() -> bool:
            node = self.core.read_node("local")
            return any(
                c.type == "Ready" and c.status == "True" for c in node.status.conditions or []
            )

        _wait(node_ready, 60, "the local node to be Ready")
        say(f"applying {self.options.examples}")
        for line in _kubectl(info, "apply", "-f", str(self.options.examples)).splitlines():
            say(f"  {line}")
        say(f"ready in {time.monotonic() - self.started:.1f}s; workers are starting")
        say(f"worker logs: {DEMO_DATA / 'node' / 'pods'}/<namespace>_<pod>_<uid>/trainer.log")

    def jobs(self) -> list[dict[str, Any]]:
        return self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]

    def last_events(self) -> dict[str, str]:
        """Each job's newest Event from the operator: what it last did, and why."""
        events = self.core.list_event_for_all_namespaces(
            field_selector=f"involvedObject.kind={KIND}"
        ).items
        ours = [e for e in events if e.reporting_component == COMPONENT]
        newest: dict[str, str] = {}
        for e in sorted(ours, key=lambda e: e.last_timestamp or e.metadata.creation_timestamp):
            newest[e.involved_object.name] = f"{e.reason}: {e.message}"
        return newest

    def readings(self) -> tuple[dict[str, list[TrainerReading]], list[str]]:
        by_job: dict[str, list[TrainerReading]] = {}
        endpoints = [f"operator  http://127.0.0.1:{self.operator_port}/metrics"]
        pods = self.core.list_pod_for_all_namespaces(label_selector=LABEL_JOB).items
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            ip = pod.status.pod_ip
            if not ip or pod.status.phase != "Running":
                continue
            url = f"http://{ip}:{METRICS_PORT}/metrics"
            endpoints.append(f"{pod.metadata.name:<9.30} {url}")
            text = scrape(url)
            reading = parse_trainer_metrics(text) if text else None
            if reading:
                by_job.setdefault(pod.metadata.labels[LABEL_JOB], []).append(reading)
        return by_job, endpoints

    def watch(self) -> int:
        """The live view; returns the exit code when --until-done or --timeout ends it."""
        tty = sys.stdout.isatty()
        last_plain = 0.0
        while True:
            jobs = self.jobs()
            readings, endpoints = self.readings()
            elapsed = time.monotonic() - self.started
            if self.first_step_s is None and any(
                r.steps > 0 for rs in readings.values() for r in rs
            ):
                self.first_step_s = elapsed
                self.say(f"first training step {elapsed:.1f}s after `joule demo` started")
            said = self.last_events()
            rows = [
                job_row(j, readings.get(j["metadata"]["name"], []), said.get(j["metadata"]["name"]))
                for j in jobs
            ]
            text = render(rows, elapsed, endpoints)
            if tty:
                _print("\x1b[H\x1b[2J" + text)
            elif time.monotonic() - last_plain >= 10:
                _print(text + "\n")
                last_plain = time.monotonic()
            for child in self.children:
                if not child.alive():
                    raise RuntimeError(f"the {child.name} exited; see {child.log}")
            phases = [r.phase for r in rows]
            if (
                self.options.until_done
                and phases
                and all(p in ("Succeeded", "Failed") for p in phases)
            ):
                _print(text)
                return 0 if all(p == "Succeeded" for p in phases) else 1
            if self.options.timeout and elapsed > self.options.timeout:
                self.say(f"--timeout {self.options.timeout:.0f}s reached")
                return 1
            time.sleep(self.options.refresh)

    def down(self) -> None:
        self.interrupts.stopping = True  # from here on, no signal cuts the teardown short
        self.say("stopping: node agent (SIGTERM to every worker), operator, control plane")
        for child in reversed(self.children):
            child.stop(timeout=30)
        down(self.settings)
        self.say(f"stopped; nothing left running (logs kept in {DEMO_DATA})")


def run_demo(options: Options, say: Say) -> int:
    interrupts = Interrupts()
    interrupts.install()
    demo = Demo(options, say, interrupts)
    try:
        demo.up()
        return demo.watch()
    except KeyboardInterrupt:
        _print()
        return 0
    finally:
        demo.down()
