"""Operator latency and throughput against the local control plane. Prints figures.

    .venv/bin/python benchmarks/operator_latency.py [--jobs 100] [--burst 200]

1. Sequential: create one TrainingJob (2 workers) at a time; time from the create call to
   the moment the last of its pods is seen by a watch. p50 / p99 over ``--jobs`` jobs. Each
   next job is created once the one before is Running and the cluster is idle again.
2. Burst: create ``--burst`` jobs at once; time until every pod exists, and until every
   job's status says Running (created, scheduled, marked Running by kwok, status written).
3. Sequential again, now that every job of the burst exists.
4. The operator's memory (RSS now, and its peak) after all that.

It brings up its own cluster (``bench``: kwok nodes only, of 32 GPUs, 16 or as many as all the
jobs need, so capacity never limits) and
takes it down at the end. Not a test: nothing is asserted, the numbers are for reading.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client, config, watch
from prometheus_client.parser import text_string_to_metric_families
from urllib3.exceptions import ProtocolError

from joule.cluster import ClusterSettings, down, up
from joule.cluster.process import rss_bytes
from joule.cluster.settings import NodeShape
from joule.demo.run import wait_established

ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION, PLURAL = "joule.dev", "v1alpha1", "trainingjobs"


def job_body(name: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {"image": "trainer:bench", "replicas": 2, "gpusPerReplica": 1},
    }


class PodClock:
    """Watches pods in a namespace and remembers when each was first seen."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.first_seen: dict[str, float] = {}
        self.cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(core, namespace), daemon=True)
        self._thread.start()

    def _run(self, core: client.CoreV1Api, namespace: str) -> None:
        while not self._stop:
            w = watch.Watch()
            try:
                for event in w.stream(core.list_namespaced_pod, namespace, timeout_seconds=30):
                    name = event["object"].metadata.name
                    with self.cond:
                        self.first_seen.setdefault(name, time.monotonic())
                        self.cond.notify_all()
                    if self._stop:
                        w.stop()
                        break
            except (ProtocolError, OSError):  # the cluster going down at the end
                if not self._stop:
                    time.sleep(0.2)

    def wait_for(self, names: list[str], timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(n in self.first_seen for n in names):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"pods {names} not all created within {timeout}s")
                self.cond.wait(left)
            return max(self.first_seen[n] for n in names)

    def stop(self) -> None:
        self._stop = True


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api_requests(kubectl: list[str]) -> Counter[str]:
    """The API server's count of requests so far, by verb and resource (every client)."""
    out = subprocess.run(
        [*kubectl, "get", "--raw", "/metrics"], check=True, capture_output=True, text=True
    ).stdout
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(out):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            if sample.name == "apiserver_request_total":
                labels = sample.labels
                sub = f"/{labels['subresource']}" if labels.get("subresource") else ""
                counts[f"{labels['verb']} {labels['resource']}{sub}"] += int(sample.value)
    return counts


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def settle(custom: client.CustomObjectsApi, ns: str, name: str, timeout: float = 60) -> None:
    """Wait until the job is Running (its pods scheduled, started by kwok, the status
    written) and a moment more: the next job then meets an idle cluster, as the target
    is stated, not the tail of this one's start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        if job.get("status", {}).get("phase") == "Running":
            break
        time.sleep(0.05)
    time.sleep(0.3)


def sequential(
    custom: client.CustomObjectsApi, clock: PodClock, ns: str, stem: str, jobs: int, note: str
) -> None:
    """Create ``jobs`` jobs one at a time; print create call -> all pods exist."""
    latencies = []
    for i in range(jobs):
        name = f"{stem}-{i}"
        start = time.monotonic()
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job_body(name))
        done = clock.wait_for([f"{name}-worker-0", f"{name}-worker-1"])
        latencies.append(done - start)
        settle(custom, ns, name)
    print(f"\nsequential{note}: {jobs} jobs x 2 workers, create call -> all pods exist")
    print(
        f"  p50 {pct(latencies, 0.5) * 1000:.0f} ms   p90 {pct(latencies, 0.9) * 1000:.0f} ms"
        f"   p99 {pct(latencies, 0.99) * 1000:.0f} ms   max {max(latencies) * 1000:.0f} ms"
        f"   mean {statistics.mean(latencies) * 1000:.0f} ms",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="sequential jobs (default 100)")
    parser.add_argument("--burst", type=int, default=200, help="jobs at once (default 200)")
    args = parser.parse_args()

    gpus = 2 * (2 * args.jobs + args.burst)
    nodes = max(16, -(-gpus // 32))
    settings = ClusterSettings(name="bench", nodes=nodes, shape=NodeShape(gpus=32), real_node=False)
    print(f"bringing up the bench cluster ({nodes} nodes x 32 GPUs)...", flush=True)
    info = up(settings)
    print(f"cluster up in {info.started_in_s or 0:.1f}s", flush=True)
    kubectl = [str(info.kubectl), f"--kubeconfig={info.kubeconfig}"]
    subprocess.run([*kubectl, "apply", "-f", str(ROOT / "crds")], check=True, capture_output=True)
    api = config.new_client_from_config(config_file=str(info.kubeconfig))
    wait_established(api)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)

    env = {
        **os.environ,
        "KUBECONFIG": str(info.kubeconfig),
        "JOULE_METRICS_PORT": "0",
        "JOULE_LOG_FORMAT": "json",
        "MALLOC_ARENA_MAX": "2",  # as the operator's image sets it
    }
    log = open(Path(info.kubeconfig).parent / "operator.log", "wb")  # noqa: SIM115
    operator = subprocess.Popen(
        [sys.executable, "-m", "joule", "operator"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        time.sleep(3)  # let it connect and list
        print(f"operator RSS idle: {(rss_bytes(operator.pid) or 0) / 2**20:.0f} MiB", flush=True)
        ns = f"bench-{uuid.uuid4().hex[:6]}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
        time.sleep(1)  # default ServiceAccount
        clock = PodClock(core, ns)

        sequential(custom, clock, ns, "seq", args.jobs, "")
        names = [f"burst-{i}" for i in range(args.burst)]
        pids = {p.name: p.pid for p in info.processes} | {"joule operator": operator.pid}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        requests_before = api_requests(kubectl)
        start = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda n: custom.create_namespaced_custom_object(
                        GROUP, VERSION, ns, PLURAL, job_body(n)
                    ),
                    names,
                )
            )
        applied = time.monotonic() - start
        all_pods = (
            clock.wait_for([f"{n}-worker-{i}" for n in names for i in range(2)], timeout=600)
            - start
        )
        while True:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
            running = sum(
                1
                for j in items
                if j["metadata"]["name"].startswith("burst-")
                and j.get("status", {}).get("phase") == "Running"
            )
            if running == args.burst:
                break
            if time.monotonic() - start > 600:
                print(f"  gave up: {running}/{args.burst} Running after 600 s")
                break
            time.sleep(0.2)
        reconciled = time.monotonic() - start
        print(
            f"\nburst: {args.burst} jobs x 2 workers created at once "
            f"(create calls took {applied:.1f} s)"
        )
        print(
            f"  all {2 * args.burst} pods exist after {all_pods:.1f} s; "
            f"all jobs Running (status written) after {reconciled:.1f} s",
            flush=True,
        )
        # Where the cores went meanwhile: on 2 cores every component competes for them.
        spent = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        print(
            f"  CPU seconds used in those {reconciled:.0f} s: "
            + ", ".join(f"{n} {s:.1f}" for n, s in sorted(spent.items(), key=lambda i: -i[1])),
            flush=True,
        )
        # What the API server was asked meanwhile, by everyone (the operator, kwok, the
        # scheduler, the controllers, this script), per job of the burst.
        made = api_requests(kubectl) - requests_before
        print(
            f"  API requests in those {reconciled:.0f} s: {sum(made.values())}, per job: "
            + ", ".join(f"{k} {v / args.burst:.1f}" for k, v in made.most_common(12)),
            flush=True,
        )

        print(
            f"  operator RSS after the burst ({args.jobs + args.burst} jobs): "
            f"{(rss_bytes(operator.pid) or 0) / 2**20:.0f} MiB",
            flush=True,
        )

        # The same one-at-a-time creates, now that the burst's jobs all exist: what a
        # cluster full of jobs costs each new one.
        sequential(custom, clock, ns, "late", args.jobs, f", with {args.jobs + args.burst} "
                   "jobs existing")  # fmt: skip

        status = Path(f"/proc/{operator.pid}/status").read_text()
        peak = next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")
        )
        print(
            f"\noperator memory with {2 * args.jobs + args.burst} jobs: "
            f"RSS {(rss_bytes(operator.pid) or 0) / 2**20:.0f} MiB, peak {peak / 1024:.0f} MiB"
        )
        clock.stop()
    finally:
        operator.terminate()
        operator.wait(20)
        down(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
