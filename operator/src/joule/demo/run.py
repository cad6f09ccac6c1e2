"""`joule demo`: the control plane, the CRD, the operator and a local node, all on this
machine; the examples applied; a live view until Ctrl-C; everything torn down on exit.

Ctrl-C, SIGTERM and SIGHUP (the terminal closed) all tear down the same way. What a demo that
died anyway left behind (operator, node agent, workers, the previous run's jobs and
checkpoints) is stopped and cleared by the next start, so every demo starts fresh.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config

from joule.cluster import ClusterInfo, ClusterSettings, down, process, up
from joule.cluster.lifecycle import kubectl
from joule.cluster.process import ProcessRecord
from joule.constants import COMPONENT, GROUP, KIND, LABEL_JOB, METRICS_PORT, PLURAL, VERSION
from joule.demo import leftovers
from joule.demo.view import job_row, render
from joule.trainer_metrics import TrainerReading, parse_trainer_metrics

ROOT = Path(__file__).resolve().parents[4]  # the repository (the package is installed -e)
DEMO_CLUSTER = "demo"
# examples/demo/ keeps its checkpoints here (hostPath), the demo its logs and the workers'
# logs: cleared when a demo starts, kept after it ends for reading.
DEMO_DATA = Path("/tmp/joule-demo")
# What the running demo started (pid + start time), for the next demo if this one dies.
STATE_FILE = DEMO_DATA / "demo.json"
PODS_DIR = DEMO_DATA / "node" / "pods"  # the node agent's pod directories: its workers' HOME
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
    cut it short and leave everything running. Inside ``deferred()`` (a process started but not
    yet recorded) the interrupt waits until the block ends.
    """

    def __init__(self) -> None:
        self.stopping = False
        self.deferring = False
        self.pending = False

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            # An ignored signal stays ignored: `nohup make demo` means to outlive the terminal.
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.stopping:
            return
        if self.deferring:
            self.pending = True
            return
        self.stopping = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending and not self.stopping:
            self.stopping = True
            raise KeyboardInterrupt


class Child:
    """A `joule` subcommand in a process of its own, with its output in a log file. Its own
    session: Ctrl-C or a closed terminal reaches the demo only, which stops the children in
    order (the node agent's workers first get SIGTERM and write a checkpoint)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Read at once: the pid is ours (unreaped) until we wait for it, so this is its start.
        record = process.record(name, self.proc.pid, str(log))
        self.record = record or ProcessRecord(name, self.proc.pid, -1, str(log))

    def alive(self) -> bool:
        return self.proc.poll() is None


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
        self.state = leftovers.DemoState()
        self.owns_cluster = False  # not until no other demo runs: its cluster is not ours to stop
        self.started = time.monotonic()
        self.first_step_s: float | None = None

    def clear_previous(self) -> None:
        """Stop what an earlier demo left running and clear its data, before anything starts:
        a second operator and node agent beside the old ones run every pod twice, and old
        workers keep writing checkpoints into the new run's directory."""
        previous = leftovers.load(STATE_FILE)
        me = process.record("demo", os.getpid())
        if previous.demo and process.alive(previous.demo):
            raise RuntimeError(
                f"another `joule demo` is running (pid {previous.demo.pid}); stop it first "
                f"(Ctrl-C in its terminal, or kill {previous.demo.pid})"
            )
        # The node agent first gets SIGTERM and stops its workers itself; the scan then finds
        # workers whose agent died before them (SIGKILL of the whole group, OOM).
        stopped = leftovers.stop(previous.children, grace_seconds=30)
        stopped += leftovers.stop(leftovers.workers(PODS_DIR), grace_seconds=10)
        if stopped:
            self.say(f"stopped what a previous demo left running: {leftovers.describe(stopped)}")
        # Old checkpoints go too: the new jobs would resume from them (or find themselves
        # already finished) instead of training from step 0.
        shutil.rmtree(DEMO_DATA, ignore_errors=True)
        (DEMO_DATA / "logs").mkdir(parents=True)
        self.state = leftovers.DemoState(demo=me)
        leftovers.save(STATE_FILE, self.state)
        self.owns_cluster = True

    def delete_previous_jobs(self) -> None:
        """The previous demo's TrainingJobs, their pods and Services, gone before the examples
        are applied again: applied over an old job, an example would keep its old pods, status
        and step. Pods are force-deleted (no node agent runs to confirm a graceful delete; their
        processes are already stopped), Services at once rather than by the garbage collector,
        which could otherwise remove a new job's Service of the same name later."""
        info = self.info
        jobs = _kubectl(info, "get", PLURAL, "-A", "-o", "name").split()
        if not jobs:
            return
        self.say(f"deleting the previous demo's jobs: {', '.join(j.split('/')[-1] for j in jobs)}")
        _kubectl(info, "delete", PLURAL, "-A", "--all", "--wait=true")
        _kubectl(
            info, "delete", "pods", "-A", "-l", LABEL_JOB,
            "--grace-period=0", "--force", "--wait=true",
        )  # fmt: skip
        _kubectl(info, "delete", "services", "-A", "-l", LABEL_JOB, "--wait=true")

    def start_child(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        with self.interrupts.deferred():  # started and recorded, or neither
            child = Child(name, argv, env, log)
            self.children.append(child)
            self.state.children.append(child.record)
            leftovers.save(STATE_FILE, self.state)

    def up(self) -> None:
        say = self.say
        self.clear_previous()
        info = up(self.settings, progress=say)
        self.info = info
        logs = DEMO_DATA / "logs"
        env = {**os.environ, "KUBECONFIG": str(info.kubeconfig)}
        say("installing the TrainingJob CRD")
        _kubectl(info, "apply", "-f", str(ROOT / "crds"))
        _kubectl(info, "wait", "--for=condition=Established", "crd/trainingjobs.joule.dev")
        if info.already_running:
            self.delete_previous_jobs()
        self.operator_port = free_port()
        say(f"starting the operator (log: {logs / 'operator.log'})")
        op_env = {**env, "JOULE_METRICS_PORT": str(self.operator_port), "JOULE_LOG_FORMAT": "plain"}
        self.start_child("operator", _joule("operator"), op_env, logs / "operator.log")
        say(f"starting the local node agent (log: {logs / 'node-agent.log'})")
        agent_argv = _joule(
            "node-agent", "--name", "local", "--gpus", str(self.options.gpus),
            "--state-dir", str(DEMO_DATA / "node"),
        )  # fmt: skip
        self.start_child("node-agent", agent_argv, env, logs / "node-agent.log")
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
        """Each job's newest Event from the operator, by the job's uid: what it last did, and
        why (a previous demo's job of the same name keeps its Events for an hour)."""
        events = self.core.list_event_for_all_namespaces(
            field_selector=f"involvedObject.kind={KIND}"
        ).items
        ours = [e for e in events if e.reporting_component == COMPONENT]
        newest: dict[str, str] = {}
        for e in sorted(ours, key=lambda e: e.last_timestamp or e.metadata.creation_timestamp):
            newest[e.involved_object.uid] = f"{e.reason}: {e.message}"
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
            try:
                reading = parse_trainer_metrics(text) if text else None
            except ValueError:  # a worker's odd /metrics is not worth stopping the view for
                reading = None
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
                job_row(j, readings.get(j["metadata"]["name"], []), said.get(j["metadata"]["uid"]))
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
        if not self.owns_cluster:
            return
        self.say("stopping: node agent (SIGTERM to every worker), operator, control plane")
        # The node agent's own shutdown gives workers 10 s, then kills them; the scan catches
        # any it could not (the agent killed on its grace period's expiry).
        leftovers.stop([c.record for c in reversed(self.children)], grace_seconds=30)
        leftovers.stop(leftovers.workers(PODS_DIR), grace_seconds=10)
        down(self.settings)
        STATE_FILE.unlink(missing_ok=True)  # a failure above keeps it, for the next demo
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
