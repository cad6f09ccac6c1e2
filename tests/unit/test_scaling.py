"""Energy accounting from the workers' counters, and the cluster's free GPUs."""

import datetime as dt

from joule.api.types import SpecError, TrainingJobSpec, parse_energy
from joule.capacity import capacity
from joule.policy import ClusterView
from joule.scaling import account, evaluate
from joule.trainer_metrics import TrainerReading

T0 = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


def reading(joules: float, samples: float = 0.0) -> TrainerReading:
    return TrainerReading(0, 1, samples, 10.0, 2.0, 5.0, joules, "estimated")


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_counters_add_their_increase_and_a_reset_or_new_pod_adds_its_whole_value():
    e = account({}, [("a/0", reading(100))], at(0), 60, 1, True)
    assert e["consumedJoules"] == 100
    e = account(e, [("a/0", reading(150))], at(10), 60, 1, True)
    assert e["consumedJoules"] == 150  # +50, not +150
    e = account(e, [("a/0", reading(150))], at(20), 60, 1, True)
    assert e["consumedJoules"] == 150  # re-reading adds nothing (an operator restart re-reads)
    e = account(e, [("a/0", reading(20)), ("b/0", reading(30))], at(30), 60, 2, True)
    assert e["consumedJoules"] == 200  # a restarted process (20) and a new pod (30)
    assert e["averageWatts"] == round(100 / 30, 3)


def test_average_power_covers_the_window_only():
    e = {}
    for t, j in ((0, 0), (100, 1000), (110, 1100), (120, 1200)):
        e = account(e, [("a/0", reading(j))], at(t), 20, 1, True)
    assert e["averageWatts"] == 10.0  # from t=100 (the point at the window's start) to 120


def test_steady_intervals_build_the_per_size_history():
    e = account({}, [("a/0", reading(0, 0))], at(0), 60, 2, True)
    e = account(e, [("a/0", reading(300, 1000))], at(10), 60, 2, True)
    assert e["history"]["2"] == {"throughput": 100.0, "watts": 30.0}
    e2 = account(e, [("a/0", reading(600, 2000))], at(20), 60, 1, False)
    assert "1" not in e2["history"]  # not steady (mid-resize): nothing learned


def test_a_budget_decision_suspends_and_says_so():
    spec = TrainingJobSpec.parse({"image": "x", "energy": {"budget": "1kJ"}})
    st = {"energy": {"consumedJoules": 900.0, "counters": {"a/0": 900.0}}}
    result = evaluate(spec, st, [("a/0", reading(1100))], ClusterView(0), at(0), 1, True)
    assert result.decision.suspend and result.status["lastDecision"]["suspend"]
    assert result.status["energy"]["budgetRemainingJoules"] == 0
    assert [e.reason for e in result.events] == ["BudgetExhausted"]


def test_energy_budgets_parse_with_units_and_bad_ones_name_the_field():
    assert parse_energy("250kWh") == 250 * 3.6e6
    assert parse_energy(5000) == 5000.0
    assert parse_energy("1.5MJ") == 1.5e6
    for bad in ("250 kWh", "-1J", "lots", 0):
        try:
            parse_energy(bad)
        except SpecError as exc:
            assert "spec.energy.budget" in str(exc)
        else:
            raise AssertionError(f"{bad!r} accepted")


def gpu_node(name: str, gpus: int = 8, labels=None, taints=None) -> dict:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"taints": taints} if taints else {},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def gpu_pod(gpus: int, node_name: str | None, phase: str = "Running", job: str = "") -> dict:
    res = {"limits": {"nvidia.com/gpu": str(gpus)}}
    spec = {"containers": [{"resources": res}]}
    if node_name:
        spec["nodeName"] = node_name
    meta = {"name": f"p{id(spec)}", "namespace": "ns", "labels": {"joule.dev/job-name": job}}
    return {"metadata": meta, "spec": spec, "status": {"phase": phase}}


def test_free_and_waiting_gpus():
    pods = [
        gpu_pod(3, "n", job="a"), gpu_pod(1, "n", job="a"),  # one job, two workers
        gpu_pod(2, None, "Pending"),  # another job, waiting
        gpu_pod(4, "n", "Succeeded", job="b"),  # done: holds nothing
        gpu_pod(0, "n"),  # no GPUs: not a GPU job
    ]  # fmt: skip
    view = capacity([gpu_node("n"), gpu_node("m")], pods).view_for(1)
    assert view == ClusterView(free_gpus=12, waiting_gpus=2, total_gpus=16, jobs=2)


def test_room_to_grow_counts_whole_workers_on_nodes_the_job_may_use():
    # Four nodes with 2 free GPUs each: 8 free GPUs, but no room for one 4-GPU worker.
    nodes = [gpu_node(f"n{i}") for i in range(4)]
    pods = [gpu_pod(6, f"n{i}", job="other") for i in range(4)]
    room = capacity(nodes, pods)
    assert room.view_for(4).free_gpus == 0
    assert room.view_for(2).free_gpus == 8
    # Room only on nodes the job's nodeSelector picks and whose taints it tolerates.
    taint = {"key": "dedicated", "value": "infer", "effect": "NoSchedule"}
    nodes = [
        gpu_node("a100", labels={"gpu": "a100"}),
        gpu_node("h100", labels={"gpu": "h100"}),
        gpu_node("tainted", labels={"gpu": "a100"}, taints=[taint]),
        gpu_node("soft", labels={"gpu": "a100"},
                 taints=[{"key": "x", "effect": "PreferNoSchedule"}]),
    ]  # fmt: skip
    room = capacity(nodes, [])
    assert room.view_for(8, {"gpu": "a100"}).free_gpus == 16  # a100 and soft
    ok = [{"key": "dedicated", "operator": "Equal", "value": "infer", "effect": "NoSchedule"}]
    assert room.view_for(8, {"gpu": "a100"}, ok).free_gpus == 24
    assert room.view_for(8, {"gpu": "a100"}, [{"operator": "Exists"}]).free_gpus == 24
    wrong = [{"key": "dedicated", "operator": "Equal", "value": "train"}]
    assert room.view_for(8, {"gpu": "a100"}, wrong).free_gpus == 16
    assert room.view_for(1).total_gpus == 32


def capped_two_workers(replicas: int) -> tuple[TrainingJobSpec, dict, list]:
    """An 18 W cap (floor 4 W per GPU) and two workers that drew 30 W over the first 10 s."""
    spec = TrainingJobSpec.parse({
        "image": "x", "replicas": replicas, "elastic": {"minReplicas": 1, "maxReplicas": 2},
        "energy": {"powerCapWatts": 18, "windowSeconds": 10, "minGpuPowerLimitWatts": 4},
    })  # fmt: skip
    st = {"targetReplicas": replicas, "energy": {"counters": {"a/0": 0.0, "b/0": 0.0},
          "window": [[T0.timestamp(), 0.0, 0.0]], "consumedJoules": 0.0}}  # fmt: skip
    return spec, st, [("a/0", reading(150, 1000)), ("b/0", reading(150, 1000))]


def test_a_lowered_power_limit_is_kept_in_status_announced_and_patched_onto_workers():
    from joule.observe import PodView
    from joule.reconcile import power_limit_patches

    spec, st, readings = capped_two_workers(replicas=2)
    result = evaluate(spec, st, readings, ClusterView(0), at(10), 2, True)  # 30 W over 18 W
    d = result.decision
    assert (d.replicas, d.reason) == (2, "PowerLimitLowered")
    assert result.status["energy"]["gpuPowerLimitWatts"] == 8.6  # 15 W x 0.95 x 18 / 30
    assert result.status["energy"]["gpuPowerLimitTime"] == "2026-11-29T12:00:10Z"
    assert result.status["lastDecision"]["overCap"] is True
    assert [e.reason for e in result.events] == ["PowerLimitLowered"]

    def pod(name: str, limit: str | None) -> PodView:
        return PodView(name, name, 0, "Running", True, True, False, None, None, limit)

    # Once the lowered limit shows in the window, the job is back under its cap and says so.
    later = {**result.status, "energy": {**result.status["energy"],
             "gpuPowerLimitTime": "2026-11-29T11:00:00Z"}}  # fmt: skip
    under = [("a/0", reading(230, 2000)), ("b/0", reading(230, 2000))]  # 160 J in 15 s
    back = evaluate(spec, later, under, ClusterView(0), at(25), 2, True)
    assert not back.decision.power_cap_exceeded
    said = {e.reason: e.message for e in back.events}
    assert "under the 18 W cap, at 2 workers" in said["UnderPowerCap"]
    # Drawing well under the limit and the cap, the job gets its default limit back.
    assert back.decision.reason == "PowerLimitRaised" and "PowerLimitRaised" in said
    assert "gpuPowerLimitWatts" not in back.status["energy"]

    pods = [pod("w0", None), pod("w1", "8.6")]
    assert power_limit_patches(spec, result.status, pods) == {"w0": "8.6"}
    back = {**result.status, "energy": {k: v for k, v in result.status["energy"].items()
                                        if k != "gpuPowerLimitWatts"}}  # fmt: skip
    assert power_limit_patches(spec, back, pods) == {"w1": None}  # removed: the default


def test_power_limit_fields_are_checked():
    for energy, message in (
        ({"minGpuPowerLimitWatts": 100}, "needs powerCapWatts, budget or scaling.policy"),
        ({"powerCapWatts": 9, "gpuPowerLimitWatts": 100, "minGpuPowerLimitWatts": 200},
         "must not be above gpuPowerLimitWatts"),
        ({"gpuPowerLimitWatts": 0}, "spec.energy.gpuPowerLimitWatts must be >= 1"),
    ):  # fmt: skip
        try:
            TrainingJobSpec.parse({"image": "x", "energy": energy})
        except SpecError as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"{energy} accepted")


def test_what_each_power_limit_gave_is_learned_only_from_intervals_entirely_under_it():
    e = account({}, [("a/0", reading(0, 0))], at(0), 60, 2, True)
    e = account(e, [("a/0", reading(300, 1000))], at(10), 60, 2, True)
    assert e["limitHistory"] == {"default": {"throughput": 100.0, "watts": 30.0}}
    e = {**e, "gpuPowerLimitWatts": 12.5, "gpuPowerLimitTime": "2026-11-29T12:00:15Z"}
    e = account(e, [("a/0", reading(500, 1900))], at(20), 60, 2, True)
    assert set(e["limitHistory"]) == {"default"}  # 10 s to 20 s straddles the change
    e = account(e, [("a/0", reading(700, 2700))], at(30), 60, 2, True)
    assert e["limitHistory"]["12.5"] == {"throughput": 80.0, "watts": 20.0}

    spec = TrainingJobSpec.parse({
        "image": "x", "replicas": 2, "elastic": {"minReplicas": 1, "maxReplicas": 2},
        "scaling": {"policy": "EnergyEfficient"}, "energy": {"minGpuPowerLimitWatts": 5},
    })  # fmt: skip
    st = {"targetReplicas": 2, "energy": e}
    result = evaluate(spec, st, [("a/0", reading(900, 3500))], ClusterView(0), at(40), 2, True)
    # 12.5 W gave 0.25 J/sample against 0.3 at the default: the search goes one step lower
    # than what each GPU draws now (10 W), on the grid from the 5 W floor: 5 x 1.1^6.
    assert result.decision.reason == "PowerLimitTuned"
    assert result.status["energy"]["gpuPowerLimitWatts"] == 8.9


def test_mid_resize_the_policy_keeps_the_size_it_is_on_the_way_to():
    # kubectl scale 2 -> 1 on a capped job: one worker is still running down. Its power
    # must not be read as the new size's, nor the old size taken back.
    spec, st, readings = capped_two_workers(replicas=1)
    result = evaluate(spec, st, readings, ClusterView(0), at(10), 2, False)
    # Over the cap mid-shrink: said, and the shrink under way is left to bring it down.
    assert (result.decision.replicas, result.decision.reason) == (1, "PowerCapExceeded")
    assert result.status["targetReplicas"] == 1
    assert [e.reason for e in result.events] == ["PowerCapExceeded"]
    assert result.status["energy"]["consumedJoules"] == 300  # the accounting goes on


def started(joules: float, start: float, samples: float = 0.0) -> TrainerReading:
    return TrainerReading(0, 1, samples, 10.0, 2.0, 5.0, joules, "estimated", started=start)


def test_a_worker_missing_from_one_scrape_adds_only_its_increase_when_it_is_back():
    both = [("a/0", reading(100, 10)), ("b/0", reading(100, 10))]
    e = account({}, both, at(0), 600, 2, True, alive={"a", "b"})
    assert e["consumedJoules"] == 200
    # b timed out this round; it still exists.
    e = account(e, [("a/0", reading(150, 15))], at(30), 600, 2, False, alive={"a", "b"})
    assert e["consumedJoules"] == 250
    # b is back with its lifetime counter: only its increase (+80) counts, not 180.
    back = [("a/0", reading(200, 20)), ("b/0", reading(180, 18))]
    e = account(e, back, at(60), 600, 2, True, alive={"a", "b"})
    assert e["consumedJoules"] == 380
    assert e["samples"] == 38


def test_a_round_that_read_nothing_loses_no_counter():
    e = account({}, [("a/0", reading(100))], at(0), 600, 1, True, alive={"a"})
    e = account(e, [], at(30), 600, 1, False, alive={"a"})  # every scrape failed
    e = account(e, [("a/0", reading(130))], at(60), 600, 1, True, alive={"a"})
    assert e["consumedJoules"] == 130


def test_a_restarted_process_is_recognised_by_its_start_time_even_past_the_old_value():
    e = account({}, [("a/0@100.00", started(100, 100))], at(0), 600, 1, True, alive={"a"})
    # torchrun restarted the process; by the next scrape its new counter (120) has already
    # passed the old one (100): a decrease check alone would add 20 and lose 100.
    e = account(e, [("a/0@150.00", started(120, 150))], at(60), 600, 1, True, alive={"a"})
    assert e["consumedJoules"] == 220
    assert list(e["counters"]) == ["a/0@150.00"]  # the old process's counter is dropped


def test_counters_of_pods_that_are_gone_are_dropped_and_a_terminating_ones_last_reading_counts():
    e = account({}, [("a/0", reading(100)), ("b/0", reading(50))], at(0), 600, 2, True)
    # b is terminating (scaled down) and was read one last time: its increase counts.
    e = account(e, [("a/0", reading(110)), ("b/0", reading(70))], at(30), 600, 1, False,
                alive={"a", "b"})  # fmt: skip
    assert e["consumedJoules"] == 180
    e = account(e, [("a/0", reading(120))], at(60), 600, 1, True, alive={"a"})
    assert set(e["counters"]) == {"a/0"}  # b is gone: nothing of it is kept
    assert e["consumedJoules"] == 190


def test_the_average_power_spans_the_whole_window_however_many_evaluations_it_holds():
    # A one-hour window, evaluated every 30 s (120 points): 100 W for 80 min, then 200 W.
    e, joules = {}, 0.0
    for i in range(241):
        t = i * 30
        e = account(e, [("a/0", reading(joules))], at(t), 3600, 1, True)
        joules += (100 if t < 80 * 60 else 200) * 30
    # The last hour: 20 min at 100 W and 40 min at 200 W.
    assert abs(e["averageWatts"] - (20 * 100 + 40 * 200) / 60) < 2
    assert len(e["window"]) <= 64


def test_a_size_is_learned_only_from_intervals_steady_at_that_size_from_their_start():
    # Workers starting: not yet serving /metrics, so this round read nothing.
    e = account({}, [], at(0), 600, 1, False, alive={"a"})
    # Serving now, 10 s after the last round, having trained 20 s: 100/s really.
    e = account(e, [("a/0", reading(300, 2000))], at(10), 600, 1, True, alive={"a"})
    assert "1" not in e["history"]  # the interval began mid-start: 200/s would be wrong
    e = account(e, [("a/0", reading(450, 3000))], at(20), 600, 1, True, alive={"a"})
    assert e["history"]["1"] == {"throughput": 100.0, "watts": 15.0}
    # Resized to 2 between two rounds, both steady: the interval mixed the sizes.
    two = [("a/0", reading(600, 4000)), ("b/0", reading(150, 1000))]
    e = account(e, two, at(30), 600, 2, True, alive={"a", "b"})
    assert "2" not in e["history"]


def test_a_retry_seconds_after_a_round_teaches_no_rate():
    e = account({}, [("a/0", reading(0, 0))], at(0), 600, 1, True, interval=30)
    e = account(e, [("a/0", reading(300, 3000))], at(30), 600, 1, True, interval=30)
    assert e["history"]["1"]["throughput"] == 100.0
    # A conflict made the loop read again 1 s later, during a burst: nothing learned from it.
    e = account(e, [("a/0", reading(310, 3300))], at(31), 600, 1, True, interval=30)
    assert e["history"]["1"]["throughput"] == 100.0


def test_a_gap_in_evaluations_is_not_averaged_into_the_power_window():
    e = account({}, [("a/0", reading(0))], at(0), 300, 1, True, interval=30)
    # Two hours suspended; then 30 s at 100 W.
    e = account(e, [], at(7200), 300, 1, False, interval=30)
    assert "averageWatts" not in e  # one point after the gap: no average, not a diluted one
    e = account(e, [("b/0", reading(3000))], at(7230), 300, 1, True, alive={"b"}, interval=30)
    assert e["averageWatts"] == 100.0


def test_an_earlier_operators_counter_key_counts_as_the_same_process():
    # Keys without a start time were written before process_start_time_seconds was read.
    e = {"counters": {"a/0": 1000.0}, "consumedJoules": 1000.0}
    e = account(e, [("a/0@5.00", started(1010, 5.0))], at(0), 600, 1, True, alive={"a"})
    assert e["consumedJoules"] == 1010  # +10, not +1010


def test_with_node_agents_a_limit_counts_from_when_they_confirm_it_in_force():
    from joule.agent_metrics import LimitReport

    spec, st, readings = capped_two_workers(replicas=2)
    pending = LimitReport(confirmed=False)
    lowered = evaluate(spec, st, readings, ClusterView(0), at(10), 2, True, limits=pending)
    energy = lowered.status["energy"]
    assert energy["gpuPowerLimitWatts"] == 8.6 and energy["gpuPowerLimitConfirmed"] is False
    more = [("a/0", reading(300, 1500)), ("b/0", reading(300, 1500))]
    # Not yet in force: still over the cap, the policy waits rather than act again.
    waiting = evaluate(spec, lowered.status, more, ClusterView(0), at(15), 2, True,
                       limits=pending)  # fmt: skip
    assert waiting.decision.replicas == 2 and "gpuPowerLimitRefused" not in waiting.status["energy"]
    assert waiting.status["energy"]["gpuPowerLimitWatts"] == 8.6
    done = evaluate(spec, waiting.status, more, ClusterView(0), at(20), 2, True,
                    limits=LimitReport(confirmed=True))  # fmt: skip
    assert done.status["energy"]["gpuPowerLimitConfirmed"] is True
    assert done.status["energy"]["gpuPowerLimitTime"] == "2026-11-29T12:00:20Z"


def test_a_refused_limit_is_dropped_said_and_the_policy_removes_workers_instead():
    from joule.agent_metrics import LimitReport
    from joule.reconcile import conditions

    spec, st, readings = capped_two_workers(replicas=2)
    lowered = evaluate(spec, st, readings, ClusterView(0), at(10), 2, True,
                       limits=LimitReport(False))  # fmt: skip
    refused = LimitReport(False, "w1 GPU-a: Insufficient Permissions")
    more = [("a/0", reading(300, 1500)), ("b/0", reading(300, 1500))]
    result = evaluate(spec, lowered.status, more, ClusterView(0), at(20), 2, True, limits=refused)
    energy = result.status["energy"]
    assert energy["gpuPowerLimitRefused"] == "w1 GPU-a: Insufficient Permissions"
    assert "gpuPowerLimitWatts" not in energy  # the workers' annotation goes too
    said = {e.reason: e.message for e in result.events}
    assert "Insufficient Permissions" in said["PowerLimitRefused"]
    # Over the cap with limits out of reach, the policy takes a worker away once it has
    # measured the job at this size (it lowers no limit meanwhile).
    later = result
    for i, t in enumerate((30, 45)):
        again = [(k, reading(450 + 150 * i, 2000 + 500 * i)) for k in ("a/0", "b/0")]
        later = evaluate(spec, later.status, again, ClusterView(0), at(t), 2, True,
                         limits=LimitReport(True))  # fmt: skip
        assert later.decision.gpu_power_limit_watts is None
    assert (later.decision.replicas, later.decision.reason) == (1, "PowerCapExceeded")
    assert "gpuPowerLimitWatts" not in later.status["energy"]
    shown = {c["type"]: c for c in conditions({**later.status, "phase": "Running"}, 1, [], at(30))}
    assert shown["PowerLimitRefused"]["status"] == "True"
    assert "Insufficient Permissions" in shown["PowerLimitRefused"]["message"]


def test_a_limit_no_agent_confirms_within_a_minute_counts_as_refused():
    from joule.agent_metrics import LimitReport

    spec, st, readings = capped_two_workers(replicas=2)
    pending = LimitReport(confirmed=False)
    lowered = evaluate(spec, st, readings, ClusterView(0), at(10), 2, True, limits=pending)
    late = evaluate(spec, lowered.status, readings, ClusterView(0), at(75), 2, True,
                    limits=pending)  # fmt: skip
    assert "no node agent put the limit in force" in late.status["energy"]["gpuPowerLimitRefused"]


def test_node_energy_and_worker_samples_are_accounted_apart():
    from joule.scaling import Measured, account

    m = Measured(joules={"u1/GPU-a@5.00": 100.0}, samples={"u1/0": 50.0}, source="node",
                 meter="simulated", utilization=0.5)  # fmt: skip
    e = account({}, m, at(0), 60, 1, True, alive={"u1"})
    m2 = Measured(joules={"u1/GPU-a@5.00": 160.0}, samples={}, source="node", meter="simulated")
    e = account(e, m2, at(10), 60, 1, True, alive={"u1"})
    assert (e["consumedJoules"], e["samples"]) == (160.0, 50.0)
    assert (e["source"], e["meter"]) == ("node", "simulated")


def test_a_confirmed_limit_survives_a_round_the_agents_missed_or_had_not_caught_up():
    from joule.agent_metrics import LimitReport

    spec, st, readings = capped_two_workers(replicas=2)
    lowered = evaluate(spec, st, readings, ClusterView(0), at(10), 2, True,
                       limits=LimitReport(False))  # fmt: skip
    more = [("a/0", reading(300, 1500)), ("b/0", reading(300, 1500))]
    done = evaluate(spec, lowered.status, more, ClusterView(0), at(20), 2, True,
                    limits=LimitReport(True))  # fmt: skip
    # Ten minutes on: an agent restarting (unknown), then one that has not yet applied the
    # limit to a new worker (pending): neither is a refusal.
    later = [("a/0", reading(900, 4000)), ("b/0", reading(900, 4000))]
    missed = evaluate(spec, done.status, later, ClusterView(0), at(620), 2, True,
                      limits=LimitReport(False, unknown=True))  # fmt: skip
    behind = evaluate(spec, missed.status, later, ClusterView(0), at(630), 2, True,
                      limits=LimitReport(False))  # fmt: skip
    assert "gpuPowerLimitRefused" not in behind.status["energy"]
    assert behind.status["energy"]["gpuPowerLimitWatts"] == 8.6
    back = evaluate(spec, behind.status, later, ClusterView(0), at(640), 2, True,
                    limits=LimitReport(True))  # fmt: skip
    assert "gpuPowerLimitPendingSince" not in back.status["energy"]
    # Only a wait of a minute, with the agents answering, counts as refused.
    stuck = evaluate(spec, back.status, later, ClusterView(0), at(650), 2, True,
                     limits=LimitReport(False))  # fmt: skip
    stuck = evaluate(spec, stuck.status, later, ClusterView(0), at(715), 2, True,
                     limits=LimitReport(False))  # fmt: skip
    assert "in force within 60s" in stuck.status["energy"]["gpuPowerLimitRefused"]


def test_a_refusal_lifts_when_the_spec_changes_its_limits_and_meanwhile_no_limit_is_asked():
    from joule.agent_metrics import LimitReport
    from joule.reconcile import power_limit

    spec = TrainingJobSpec.parse({"image": "x", "energy": {"budget": "1MJ",
                                  "gpuPowerLimitWatts": 150}})  # fmt: skip
    st = {"targetReplicas": 1, "energy": {}}
    refused = LimitReport(False, "w0 GPU-a: Invalid Argument")
    one = evaluate(spec, st, [("a/0", reading(10))], ClusterView(0), at(0), 1, True,
                   limits=refused)  # fmt: skip
    assert one.status["energy"]["gpuPowerLimitRefused"] == "w0 GPU-a: Invalid Argument"
    assert power_limit(spec, one.status) is None  # the workers' annotation goes
    same = evaluate(spec, one.status, [("a/0", reading(20))], ClusterView(0), at(30), 1, True,
                    limits=LimitReport(True))  # fmt: skip
    assert "gpuPowerLimitRefused" in same.status["energy"]  # the same spec: still refused
    fixed = TrainingJobSpec.parse({"image": "x", "energy": {"budget": "1MJ",
                                   "gpuPowerLimitWatts": 300}})  # fmt: skip
    again = evaluate(fixed, same.status, [("a/0", reading(30))], ClusterView(0), at(60), 1,
                     True, limits=LimitReport(False))  # fmt: skip
    assert "gpuPowerLimitRefused" not in again.status["energy"]
    assert power_limit(fixed, again.status) == 300


def test_a_counter_read_without_its_start_time_continues_its_record_either_way():
    from joule.scaling import _count

    assert _count({"u/G@5.00": 100.0}, {"u/G": 110.0}, {"u"})[0] == 10.0
    assert _count({"u/G": 100.0}, {"u/G@5.00": 110.0}, {"u"})[0] == 10.0
    assert _count({"u/G@5.00": 100.0}, {"u/G@9.00": 30.0}, {"u"})[0] == 30.0  # a new record
