"""What Joule survives, measured: faults of the control plane and the operator under load.
Prints a table.

    .venv/bin/python benchmarks/faults.py [--jobs 100] [--cases all|name,name]

Each case runs on its own namespace of ``--jobs`` TrainingJobs of 2 workers (kwok nodes: the
pods are scheduled and marked Running by kwok, so nothing but the control loop is measured),
with the operator as a separate process, as `joule operator` runs:

- ``operator-kill-burst``: the jobs applied at once; the operator SIGKILLed 0.5 s later and
  started again 1 s after that.
- ``operator-kill-resize``: the jobs Running with 2 workers (elastic 1-4); every job scaled to
  4; the operator SIGKILLed 0.3 s later and started again 1 s after that.
- ``apiserver-restart``: the jobs applied at once; kube-apiserver SIGKILLed right after and
  started again 2 s later.
- ``etcd-restart``: the same, with etcd.

A watch of the namespace's pods sees every pod that ever existed. Per case: whether every job
reached its goal (Running with its workers), duplicate pods (a job holding more live pods
than it wants at any moment: must be 0), lost status (a job whose status lost its startTime:
must be 0), restarts counted (nothing fails in these cases, so each is a group restarted on a
lost fact, e.g. a worker whose Running status kwok could not write while etcd was down,
released at the startup timeout), pods made beyond the goal (churn), and the recovery time
from the fault to every job at its goal. Energy is not measured here (kwok
workers have no meters): the same three faults (the operator, kube-apiserver and etcd
SIGKILLed) are run on the real node, with the node agent's meter, by
tests/e2e/test_energy.py::test_the_operator_api_server_or_etcd_killed_lose_and_double_none_of_a_jobs_energy,
which prints the joules lost or doubled across each.

It brings up its own cluster (``faults``) and takes it down at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client, config, watch

from joule.cluster import ClusterSettings, down, up
from joule.cluster.lifecycle import restart
from joule.cluster.settings import NodeShape
from joule.constants import LABEL_JOB

ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION, PLURAL = "joule.dev", "v1alpha1", "trainingjobs"
LOGS = Path("/tmp/joule-faults-logs")


def job_body(name: str, replicas: int = 2) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "image": "trainer:faults", "replicas": replicas, "gpusPerReplica": 1,
            "elastic": {"minReplicas": 1, "maxReplicas": 4},
        },
    }  # fmt: skip


@dataclass
class PodLedger:
    """Every pod of a namespace as a watch saw it: live pods per job over time."""

    live: dict[str, dict[str, str]] = field(default_factory=dict)  # job -> uid -> name
    most: dict[str, int] = field(default_factory=dict)  # job -> most live pods at once
    made: dict[str, int] = field(default_factory=dict)  # job -> pods ever created
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def follow(self, core: client.CoreV1Api, namespace: str) -> None:
        seen: set[str] = set()
        version = None
        while not self.stop.is_set():
            try:
                stream = watch.Watch().stream(
                    core.list_namespaced_pod, namespace, resource_version=version,
                    timeout_seconds=30, _request_timeout=40,
                )  # fmt: skip
                for event in stream:
                    pod = event["object"]
                    version = pod.metadata.resource_version
                    job = (pod.metadata.labels or {}).get(LABEL_JOB)
                    if job is None:
                        continue
                    uid = pod.metadata.uid
                    with self.lock:
                        pods = self.live.setdefault(job, {})
                        if event["type"] == "DELETED" or pod.metadata.deletion_timestamp:
                            pods.pop(uid, None)
                        else:
                            pods[uid] = pod.metadata.name
                        if uid not in seen:
                            seen.add(uid)
                            self.made[job] = self.made.get(job, 0) + 1
                        self.most[job] = max(self.most.get(job, 0), len(pods))
                    if self.stop.is_set():
                        break
            except Exception:  # the API server is down on purpose: watch again
                version = None
                time.sleep(0.5)


class Operator:
    """`joule operator` as a separate process, killable and restartable."""

    def __init__(self, kubeconfig: Path, log: Path) -> None:
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "JOULE_METRICS_PORT": "0",
                    "JOULE_HEALTH_PORT": "0", "JOULE_LOG_FORMAT": "json"}  # fmt: skip
        self.log = open(log, "ab")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "joule", "operator"], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@dataclass
class Row:
    case: str
    jobs: int
    reached: int = 0
    duplicates: int = 0
    lost_status: int = 0
    churn: int = 0
    restarts: int = 0
    recovery_s: float | None = None
    note: str = ""


def at_goal(job: dict, replicas: int) -> bool:
    st = job.get("status") or {}
    return st.get("phase") == "Running" and st.get("readyReplicas", 0) >= replicas


def run_case(
    name: str,
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    jobs: int,
    prepare: Callable[[str, list[str]], None],
    fault: Callable[[str, list[str]], float],
    replicas: int,
    timeout: float = 420.0,  # past the startup timeout (300 s) and its retry
) -> Row:
    """``prepare`` brings the namespace to the case's start; ``fault`` acts and returns when
    the fault began (monotonic). Then wait for every job at its goal."""
    ns = f"{name}-{uuid.uuid4().hex[:4]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    time.sleep(1.5)  # the default ServiceAccount
    ledger = PodLedger()
    threading.Thread(target=ledger.follow, args=(core, ns), daemon=True).start()
    names = [f"j{i}" for i in range(jobs)]
    prepare(ns, names)
    began = fault(ns, names)
    row = Row(name, jobs)
    items: list[dict] = []
    while time.monotonic() - began < timeout:
        try:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
        except Exception:
            time.sleep(0.5)
            continue
        if len(items) == jobs and all(at_goal(j, replicas) for j in items):
            row.recovery_s = time.monotonic() - began
            break
        time.sleep(0.5)
    time.sleep(2.0)  # let the ledger see what came last
    ledger.stop.set()
    row.reached = sum(at_goal(j, replicas) for j in items)
    with ledger.lock:
        row.duplicates = sum(max(0, ledger.most.get(n, 0) - replicas) for n in names)
        row.churn = sum(max(0, ledger.made.get(n, 0) - replicas) for n in names)
    for j in items:
        st = j.get("status") or {}
        # Nothing failed in these cases: a restart is a decision made on a lost fact.
        row.restarts += int(st.get("restarts", 0))
        if not st.get("startTime"):
            row.lost_status += 1
    if row.recovery_s is None:
        row.note = f"{row.reached}/{jobs} at their goal after {timeout:.0f} s"
    return row


def apply_all(custom: client.CustomObjectsApi, ns: str, names: list[str]) -> None:
    """Create every job, retrying through an API server that is down, as kubectl or a GitOps
    controller would."""

    def create(name: str) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job_body(name))
                return
            except client.ApiException as exc:
                if exc.status == 409:  # made by the try the outage cut short
                    return
                if time.monotonic() > deadline:
                    raise
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, names))


def wait_goal(custom: client.CustomObjectsApi, ns: str, jobs: int, replicas: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
        if len(items) == jobs and all(at_goal(j, replicas) for j in items):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{ns}: the jobs did not all reach {replicas} running workers")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="jobs per case (default 100)")
    parser.add_argument("--cases", default="all", help="comma-separated case names, or all")
    args = parser.parse_args()

    # Every case's jobs stay: 2 + 4 + 2 + 2 GPUs per job in all, and room to spare, so that
    # capacity never holds a job back.
    settings = ClusterSettings(name="faults", nodes=-(-12 * args.jobs // 32) + 1,
                               shape=NodeShape(gpus=32), real_node=False)  # fmt: skip
    print(f"bringing up the faults cluster ({settings.nodes} kwok nodes x 32 GPUs)...",
          flush=True)  # fmt: skip
    info = up(settings)
    kubectl = [str(info.kubectl), f"--kubeconfig={info.kubeconfig}"]
    subprocess.run([*kubectl, "apply", "-f", str(ROOT / "crds")], check=True, capture_output=True)
    api = config.new_client_from_config(config_file=str(info.kubeconfig))
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    time.sleep(2)  # the CRD established
    operator = Operator(info.kubeconfig, Path(info.kubeconfig).parent / "operator.log")
    operator.start()
    time.sleep(3)

    def kill_operator(after: float) -> Callable[[str, list[str]], float]:
        def fault(ns: str, names: list[str]) -> float:
            time.sleep(after)
            began = time.monotonic()
            operator.kill()
            time.sleep(1.0)
            operator.start()
            return began

        return fault

    def burst(ns: str, names: list[str]) -> None:
        threading.Thread(target=apply_all, args=(custom, ns, names), daemon=True).start()

    def running_then_scaled(ns: str, names: list[str]) -> None:
        apply_all(custom, ns, names)
        wait_goal(custom, ns, len(names), 2)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: custom.patch_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, n, {"spec": {"replicas": 4}}), names))  # fmt: skip

    def restart_component(component: str) -> Callable[[str, list[str]], float]:
        def fault(ns: str, names: list[str]) -> float:
            time.sleep(0.5)  # the burst under way
            began = time.monotonic()
            restart(settings, component, down_seconds=2.0)
            return began

        return fault

    cases = {
        "operator-kill-burst": (burst, kill_operator(0.5), 2),
        "operator-kill-resize": (running_then_scaled, kill_operator(0.3), 4),
        "apiserver-restart": (burst, restart_component("kube-apiserver"), 2),
        "etcd-restart": (burst, restart_component("etcd"), 2),
    }
    chosen = list(cases) if args.cases == "all" else args.cases.split(",")
    rows = []
    try:
        for name in chosen:
            prepare, fault, replicas = cases[name]
            print(f"case {name}: {args.jobs} jobs...", flush=True)
            rows.append(run_case(name, custom, core, args.jobs, prepare, fault, replicas))
    finally:
        operator.stop()
        # The components' and the operator's logs outlive the cluster, for what went wrong.
        shutil.rmtree(LOGS, ignore_errors=True)
        shutil.copytree(settings.state_dir / "logs", LOGS, dirs_exist_ok=True)
        shutil.copy(Path(info.kubeconfig).parent / "operator.log", LOGS / "operator.log")
        print(f"logs: {LOGS}", flush=True)
        down(settings)

    head = f"{'case':<22} {'jobs':>5} {'at goal':>8} {'duplicate pods':>15} " \
           f"{'lost status':>12} {'restarts':>9} {'churn pods':>11} {'recovery s':>11}"  # fmt: skip
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        rec = f"{r.recovery_s:.1f}" if r.recovery_s is not None else "-"
        print(f"{r.case:<22} {r.jobs:>5} {r.reached:>8} {r.duplicates:>15} {r.lost_status:>12} "
              f"{r.restarts:>9} {r.churn:>11} {rec:>11}  {r.note}")  # fmt: skip
    return 0 if all(r.recovery_s is not None and not r.duplicates and not r.lost_status
                    for r in rows) else 1  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
