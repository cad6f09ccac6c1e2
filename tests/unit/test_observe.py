"""Why a pod is failing, in the words kubectl would use."""

from joule.observe import view


def pod(status, index="0", node="n1", deleting=False):
    meta = {
        "name": f"j-worker-{index}",
        "uid": f"u{index}",
        "labels": {"joule.dev/replica-index": index},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"nodeName": node} if node else {}, "status": status}


def test_running_and_ready():
    v = view(pod({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}))
    assert v.ready and v.scheduled and v.active and v.failure is None


def test_oom_killed_with_exit_code():
    v = view(
        pod(
            {
                "phase": "Failed",
                "containerStatuses": [
                    {"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
                ],
            }
        )
    )
    assert (v.failure.reason, v.failure.exit_code) == ("OOMKilled", 137)
    assert v.finished and not v.active


def test_image_pull_backoff_and_unschedulable():
    v = view(
        pod(
            {
                "phase": "Pending",
                "containerStatuses": [
                    {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}
                ],
            }
        )
    )
    assert v.failure.reason == "ImagePullBackOff"
    v = view(
        pod(
            {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/4 nodes: Insufficient nvidia.com/gpu",
                    }
                ],
            },
            node=None,
        )
    )
    assert v.failure.reason == "Unschedulable" and not v.scheduled
    assert "Insufficient" in v.failure.message


def test_a_pod_without_our_index_label_is_ignored_and_deleting_is_not_active():
    assert view({"metadata": {"name": "x", "labels": {}}, "status": {}}) is None
    assert not view(pod({"phase": "Running"}, deleting=True)).active


def failed_pod(terminated, **status):
    return view(
        pod({"phase": "Failed", "containerStatuses": [{"state": {"terminated": terminated}}],
             **status})
    )  # fmt: skip


def test_the_containers_oom_kill_wins_over_the_pods_generic_reason():
    v = failed_pod({"exitCode": 137, "reason": "OOMKilled"}, reason="Failed", message="failed")
    assert (v.failure.reason, v.failure.exit_code) == ("OOMKilled", 137)
    assert v.failure.message == "exited with code 137"  # no log, no message file


def test_the_log_tail_a_worker_left_is_quoted_by_its_last_line_only():
    # FallbackToLogsOnError: the kubelet's message is the log's tail (up to 80 lines).
    tail = "Traceback (most recent call last):\n  File 'train.py'\nValueError: bad lr\n\n"
    v = failed_pod({"exitCode": 1, "reason": "Error", "message": tail})
    assert (v.failure.reason, v.failure.exit_code) == ("Error", 1)
    assert v.failure.message == "ValueError: bad lr"
    long = failed_pod({"exitCode": 1, "message": "x" * 1000})
    assert long.failure.reason == "Error"  # a terminated container without a reason
    assert len(long.failure.message) == 256 and long.failure.message.endswith("...")
