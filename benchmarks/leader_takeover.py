"""Leader election: how long the operator is without a leader. Prints figures.

    .venv/bin/python benchmarks/leader_takeover.py [--rounds 5]

Two `joule operator` replicas with JOULE_LEADER_ELECT=true share one Lease. Each round:

1. SIGKILL: the leader is killed; measured from the kill to (a) the Lease naming the other
   replica, and (b) the other replica's first reconcile of a job created at the kill (its
   pods exist). The killed replica comes back as a standby.
2. SIGTERM: the leader is stopped as a rolling update stops it; measured from the signal to
   the Lease naming the other replica (the leader releases it).

It brings up its own cluster (``bench-leader``: kwok nodes only) and takes it down at the end.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubernetes import client, config

from joule.cluster import ClusterSettings, down, up

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE, LEASE = "bench-leader", "joule-operator"
GROUP, VERSION, PLURAL = "joule.dev", "v1alpha1", "trainingjobs"


class Replica:
    def __init__(self, identity: str, kubeconfig: Path, logs: Path) -> None:
        self.identity, self.kubeconfig, self.logs = identity, kubeconfig, logs
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "JOULE_LEADER_ELECT": "true",
            "JOULE_LEASE_NAME": LEASE,
            "JOULE_LEASE_NAMESPACE": NAMESPACE,
            "JOULE_POD_NAME": self.identity,
            "JOULE_WATCH_NAMESPACES": NAMESPACE,
            "JOULE_METRICS_PORT": "0",
            "JOULE_HEALTH_PORT": "0",
            "JOULE_LOG_FORMAT": "plain",
        }
        with open(self.logs / f"{self.identity}.log", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "joule", "operator"], env=env, stdout=out, stderr=out
            )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(30)


def holder(coordination: client.CoordinationV1Api) -> str | None:
    try:
        return coordination.read_namespaced_lease(LEASE, NAMESPACE).spec.holder_identity
    except client.ApiException:
        return None


def wait(predicate, timeout: float = 60.0) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"no takeover within {timeout:.0f}s")
        time.sleep(0.05)
    return time.monotonic()


def summary(name: str, values: list[float]) -> str:
    return (
        f"{name:<44} median {statistics.median(values):5.1f} s   "
        f"min {min(values):5.1f} s   max {max(values):5.1f} s   (n={len(values)})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    settings = ClusterSettings(name="bench-leader", nodes=2, real_node=False)
    info = up(settings, progress=lambda m: print(f"joule: {m}", file=sys.stderr, flush=True))
    logs = Path(tempfile.mkdtemp(prefix="joule-leader-"))
    replicas: dict[str, Replica] = {}
    try:
        kubectl = [str(info.kubectl), f"--kubeconfig={info.kubeconfig}"]
        subprocess.run([*kubectl, "apply", "-f", str(ROOT / "crds")], check=True)
        subprocess.run([*kubectl, "create", "namespace", NAMESPACE], check=True)
        api = config.new_client_from_config(config_file=str(info.kubeconfig))
        coordination, core = client.CoordinationV1Api(api), client.CoreV1Api(api)
        custom = client.CustomObjectsApi(api)
        for identity in ("replica-a", "replica-b"):
            replicas[identity] = Replica(identity, info.kubeconfig, logs)
            replicas[identity].start()
        wait(lambda: holder(coordination) in replicas)

        killed_lease, killed_pods, handover = [], [], []
        for n in range(args.rounds):
            leader = replicas[holder(coordination) or ""]
            name = f"job-{n}"
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "TrainingJob",
                "metadata": {"name": name},
                "spec": {"image": "trainer:bench", "replicas": 2, "gpusPerReplica": 0},
            }
            sent = time.monotonic()
            leader.signal(signal.SIGKILL)
            custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
            leased = wait(lambda ld=leader: holder(coordination) not in (None, ld.identity))
            selector = f"joule.dev/job-name={name}"
            pods = wait(
                lambda s=selector: (
                    len(core.list_namespaced_pod(NAMESPACE, label_selector=s).items) == 2
                )
            )
            killed_lease.append(leased - sent)
            killed_pods.append(pods - sent)
            leader.start()  # back as a standby

            leader = replicas[holder(coordination) or ""]
            sent = time.monotonic()
            leader.signal(signal.SIGTERM)
            handover.append(
                wait(lambda ld=leader: holder(coordination) not in (None, ld.identity)) - sent
            )
            leader.start()
            print(
                f"round {n + 1}: SIGKILL -> lease {killed_lease[-1]:.1f} s, -> new job's pods "
                f"{killed_pods[-1]:.1f} s; SIGTERM -> lease {handover[-1]:.1f} s",
                flush=True,
            )
        print()
        print(summary("SIGKILL of the leader -> Lease taken over", killed_lease))
        print(summary("SIGKILL of the leader -> a new job's pods", killed_pods))
        print(summary("SIGTERM of the leader -> Lease handed over", handover))
        print(f"\n(lease 8 s, renew deadline 6 s, retry 1 s; logs in {logs})")
    finally:
        for replica in replicas.values():
            if replica.proc and replica.proc.poll() is None:
                replica.proc.kill()
        down(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
