"""Workers that fail for real, on the real node: one that exits 1 at once on every start is
replaced after a doubling backoff until backoffLimit, and one the kernel OOM-kills fails the
job with OOMKilled. What the job says comes from the kubelet: the container's terminated
reason, its exit code, and its log's last line (FallbackToLogsOnError)."""

from __future__ import annotations

import time

import pytest
from kubernetes import client

from tests.conftest import plain_script_job, wait_for
from tests.e2e.test_local_loop import status

# The last line the crashing worker logs: its termination message, as the job quotes it.
LAST_WORDS = "joule-e2e: config.yaml not found"
CRASH = f"import sys; print('starting', flush=True); print({LAST_WORDS!r}); sys.exit(1)"
# 512 MiB written (so every page is touched) against a 64 MiB limit.
HOG = "b = b'x' * (512 * 1024 * 1024); print(len(b))"


def job_events(core: client.CoreV1Api, namespace: str, name: str) -> list[client.CoreV1Event]:
    return core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items


def watch_until_finished(api, namespace: str, name: str, timeout: float) -> list[dict]:
    """Every distinct status the job showed, polled until it finished."""
    seen: list[dict] = []

    def finished() -> bool:
        st = status(api, namespace, name)
        if st and (not seen or st != seen[-1]):
            seen.append(st)
        return st.get("phase") in ("Failed", "Succeeded")

    try:
        wait_for(finished, timeout=timeout, interval=0.2, what=f"{name} to finish")
    except AssertionError:
        raise AssertionError(f"{name} did not finish; statuses: {seen[-3:]}") from None
    return seen


@pytest.mark.timeout(240)
def test_a_worker_failing_at_once_on_every_start_backs_off_then_fails_with_its_exit_code(
    kubectl, api, core, namespace, operator, local_node
):
    plain_script_job(
        kubectl, namespace, "crash", local_node.placement(),
        command=["python", "-c", CRASH], args=[], backoffLimit=2, restartBackoffSeconds=2,
    )  # fmt: skip
    started = time.monotonic()
    seen = watch_until_finished(api, namespace, "crash", timeout=110)
    took = time.monotonic() - started
    final = seen[-1]

    backing_off = [s for s in seen if s.get("reason") == "BackingOff"]
    assert backing_off, [(s.get("phase"), s.get("reason")) for s in seen]
    message = backing_off[0]["message"]
    assert "(Error, exit code 1)" in message and LAST_WORDS in message, message
    assert "replacing it in 2s" in message, message  # the first wait: the base
    assert any("replacing it in 4s" in s["message"] for s in backing_off), backing_off  # doubled

    assert (final["phase"], final["reason"]) == ("Failed", "BackoffLimitExceeded"), final
    assert "exit code 1" in final["message"] and LAST_WORDS in final["message"], final
    assert final["restarts"] == 3 and final["podFailure"]["exitCode"] == 1, final
    # Two waits (2 s, then 4 s, each from a time kept to the second) lie between the three
    # starts: the replacements were not made at once.
    assert took >= 4, took

    failed = [e for e in job_events(core, namespace, "crash") if e.reason == "WorkerFailed"]
    assert len(failed) == 2, [e.message for e in failed]  # the third failure fails the job
    assert all(LAST_WORDS in e.message for e in failed), [e.message for e in failed]
    print(f"\ncrash loop: Failed after 3 starts in {took:.1f}s")


@pytest.mark.timeout(240)
def test_an_oom_killed_worker_fails_the_job_saying_oomkilled(
    kubectl, api, core, namespace, operator, local_node
):
    memory = {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"memory": "64Mi"}}
    plain_script_job(
        kubectl, namespace, "hog", local_node.placement(),
        command=["python", "-c", HOG], args=[], resources=memory, backoffLimit=0,
    )  # fmt: skip
    final = watch_until_finished(api, namespace, "hog", timeout=110)[-1]
    assert (final["phase"], final["reason"]) == ("Failed", "BackoffLimitExceeded"), final
    assert "hog-worker-0 failed (OOMKilled, exit code 137)" in final["message"], final
    assert final["podFailure"]["reason"] == "OOMKilled", final
