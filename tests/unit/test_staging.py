"""spec.data: the staging pod first and alone, its exit deciding the job (pure parts)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from joule.api import JobRef, SpecError, TrainingJobSpec
from joule.builders import worker_pod
from joule.builders.stage import stage_pod
from joule.observe import Failure, PodView, view
from joule.reconcile import plan

JOB = JobRef("j", "ns", "uid")
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
S3 = {
    "s3": {
        "endpoint": "https://objects:9000",
        "bucket": "datasets",
        "prefix": "tiny",
        "accessKeyId": {"secretKeyRef": {"name": "creds", "key": "id"}},
        "secretAccessKey": {"secretKeyRef": {"name": "creds", "key": "secret"}},
    }
}
SUMMARY = {"files": 3, "bytes": 3000, "skipped": 1, "seconds": 0.5,
           "manifestDigest": "sha256:aa", "version": "v1"}  # fmt: skip


def spec(source=None, **kw):
    return TrainingJobSpec.parse({
        "image": "trainer:1", "replicas": 2,
        "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "c"}}],
        "data": {"volume": "cache", "source": source or S3}, **kw,
    })  # fmt: skip


def stage(phase="Running", failure=None, summary=None, terminating=False):
    return PodView(
        name="j-stage", uid="s", index=-1, phase=phase, ready=phase == "Running",
        scheduled=True, terminating=terminating, failure=failure, role="stage",
        summary=summary,
    )  # fmt: skip


def worker(index):
    return PodView(f"j-worker-{index}", f"u{index}", index, "Running", True, True, False, None)


def run(pods=(), status=None, staging=None, s=None):
    return plan(JOB, s or spec(), status or {}, 1, list(pods), T0, staging)


def test_the_staging_pod_comes_first_and_alone():
    p = run()
    assert p.create_stage and p.create == []
    assert (p.status["phase"], p.status["reason"]) == ("Pending", "StagingData")
    assert p.status["data"] == {"phase": "Staging", "source": "s3://datasets/tiny at "
                                "https://objects:9000", "volume": "cache"}  # fmt: skip
    assert [e.reason for e in p.events] == ["StagingData"]
    assert p.status["startTime"]  # the deadline counts staging too
    # While it runs: nothing more, no Event again.
    again = run(status=p.status, staging=stage())
    assert not again.create_stage and again.create == [] and again.events == []
    assert again.status["reason"] == "StagingData"


def test_once_staged_the_workers_are_created_and_the_staging_pod_goes():
    p = run(staging=stage("Succeeded", summary=json.dumps({**SUMMARY, "extra": [1]})))
    assert p.create == [0, 1] and p.delete == ["j-stage"] and not p.create_stage
    assert p.status["data"] == {"phase": "Staged", "source": "s3://datasets/tiny at "
                                "https://objects:9000", "volume": "cache", **SUMMARY}  # fmt: skip
    assert "DataStaged" in [e.reason for e in p.events]
    # Later (a restart, a resize): never staged again.
    later = run(pods=[worker(0)], status=p.status)
    assert not later.create_stage and later.create == [1]
    assert later.status["data"]["phase"] == "Staged"


@pytest.mark.parametrize(
    ("code", "reason"),
    [(65, "DataCorrupt"), (66, "DataNotFound"), (69, "DataUnavailable"),
     (74, "DataCacheFull"), (77, "DataAccessDenied"), (78, "DataConfigError"),
     (1, "DataStagingFailed")],
)  # fmt: skip
def test_a_failed_staging_fails_the_job_with_its_reason_and_line(code, reason):
    line = "shard-00003.npy: sha256 1f does not match the manifest's 9a"
    p = run(staging=stage("Failed", failure=Failure("Error", line, code)))
    assert (p.status["phase"], p.status["reason"]) == ("Failed", reason)
    assert p.status["message"] == f"staging the dataset from s3://datasets/tiny at " \
        f"https://objects:9000 failed: {line}"  # fmt: skip
    assert p.create == [] and p.status["data"]["phase"] == "Failed"
    assert reason in [e.reason for e in p.events]
    # Final: nothing is retried.
    assert run(status=p.status, staging=stage("Failed")).create == []


def test_a_staging_pod_that_cannot_start_keeps_the_job_pending_with_why():
    blocked = Failure("CreateContainerConfigError", 'secret "creds" not found')
    p = run(status=run().status, staging=stage("Pending", failure=blocked))
    assert (p.status["phase"], p.status["reason"]) == ("Pending", "CreateContainerConfigError")
    assert 'secret "creds" not found' in p.status["message"]
    assert p.create == [] and not p.create_stage


def test_the_staging_pods_view_and_summary():
    body = stage_pod(JOB, spec())
    assert view({**body, "status": {"phase": "Running"}}).role == "stage"
    done = view(
        {
            **body,
            "status": {
                "phase": "Succeeded",
                "containerStatuses": [
                    {"state": {"terminated": {"exitCode": 0, "message": json.dumps(SUMMARY)}}}
                ],
            },
        }
    )
    assert done.summary == json.dumps(SUMMARY) and done.index == -1


def test_the_staging_pod_holds_no_gpu_runs_where_workers_can_and_gets_the_credentials():
    s = spec(
        nodeSelector={"pool": "gpu"},
        template={"spec": {"tolerations": [{"key": "gpu", "operator": "Exists"}]}},
        serviceAccountName="trainer",
    )
    body = stage_pod(JOB, s)
    c = body["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert c["command"] == [
        "joule-data", "stage", "--s3", "datasets/tiny", "--endpoint", "https://objects:9000",
        "--into", "/data/j", "--termination-log", "/dev/termination-log",
        "--metrics-port", "9090",
    ]  # fmt: skip
    assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]} == {
        "AWS_ACCESS_KEY_ID": {"name": "creds", "key": "id"},
        "AWS_SECRET_ACCESS_KEY": {"name": "creds", "key": "secret"},
    }
    assert c["volumeMounts"] == [{"name": "cache", "mountPath": "/data"}]
    ps = body["spec"]
    assert ps["nodeSelector"] == {"pool": "gpu"} and ps["serviceAccountName"] == "trainer"
    assert ps["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert body["metadata"]["ownerReferences"][0]["uid"] == "uid"
    # The workers: the copy read-only, its folder named, and no credentials.
    w = worker_pod(JOB, s, 0)["spec"]["containers"][0]
    assert {"name": "cache", "mountPath": "/data", "readOnly": True} in w["volumeMounts"]
    env = {e["name"]: e.get("value") for e in w["env"]}
    assert env["JOULE_DATASET_DIR"] == "/data/j" and "AWS_ACCESS_KEY_ID" not in env


def test_other_sources_and_a_ca_bundle():
    pvc = stage_pod(JOB, spec({"persistentVolumeClaim": {"claimName": "src", "path": "sets/a"}}))
    c = pvc["spec"]["containers"][0]
    assert c["command"][2:4] == ["--dir", "/source/sets/a"]
    assert {"name": "joule-data-source", "mountPath": "/source", "readOnly": True} in c[
        "volumeMounts"
    ]
    https = stage_pod(JOB, spec({"https": {
        "url": "https://files/sets/a",
        "caBundle": {"configMapKeyRef": {"name": "ca", "key": "root.pem"}},
    }}))  # fmt: skip
    c = https["spec"]["containers"][0]
    assert c["command"][2:6] == ["--https", "https://files/sets/a", "--ca-bundle",
                                 "/etc/joule-data/ca.crt"]  # fmt: skip
    ca = next(v for v in https["spec"]["volumes"] if v["name"] == "joule-data-ca")
    assert ca["configMap"] == {"name": "ca", "items": [{"key": "root.pem", "path": "ca.crt"}]}


@pytest.mark.parametrize(
    ("data", "said"),
    [
        ({"volume": "nope", "source": S3}, "data.volume must name one of spec.volumes"),
        ({"volume": "cache", "source": {}}, "exactly one of s3, https or persistentVolumeClaim"),
        ({"volume": "cache", "source": {"s3": {**S3["s3"], "bucket": "A"}}}, "bucket name"),
        ({"volume": "cache", "source": {"s3": {**S3["s3"], "accessKeyId": None}}},
         "needs accessKeyId and secretAccessKey"),
        ({"volume": "cache", "source": {"https": {"url": "ftp://x"}}}, "http(s) URL"),
        ({"volume": "cache", "source": {"persistentVolumeClaim": {"claimName": "c",
                                                                  "path": "../x"}}},
         "must stay inside the claim"),
        ({"volume": "cache", "path": "data", "source": S3}, "absolute path"),
    ],
)  # fmt: skip
def test_the_parser_refuses_bad_data_specs(data, said):
    with pytest.raises(SpecError, match=said.replace("(", r"\(").replace(")", r"\)")):
        TrainingJobSpec.parse({"image": "x", "volumes": [{"name": "cache", "emptyDir": {}}],
                               "data": data})  # fmt: skip


def test_the_staging_pods_progress_is_read_every_few_seconds_while_it_runs():
    from joule.scaling import next_evaluation
    from joule.staging import parse_progress

    text = (
        "# HELP joule_data_staged_bytes Bytes of the dataset in the cache\n"
        "# TYPE joule_data_staged_bytes gauge\n"
        "joule_data_staged_bytes 1.048576e+06\njoule_data_total_bytes 4194304.0\n"
        "joule_data_staged_files 1.0\njoule_data_total_files 4.0\nother_metric 7\n"
    )
    assert parse_progress(text) == {
        "stagedBytes": 1048576, "totalBytes": 4194304, "stagedFiles": 1, "totalFiles": 4,
    }  # fmt: skip
    staging = run().status
    assert next_evaluation(spec(), staging, T0) == 0.0  # read at once
    read = {**staging, "data": {**staging["data"], "checkedAt": "2026-01-01T00:00:00Z"}}
    assert next_evaluation(spec(), read, T0 + dt.timedelta(seconds=2)) == 3.0
    # Progress stays while it runs; the summary replaces it once staged.
    running = run(status={**read, "data": {**read["data"], "stagedBytes": 10}}, staging=stage())
    assert running.status["data"]["stagedBytes"] == 10
    done = run(status=running.status, staging=stage("Succeeded", summary=json.dumps(SUMMARY)))
    assert "stagedBytes" not in done.status["data"]
    assert next_evaluation(spec(), done.status, T0) is None


def test_the_energy_loop_writes_the_running_staging_pods_progress(pod_metrics):
    """Through the real scrape, from a /metrics served here, into the status it writes."""
    from joule import autoscaler

    pod_metrics("joule_data_staged_bytes 512\njoule_data_total_bytes 2048\n")
    status = run().status
    body = {"apiVersion": "joule.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": "j", "namespace": "ns", "uid": "uid", "generation": 1,
                         "resourceVersion": "1"},
            "spec": {"image": "trainer:1", "replicas": 2,
                     "volumes": [{"name": "cache", "emptyDir": {}}],
                     "data": {"volume": "cache", "source": S3}},
            "status": status}  # fmt: skip
    written = []

    class Api:
        def get_job(self, namespace, name):
            return body

        def clock(self):
            return T0

        def stage_pod(self, job):
            return PodView("j-stage", "s", -1, "Running", True, True, False, None,
                           ip="127.0.0.1", role="stage")  # fmt: skip

        def write_status(self, old, new):
            written.append(new)
            return old

    after = autoscaler.Autoscaler(Api()).evaluate("ns", "j")
    assert after == 5.0
    data = written[-1]["data"]
    assert (data["stagedBytes"], data["totalBytes"], data["phase"]) == (512, 2048, "Staging")
    assert data["checkedAt"] == "2026-01-01T00:00:00Z"
