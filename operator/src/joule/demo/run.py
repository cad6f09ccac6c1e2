"""`joule demo`: the control plane and a real node (kubelet + containerd, `nvidia.com/gpu`
slots), all on this machine; the trainer and operator images built and pushed to the node's
registry; Joule installed with its Helm chart (the operator, and the node agent over its NVML
double); a Prometheus that finds them and the workers through the API server; the examples
applied; a live view until Ctrl-C; a `joule report` of each job; everything torn down on exit.

Ctrl-C, SIGTERM and SIGHUP (the terminal closed) all tear down the same way: the jobs are
deleted first, so the kubelet sends their workers SIGTERM and they write a last checkpoint;
then Prometheus stops, then the cluster with the operator and the node agent in it. What a
demo that died anyway left behind (its Prometheus, its cluster with the operator and the
workers, its checkpoints) is stopped and cleared by the next start, so every demo starts
fresh.
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

import yaml
from kubernetes import client, config

from joule.cluster import ClusterInfo, ClusterSettings, down, process, status, up
from joule.cluster.helm import ensure_helm
from joule.cluster.lifecycle import kubectl
from joule.cluster.nodeconfig import NODE_NAME
from joule.cluster.nodes import GPU_RESOURCE
from joule.cluster.process import ProcessRecord
from joule.cluster.prometheus import ensure_prometheus, kubernetes_config, prometheus_argv
from joule.cluster.realnode import NodeRecord, unavailable_reason
from joule.constants import (
    COMPONENT,
    GROUP,
    KIND,
    LABEL_JOB,
    METRICS_PORT,
    PLURAL,
    TERMINATION_GRACE_SECONDS,
    VERSION,
)
from joule.demo import install, leftovers, storage
from joule.demo.view import job_row, render
from joule.images import ensure_operator, ensure_trainer, push
from joule.images.build import Image
from joule.trainer_metrics import TrainerReading, parse_trainer_metrics

ROOT = Path(__file__).resolve().parents[4]  # the repository (the package is installed -e)
CHART = ROOT / "charts" / "joule"
RULES = CHART / "files" / "prometheus-rules.yaml"
PROMETHEUS_PORT = 9090  # Prometheus' usual port, where it is free
DEMO_CLUSTER = "demo"
# The demo's logs and the examples' checkpoints (their ReadWriteMany volumes): cleared when a
# demo starts, kept after it ends for reading.
DEMO_DATA = Path("/tmp/joule-demo")
CHECKPOINTS = DEMO_DATA / "checkpoints"
# What the running demo started (pid + start time), for the next demo if this one dies.
STATE_FILE = DEMO_DATA / "demo.json"
# Copies of the kubelet's pod logs (<namespace>_<pod>_<uid>/<container>/<n>.log, CRI format),
# which the kubelet removes with each pod and `down` with the node.
POD_LOGS = DEMO_DATA / "logs" / "pods"
REPORTS = DEMO_DATA / "reports"  # `joule report` of each job, drawn as the demo ends
NODE_READY_TIMEOUT_S = 120.0
# Deleted jobs' workers get the pods' grace period to checkpoint and exit; then the cluster's
# teardown kills what is left.
WORKERS_EXIT_TIMEOUT_S = TERMINATION_GRACE_SECONDS + 15.0
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
Say = Callable[[str], None]


@dataclass
class Options:
    examples: Path
    until_done: bool = False
    timeout: float | None = None
    refresh: float = 2.0
    gpus: int = 4


@dataclass(frozen=True)
class Tools:
    operator: Image
    helm: Path
    prometheus: Path


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


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
    session: Ctrl-C or a closed terminal reaches the demo only, which stops the jobs' workers
    first (SIGTERM from the kubelet: they write a checkpoint), then the children."""

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


def wait_established(api: client.ApiClient, timeout: float = 60.0) -> None:
    """Not `kubectl wait`: asked before the API server has written a new CRD's first
    conditions, it fails at once ("<nil> is of the type <nil>") instead of waiting."""
    crds = client.ApiextensionsV1Api(api)
    deadline = time.monotonic() + timeout
    while True:
        crd = crds.read_custom_resource_definition("trainingjobs.joule.dev")
        conditions = (crd.status.conditions if crd.status else None) or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the TrainingJob CRD was not Established within {timeout:.0f} s")
        time.sleep(0.2)


def _kubectl(info: ClusterInfo, *args: str, stdin: str | None = None) -> str:
    return kubectl(info.kubectl, info.kubeconfig, list(args), stdin=stdin)


def manifests(path: Path) -> list[dict[str, Any]]:
    """The objects in a manifest file, or in the files of a folder that `kubectl apply -f`
    reads (.yaml, .yml, .json; not recursive)."""
    files = (
        sorted(p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES)
        if path.is_dir()
        else [path]
    )
    docs: list[dict[str, Any]] = []
    for f in files:
        try:
            docs += [d for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)]
        except yaml.YAMLError as exc:
            raise ValueError(f"{f}: not YAML: {exc}") from None
    return docs


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


def copy_pod_logs(source: Path, target: Path) -> int:
    """Copy each container log under ``source`` (the kubelet's podLogsDir) that grew since the
    last copy to the same place under ``target``; returns how many were copied. A pod that is
    removed meanwhile is skipped: its last copy stays."""
    copied = 0
    for log in source.glob("*/*/*.log"):
        dest = target / log.relative_to(source)
        try:
            if dest.exists() and dest.stat().st_size == log.stat().st_size:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, dest)
            copied += 1
        except OSError:
            continue
    return copied


def scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.read().decode()
    except OSError:
        return None


def fresh_data_folder(folder: Path) -> None:
    """An empty folder of our own at ``folder``. It is in /tmp, where anyone may make a
    name first: a link there would have root follow it (and later make a checkpoint folder
    world-writable wherever it points), so anything that is not our own plain folder is
    refused rather than followed."""
    if folder.is_symlink():
        raise RuntimeError(f"{folder} is a symbolic link; remove it and start the demo again")
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.mkdir(folder, 0o755)  # fails if anything took the name in between
    except FileExistsError:
        raise RuntimeError(
            f"{folder} could not be cleared (owned by someone else?); remove it and start "
            "the demo again"
        ) from None
    info = os.lstat(folder)
    if info.st_uid != os.geteuid():
        raise RuntimeError(f"{folder} is not ours (uid {info.st_uid}); remove it first")


class Demo:
    def __init__(self, options: Options, say: Say, interrupts: Interrupts | None = None) -> None:
        self.options, self.say = options, _quiet(say)
        self.interrupts = interrupts or Interrupts()
        self.settings = ClusterSettings(
            name=DEMO_CLUSTER, nodes=0, real_node=True, node_gpus=options.gpus
        )
        self.info: ClusterInfo | None = None
        self.pod_logs: Path | None = None  # the kubelet's podLogsDir
        self.prometheus_url = ""  # once it runs
        self.started_at = time.time()
        self.children: list[Child] = []
        self.state = leftovers.DemoState()
        self.owns_cluster = False  # not until no other demo runs: its cluster is not ours to stop
        self.started = time.monotonic()
        self.first_step_s: float | None = None

    def clear_previous(self) -> None:
        """Stop what an earlier demo left running and clear its data, before anything starts:
        a second operator beside the old one acts on every job twice, and the old cluster's
        workers would keep training (and writing checkpoints) beside the new ones."""
        previous = leftovers.load(STATE_FILE)
        me = process.record("demo", os.getpid())
        if previous.demo and process.alive(previous.demo):
            raise RuntimeError(
                f"another `joule demo` is running (pid {previous.demo.pid}); stop it first "
                f"(Ctrl-C in its terminal, or kill {previous.demo.pid})"
            )
        stopped = leftovers.describe(leftovers.stop(previous.children, grace_seconds=30))
        if status(self.settings) is not None:
            # The old jobs, their workers and volumes go with it: the new run starts fresh
            # rather than applying the examples over the old jobs.
            down(self.settings)
            stopped = ", ".join(filter(None, [stopped, f"cluster {DEMO_CLUSTER!r} and its pods"]))
        if stopped:
            self.say(f"stopped what a previous demo left running: {stopped}")
        # Old checkpoints go too: the new jobs would resume from them (or find themselves
        # already finished) instead of training from step 0.
        fresh_data_folder(DEMO_DATA)
        (DEMO_DATA / "logs").mkdir()
        self.state = leftovers.DemoState(demo=me)
        leftovers.save(STATE_FILE, self.state)
        self.owns_cluster = True

    def start_child(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        with self.interrupts.deferred():  # started and recorded, or neither
            child = Child(name, argv, env, log)
            self.children.append(child)
            self.state.children.append(child.record)
            leftovers.save(STATE_FILE, self.state)

    def up(self) -> None:
        say = self.say
        docs = manifests(self.options.examples)  # a broken file fails before anything starts
        self.clear_previous()
        say(
            "building the trainer image with buildah if its inputs changed (the first build "
            "installs torch from PyPI: several minutes)"
        )
        image = ensure_trainer(progress=say)
        built = f"built in {image.seconds:.0f}s" if image.built else "cached"
        say(f"trainer image {image.ref}: {built}")
        tools = self.tools()
        info = up(self.settings, progress=say)
        self.info = info
        assert info.node is not None  # real_node=True: up() raises where it cannot start one
        registry = info.node["registry"]
        self.pod_logs = NodeRecord.from_json(info.node).layout().pod_logs
        say(f"pushing the trainer image to the node's registry {registry}")
        push(image, registry=registry, progress=say)
        push(tools.operator, registry=registry, name=install.OPERATOR_NAME, tag=install.TAG,
             progress=say)  # fmt: skip
        say("installing the TrainingJob CRD")
        _kubectl(info, "apply", "-f", str(ROOT / "crds"))
        self.api = config.new_client_from_config(config_file=str(info.kubeconfig))
        wait_established(self.api)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        slots = str(self.options.gpus)

        def node_ready() -> bool:
            node = self.core.read_node(NODE_NAME)
            ready = any(
                c.type == "Ready" and c.status == "True" for c in node.status.conditions or []
            )
            return ready and (node.status.allocatable or {}).get(GPU_RESOURCE) == slots

        what = f"node {NODE_NAME!r} to be Ready with {slots} {GPU_RESOURCE}"
        _wait(node_ready, NODE_READY_TIMEOUT_S, what)
        say(f"node {NODE_NAME!r} Ready: {slots} {GPU_RESOURCE} slots (for pods, not GPUs)")
        self.install(info, tools)
        self.start_prometheus(info, tools.prometheus)
        self.make_volumes(info, docs)
        say(f"applying {self.options.examples}")
        for line in _kubectl(info, "apply", "-f", str(self.options.examples)).splitlines():
            say(f"  {line}")
        say(f"ready in {time.monotonic() - self.started:.1f}s; workers are starting")
        jobs = [d["metadata"]["name"] for d in docs if d.get("kind") == KIND]
        pod = f"{jobs[0]}-worker-0" if jobs else "<job>-worker-0"
        say(
            f"worker logs: KUBECONFIG={info.kubeconfig} {info.kubectl} logs -f {pod} "
            f"(`get pods` lists every worker; `exec` works too); copies kept in {POD_LOGS}"
        )

    def tools(self) -> Tools:
        """The operator image, helm and Prometheus: built once (minutes cold), then cached."""
        say = self.say
        say("building the operator image if its inputs changed")
        operator = ensure_operator(progress=say)
        say(f"operator image {operator.ref}: {'built' if operator.built else 'cached'}")
        say("building helm and Prometheus from their Go modules if not cached (minutes, once)")
        helm = ensure_helm(progress=say)
        prometheus, _ = ensure_prometheus(progress=say)
        return Tools(operator, helm, prometheus)

    def install(self, info: ClusterInfo, tools: Tools) -> None:
        """`helm install` of charts/joule: the operator and the node agent, as pods."""
        assert info.node is not None
        layout = NodeRecord.from_json(info.node).layout()
        values_file = DEMO_DATA / "values.yaml"
        values_file.write_text(yaml.safe_dump(install.values(layout)))
        self.say(
            f"helm install {install.RELEASE} charts/joule -n {install.NAMESPACE} -f {values_file}"
            " (the operator and the node agent, over its NVML double; waits until both run)"
        )
        argv = install.install_argv(tools.helm, info.kubeconfig, CHART, values_file)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=360)
        if proc.returncode != 0:
            raise RuntimeError(f"helm install failed: {proc.stderr.strip() or proc.stdout}")
        for component in ("operator", "node-agent"):
            pod = self.component_pod(component)
            self.say(f"  {component}: pod {install.NAMESPACE}/{pod.metadata.name} running")

    def component_pod(self, component: str) -> client.V1Pod:
        pods = self.core.list_namespaced_pod(
            install.NAMESPACE, label_selector=f"app.kubernetes.io/component={component}"
        ).items
        live = [
            p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp
        ]
        if not live:
            raise RuntimeError(f"no running {component} pod in {install.NAMESPACE}")
        return live[0]

    def start_prometheus(self, info: ClusterInfo, binary: Path) -> None:
        """Prometheus on 127.0.0.1, finding the operator, the node agent and the workers
        through the API server by their prometheus.io annotations, with Joule's rules."""
        folder = DEMO_DATA / "prometheus"
        folder.mkdir()
        config_file = folder / "prometheus.yml"
        config_file.write_text(kubernetes_config(info.kubeconfig, [RULES]))
        port = PROMETHEUS_PORT if port_free(PROMETHEUS_PORT) else free_port()
        self.prometheus_url = f"http://127.0.0.1:{port}"
        argv = prometheus_argv(binary, config_file, folder / "data", port)
        self.start_child(
            "prometheus", argv, dict(os.environ), DEMO_DATA / "logs" / "prometheus.log"
        )
        _wait(lambda: scrape(f"{self.prometheus_url}/-/ready") is not None, 60, "Prometheus")
        self.say(
            f"Prometheus: {self.prometheus_url} (it finds the operator, the node agent and the "
            "workers through the API server; try joule_job_power_watts, or /alerts)"
        )

    def make_volumes(self, info: ClusterInfo, docs: list[dict[str, Any]]) -> None:
        """The ReadWriteMany volumes the examples claim (``joule.demo.storage``)."""
        claims = storage.claims(docs)
        if not claims:
            return
        storage.make_folders(claims, CHECKPOINTS)
        objects = [storage.storage_class()]
        objects += [storage.persistent_volume(c, CHECKPOINTS) for c in claims]
        _kubectl(info, "apply", "-f", "-", stdin=yaml.safe_dump_all(objects))
        for c in claims:
            self.say(
                f"volume for claim {c.name} ({storage.STORAGE_CLASS}, ReadWriteMany): "
                f"{CHECKPOINTS / c.folder}"
            )

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
        endpoints = [f"{'prometheus':<9} {self.prometheus_url}"]
        for component, port in (("operator", 8080), ("node-agent", 9410)):
            with contextlib.suppress(Exception):  # restarting: shown again next time
                ip = self.component_pod(component).status.pod_ip
                endpoints.append(f"{component:<9} http://{ip}:{port}/metrics")
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
            self.copy_logs()
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

    def stop_jobs(self, info: ClusterInfo) -> None:
        """Delete every TrainingJob and wait (bounded) for its pods to go: the kubelet sends
        the workers SIGTERM, and they write a last checkpoint within the grace period."""
        try:
            jobs = _kubectl(info, "get", PLURAL, "-A", "-o", "name").split()
        except Exception:  # the cluster is gone or broken: its teardown stops the workers
            return
        if not jobs:
            return
        self.say("deleting the jobs: their workers get SIGTERM and write a last checkpoint")
        _kubectl(info, "delete", PLURAL, "-A", "--all", "--wait=false")

        def workers_gone() -> bool:
            self.copy_logs()  # their last lines, before the kubelet removes them
            pods = _kubectl(info, "get", "pods", "-A", "-l", LABEL_JOB, "-o", "name")
            return not pods.split()

        try:
            _wait(workers_gone, WORKERS_EXIT_TIMEOUT_S, "the workers to exit")
        except RuntimeError as exc:
            self.say(f"{exc}; the node's teardown stops the rest")

    def write_reports(self) -> None:
        """`joule report` of each job from the demo's Prometheus, before the jobs go: the
        pictures of what happened stay in REPORTS."""
        if not self.prometheus_url:
            return
        try:
            jobs = self.jobs()
        except Exception:  # the cluster is gone: nothing to name the reports by
            return
        from joule.report.draw import write
        from joule.report.sources import from_prometheus

        REPORTS.mkdir(exist_ok=True)
        for job in jobs:
            ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
            try:
                report = from_prometheus(
                    self.prometheus_url, ns, name, self.started_at, time.time()
                )
                paths = [write(report, REPORTS / f"{name}{suffix}") for suffix in (".html", ".png")]
            except Exception as exc:  # a report is not worth a teardown left half done
                self.say(f"no report for {ns}/{name}: {exc}")
                continue
            self.say(f"report of {ns}/{name}: {paths[0]} and {paths[1].name}")

    def copy_logs(self) -> None:
        if self.pod_logs is not None:
            copy_pod_logs(self.pod_logs, POD_LOGS)

    def down(self) -> None:
        self.interrupts.stopping = True  # from here on, no signal cuts the teardown short
        if not self.owns_cluster:
            return
        if self.info is not None:
            self.write_reports()
            try:
                self.stop_jobs(self.info)
            except Exception as exc:  # the rest of the teardown runs whatever happened here
                self.say(f"could not delete the jobs ({exc}); the node's teardown stops them")
        self.copy_logs()
        self.say(
            "stopping Prometheus and the cluster (control plane, node with the operator and "
            "the node agent, registry)"
        )
        leftovers.stop([c.record for c in reversed(self.children)], grace_seconds=30)
        down(self.settings)
        STATE_FILE.unlink(missing_ok=True)  # a failure above keeps it, for the next demo
        self.say(f"stopped; nothing left running (logs and checkpoints kept in {DEMO_DATA})")


def run_demo(options: Options, say: Say) -> int:
    """The demo; 1 at once, with one line saying why, where this machine cannot run its
    node (not root, not Linux)."""
    reason = unavailable_reason()
    if reason is not None:
        say(f"cannot start the demo's node: {reason}")
        return 1
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
