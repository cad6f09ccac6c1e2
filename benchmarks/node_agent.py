"""What the node agent costs on a GPU node: one update (pod-resources answer, every GPU read,
limits planned, ledger advanced and written to disk, snapshot swapped) and one /metrics
render, with 8 GPUs held by 8 pods, over the NVML double (a real GPU's NVML calls take tens
of microseconds each; the double reads and writes a JSON file per call, so these figures
are an upper bound on the agent's own work plus the double's). The operator's parse of the
exposition is timed too.

    .venv/bin/python benchmarks/node_agent.py [--gpus 8] [--updates 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from joule.agent_metrics import parse_agent_metrics
from joule.nodeagent.agent import Agent, AgentConfig
from joule.nodeagent.gpu import Gpus
from joule.nodeagent.podresources import ContainerDevices, PodDevices
from joule.nodeagent.pods import PodInfo
from joule.nodeagent.simnvml import SimulatedNvml


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--updates", type=int, default=200)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        uuids = [f"GPU-{i:08x}" for i in range(args.gpus)]
        nvml = SimulatedNvml(state / "gpus.json", uuids)
        nvml.nvmlInit()
        devices = [
            PodDevices("ns", f"w{i}", (ContainerDevices("c", {"nvidia.com/gpu": (u,)}),))
            for i, u in enumerate(uuids)
        ]
        pods = {
            ("ns", f"w{i}"): PodInfo(f"uid{i}", "ns", f"w{i}", "Running", "job", "40")
            for i in range(args.gpus)
        }
        config = AgentConfig("bench", state, rapl_root=state / "none")
        agent = Agent(config, Gpus(nvml, "simulated"), lambda: devices,
                      lambda ns, name: pods.get((ns, name)))  # fmt: skip
        registry = CollectorRegistry(auto_describe=False)
        registry.register(agent.collector)
        updates, renders, parses = [], [], []
        size = 0
        for _ in range(args.updates):
            t0 = time.perf_counter()
            agent.update()
            t1 = time.perf_counter()
            text = generate_latest(registry)
            t2 = time.perf_counter()
            parse_agent_metrics(text.decode())
            t3 = time.perf_counter()
            updates.append(t1 - t0)
            renders.append(t2 - t1)
            parses.append(t3 - t2)
            size = len(text)

    def ms(xs: list[float]) -> str:
        return f"median {statistics.median(xs) * 1e3:.2f} ms, max {max(xs) * 1e3:.2f} ms"

    print(f"{args.gpus} GPUs held by {args.gpus} pods, {args.updates} updates:")
    print(f"  update (read, limits, ledger to disk): {ms(updates)}")
    print(f"  /metrics render: {ms(renders)}, {size} bytes")
    print(f"  operator's parse of it: {ms(parses)}")


if __name__ == "__main__":
    main()
