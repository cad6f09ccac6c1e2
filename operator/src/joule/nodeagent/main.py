"""``joule node-agent``: wires the agent to the kubelet, NVML (or its double) and the API
server, and runs it until SIGTERM."""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from joule.nodeagent.agent import Agent, AgentConfig, serve
from joule.nodeagent.gpu import Gpus
from joule.nodeagent.podresources import PodResourcesClient, PodResourcesError

log = logging.getLogger("joule.nodeagent")
SIMULATED_STATE = "simulated-gpus.json"


@dataclass(frozen=True)
class Options:
    node: str
    state_dir: Path
    socket: Path
    gpus: str  # "nvml" or "simulated"
    port: int
    interval: float
    resource: str
    simulated_watts: float


def _simulated(options: Options, kubelet: PodResourcesClient) -> Gpus:
    """The NVML double over the GPUs the kubelet can allocate: the device plugin's IDs."""
    from joule.nodeagent.simnvml import SimulatedNvml

    deadline = time.monotonic() + 120
    while True:
        try:
            ids = kubelet.allocatable().get(options.resource, ())
            if ids:
                break
            why = f"the kubelet offers no {options.resource}"
        except PodResourcesError as exc:
            why = str(exc)
        if time.monotonic() > deadline:
            raise SystemExit(f"joule node-agent: no GPUs to simulate: {why}")
        log.info("waiting for the kubelet to offer %s: %s", options.resource, why)
        time.sleep(2)
    nvml = SimulatedNvml(
        options.state_dir / SIMULATED_STATE, sorted(ids), active_watts=options.simulated_watts
    )
    nvml.nvmlInit()
    return Gpus(nvml, "simulated")


def run(options: Options) -> int:
    from kubernetes import client
    from kubernetes import config as kube_config

    from joule.nodeagent.pods import PodCache

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    options.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    kubelet = PodResourcesClient(options.socket)
    gpus = _simulated(options, kubelet) if options.gpus == "simulated" else Gpus.open_nvml()
    pods = PodCache(client.CoreV1Api(), options.node)
    pods.start()
    if not pods.synced.wait(60):
        raise SystemExit(f"joule node-agent: could not list the pods of node {options.node}")
    config = AgentConfig(
        node=options.node,
        state_dir=options.state_dir,
        interval=options.interval,
        resource=options.resource,
    )
    agent = Agent(config, gpus, kubelet.list, pods.get)
    log.info("node %s: %d GPUs (%s); /metrics on :%d", options.node, len(gpus.uuids()),
             gpus.source, options.port)  # fmt: skip
    server = serve(agent, options.port)

    def stop(signum: int, frame: FrameType | None) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        agent.run()
    finally:
        # No agent, no one to restore a pod's limit when it ends: leave every GPU at its
        # default. A successor sets the running pods' limits again within an interval.
        agent.restore_all()
        server.shutdown()
        pods.stop()
        kubelet.close()
        gpus.close()
    return 0
