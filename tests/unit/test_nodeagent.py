"""The node agent's decisions and its loop, over the NVML double (a faithful stand-in for the
few pynvml calls; tests/unit/test_nodeagent_gpu.py holds it to pynvml's behaviour). The
kubelet's and the API server's answers are given as they would arrive; the real ones are
exercised in tests/integration/test_pod_resources.py and tests/e2e/test_energy.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from joule.agent_metrics import counter_key, limit_report, parse_agent_metrics
from joule.nodeagent import ledger
from joule.nodeagent.agent import Agent, AgentConfig
from joule.nodeagent.gpu import Gpus
from joule.nodeagent.ledger import Holder, Meter, Record
from joule.nodeagent.limits import Limits, Refusal, Request, parse_annotation, plan
from joule.nodeagent.podresources import ContainerDevices, PodDevices
from joule.nodeagent.pods import PodInfo
from joule.nodeagent.simnvml import SimulatedNvml

GPUS = ["GPU-a", "GPU-b"]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Node:
    """The node's side: an NVML double on a shared clock, what the kubelet lists, the pods."""

    def __init__(self, tmp: Path, root: bool = True) -> None:
        self.clock = Clock()
        self.tmp = tmp
        self.root = root
        self.devices: list[PodDevices] = []
        self.pods: dict[tuple[str, str], PodInfo] = {}

    def nvml(self) -> SimulatedNvml:
        nv = SimulatedNvml(self.tmp / "gpus.json", GPUS, clock=self.clock,
                           is_root=lambda: self.root)  # fmt: skip
        nv.nvmlInit()
        return nv

    def agent(self) -> Agent:
        boot = self.tmp / "boot_id"
        if not boot.exists():
            boot.write_text("boot-1\n")
        config = AgentConfig("n1", self.tmp, interval=5, rapl_root=self.tmp / "no-rapl",
                             boot_id_file=boot)  # fmt: skip
        return Agent(config, Gpus(self.nvml(), "simulated"), lambda: list(self.devices),
                     lambda ns, name: self.pods.get((ns, name)), clock=self.clock)  # fmt: skip

    def run(self, name: str, gpus: list[str], limit: str | None = None, uid: str = "") -> None:
        uid = uid or f"uid-{name}"
        self.pods[("ns", name)] = PodInfo(uid, "ns", name, "Running", "job", limit)
        self.devices = [d for d in self.devices if d.name != name] + [
            PodDevices("ns", name, (ContainerDevices("trainer", {"nvidia.com/gpu": tuple(gpus)}),))
        ]

    def end(self, name: str) -> None:
        self.pods.pop(("ns", name), None)
        self.devices = [d for d in self.devices if d.name != name]

    def tick(self, agent: Agent, seconds: float) -> None:
        self.clock.t += seconds
        agent.update()


def exposition(agent: Agent) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(agent.collector)
    return generate_latest(registry).decode()


def pod_energy(agent: Agent, uid: str) -> float:
    return sum(g.joules for g in parse_agent_metrics(exposition(agent)).pods.get(uid, ()))


def test_a_pod_is_charged_only_for_its_gpus_while_it_holds_them(tmp_path):
    node = Node(tmp_path)
    agent = node.agent()
    node.run("w0", ["GPU-a"])
    node.tick(agent, 0)
    node.tick(agent, 10)  # the double draws 30 W below its limit
    assert pod_energy(agent, "uid-w0") == pytest.approx(300, rel=1e-3)
    node.end("w0")
    node.tick(agent, 10)
    node.run("w1", ["GPU-a"])  # the next tenant starts from 0, not from the GPU's counter
    node.tick(agent, 0)
    node.tick(agent, 5)
    assert pod_energy(agent, "uid-w1") == pytest.approx(150, rel=1e-3)
    # w0's record stays, final, for the operator's next read; then it goes.
    assert pod_energy(agent, "uid-w0") == pytest.approx(300, rel=1e-3)
    node.tick(agent, ledger.RETAIN_SECONDS)
    assert "uid-w0" not in parse_agent_metrics(exposition(agent)).pods


def test_an_agent_restart_loses_none_of_a_pods_energy_and_keeps_its_counter(tmp_path):
    node = Node(tmp_path)
    agent = node.agent()
    node.run("w0", ["GPU-a"])
    node.tick(agent, 0)
    node.tick(agent, 10)
    before = parse_agent_metrics(exposition(agent)).pods["uid-w0"][0]
    # The agent is down for 20 s while the pod trains on; a new one reads the ledger.
    node.clock.t += 20
    again = node.agent()
    again.update()
    after = parse_agent_metrics(exposition(again)).pods["uid-w0"][0]
    assert after.joules == pytest.approx(900, rel=1e-3)  # 30 s at 30 W, none lost
    assert counter_key("uid-w0", after) == counter_key("uid-w0", before)  # the same counter


def test_a_counter_reset_by_a_driver_reload_adds_only_what_came_after(tmp_path):
    node = Node(tmp_path)
    agent = node.agent()
    node.run("w0", ["GPU-a"])
    node.tick(agent, 0)
    node.tick(agent, 10)
    SimulatedNvml(tmp_path / "gpus.json", GPUS, clock=node.clock).reset_counters()
    node.tick(agent, 5)  # the counter restarted at 0: 150 J, below the 300 J seen last
    assert pod_energy(agent, "uid-w0") == pytest.approx(450, rel=1e-3)


def test_the_limit_a_pod_asks_for_is_set_confirmed_and_restored_when_it_ends(tmp_path):
    node = Node(tmp_path)
    agent = node.agent()
    node.run("w0", ["GPU-a"], limit="20")
    node.tick(agent, 0)
    node.tick(agent, 10)
    gpu = parse_agent_metrics(exposition(agent)).pods["uid-w0"][0]
    assert (gpu.requested, gpu.enforced, gpu.refused) == (20.0, 20.0, None)
    assert gpu.joules == pytest.approx(200, rel=1e-3)  # clamped to the limit
    assert limit_report(20.0, [("w0", [gpu])]).confirmed
    assert not limit_report(15.0, [("w0", [gpu])]).confirmed  # the operator wants another
    node.end("w0")
    node.tick(agent, 5)
    assert node.nvml().nvmlDeviceGetEnforcedPowerLimit(node.nvml().nvmlDeviceGetHandleByUUID(
        "GPU-a")) == 50_000  # back at the default  # fmt: skip


def test_a_limit_left_lowered_while_the_agent_was_down_is_restored_at_its_start(tmp_path):
    node = Node(tmp_path)
    nv = node.nvml()
    nv.nvmlDeviceSetPowerManagementLimit(nv.nvmlDeviceGetHandleByUUID("GPU-b"), 10_000)
    node.agent().update()  # no pod holds GPU-b
    assert nv.nvmlDeviceGetEnforcedPowerLimit(nv.nvmlDeviceGetHandleByUUID("GPU-b")) == 50_000


def test_a_limit_nvml_refuses_is_reported_with_its_reason_and_not_retried_at_once(tmp_path):
    node = Node(tmp_path, root=False)  # as an unprivileged container would be
    agent = node.agent()
    node.run("w0", ["GPU-a"], limit="20")
    node.tick(agent, 0)
    gpu = parse_agent_metrics(exposition(agent)).pods["uid-w0"][0]
    assert gpu.refused == "Insufficient Permissions" and gpu.enforced == 50.0
    report = limit_report(20.0, [("ns/w0", [gpu])])
    assert not report.confirmed and report.refused == "ns/w0 GPU-a: Insufficient Permissions"
    errors = agent.errors["power-limit"]
    node.tick(agent, 5)
    assert agent.errors["power-limit"] == errors  # within RETRY_SECONDS: not asked again


def test_limits_plan_restores_the_default_and_sets_what_the_holders_ask():
    limits = {"a": Limits(20.0, 50.0), "b": Limits(50.0, 50.0), "c": Limits(30.0, 50.0)}
    requests = {"b": [Request(25.0), Request(40.0)], "c": [Request(30.0)]}
    actions = plan(requests, limits, {}, now=0.0)
    assert [(a.gpu, a.watts) for a in actions] == [("a", None), ("b", 25.0)]
    refused = {"b": Refusal(25.0, "Invalid Argument", at=0.0)}
    assert [a.gpu for a in plan(requests, limits, refused, now=10.0)] == ["a"]
    assert [a.gpu for a in plan(requests, limits, refused, now=100.0)] == ["a", "b"]


@pytest.mark.parametrize(
    ("value", "watts", "bad"),
    [(None, None, False), ("", None, False), ("120", 120.0, False), ("12.5", 12.5, False),
     ("lots", None, True), ("-3", None, True), ("0", None, True), ("inf", None, True)],
)  # fmt: skip
def test_the_annotation_is_read_or_refused_with_a_reason(value, watts, bad):
    request = parse_annotation(value)
    assert request.watts == watts and (request.error is not None) == bad


def test_a_gpu_without_an_energy_counter_is_charged_from_power_samples():
    start = {("u", "g"): Record("u", "ns", "p", "j", "g", since=0.0)}
    holders = {"g": [Holder("u", "ns", "p", "j")]}
    one = ledger.update(start, holders, {"g": Meter(None, 100.0)}, now=0.0)
    two = ledger.update(one, holders, {"g": Meter(None, 100.0)}, now=3.0)
    assert two[("u", "g")].joules == pytest.approx(300)
    assert two[("u", "g")].sampled


def test_pods_sharing_a_gpu_share_its_energy():
    holders = {"g": [Holder("u1", "ns", "p1"), Holder("u2", "ns", "p2")]}
    one = ledger.update({}, holders, {"g": Meter(1000.0, None)}, now=0.0)
    two = ledger.update(one, holders, {"g": Meter(1100.0, None)}, now=1.0)
    assert [two[(u, "g")].joules for u in ("u1", "u2")] == [50.0, 50.0]


def test_a_damaged_ledger_row_restarts_that_record_only():
    good = ledger.dump({("u", "g"): Record("u", "ns", "p", "j", "g", since=5.0, joules=7.0)})
    loaded = ledger.load([*good, {"uid": "x"}, "junk"])
    assert list(loaded) == [("u", "g")] and loaded[("u", "g")].joules == 7.0
    assert ledger.load({"not": "a list"}) == {}


def test_an_unreadable_annotation_is_reported_and_the_gpu_runs_at_its_default(tmp_path):
    node = Node(tmp_path)
    agent = node.agent()
    node.run("a", ["GPU-a"], limit="20")
    node.tick(agent, 0)
    node.end("a")
    node.run("b", ["GPU-a"], limit="150W")  # the next tenant, before the agent saw A go
    node.tick(agent, 5)
    gpu = parse_agent_metrics(exposition(agent)).pods["uid-b"][0]
    assert gpu.enforced == 50.0  # A's lowered limit did not reach B
    assert gpu.refused is not None and "'150W' is not a number of watts" in gpu.refused


def test_a_device_nvml_does_not_list_is_said_unmeasured_not_read_as_zero(tmp_path):
    node = Node(tmp_path)
    agent = node.agent()
    node.run("m", ["MIG-1f2e"])  # a MIG slice: NVML counts energy per physical GPU only
    node.tick(agent, 0)
    node.tick(agent, 5)
    seen = parse_agent_metrics(exposition(agent))
    assert "uid-m" not in seen.pods  # no energy figure at all
    assert seen.unmeasured == {"uid-m": ("MIG-1f2e",)}


def test_after_a_reboot_the_counters_new_values_are_all_new_energy(tmp_path):
    node = Node(tmp_path)
    agent = node.agent()
    node.run("w0", ["GPU-a"])
    node.tick(agent, 0)
    node.tick(agent, 10)  # 300 J
    # The node reboots (the pod lives on): the driver's counters start again from 0, and
    # by the time the agent is back they have passed the 300 J it last saw.
    (tmp_path / "boot_id").write_text("boot-2\n")
    SimulatedNvml(tmp_path / "gpus.json", GPUS, clock=node.clock).reset_counters()
    node.clock.t += 20
    again = node.agent()
    again.update()
    assert pod_energy(again, "uid-w0") == pytest.approx(900, rel=1e-3)  # 300 + 600, none lost
