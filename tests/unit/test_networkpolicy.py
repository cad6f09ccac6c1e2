"""The NetworkPolicy per job: its workers admit each other on any port and the configured
scrapers on their /metrics ports only; and JOULE_JOB_NETWORK_POLICY's peers."""

from __future__ import annotations

import pytest

from joule.api import JobRef, TrainingJobSpec
from joule.builders import worker_pod
from joule.builders.networkpolicy import job_network_policy
from joule.config import OperatorConfig

JOB = JobRef("gpt", "ml", "uid-1")
PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}


def selects(policy: dict, labels: dict[str, str]) -> bool:
    wanted = policy["spec"]["podSelector"]["matchLabels"]
    return wanted.items() <= labels.items()


def test_the_jobs_workers_and_only_they_are_selected_and_admit_each_other():
    spec = TrainingJobSpec.parse({"image": "x", "replicas": 2})
    policy = job_network_policy(JOB, spec, [PROMETHEUS])
    worker = worker_pod(JOB, spec, 1)["metadata"]["labels"]
    other = worker_pod(JobRef("other", "ml", "uid-2"), spec, 0)["metadata"]["labels"]
    assert selects(policy, worker) and not selects(policy, other)
    peers, metrics = policy["spec"]["ingress"]
    assert "ports" not in peers  # rendezvous, NCCL and gloo: any port, between workers
    assert peers["from"] == [{"podSelector": policy["spec"]["podSelector"]}]
    assert metrics["from"] == [PROMETHEUS]
    assert metrics["ports"] == [{"protocol": "TCP", "port": 9090}]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_the_metrics_ports_are_one_per_process_or_the_one_the_spec_names():
    eight = TrainingJobSpec.parse({"image": "x", "gpusPerReplica": 8})
    (port,) = job_network_policy(JOB, eight, [])["spec"]["ingress"][1]["ports"]
    assert (port["port"], port["endPort"]) == (9090, 9097)
    own = TrainingJobSpec.parse(
        {"image": "x", "progress": {"samplesMetric": "my_samples_total", "port": 8000}}
    )
    assert job_network_policy(JOB, own, [])["spec"]["ingress"][1]["ports"] == [
        {"protocol": "TCP", "port": 8000}
    ]


def test_the_peers_setting_is_a_json_list_of_peers():
    assert OperatorConfig.from_env({}).job_network_policy is None
    config = OperatorConfig.from_env(
        {"JOULE_JOB_NETWORK_POLICY": '[{"ipBlock": {"cidr": "10.0.0.0/8"}}]'}
    )
    assert config.job_network_policy == ({"ipBlock": {"cidr": "10.0.0.0/8"}},)
    assert OperatorConfig.from_env({"JOULE_JOB_NETWORK_POLICY": "[]"}).job_network_policy == ()
    for bad in ("{", '{"podSelector": {}}', '[{"ports": []}]', "[{}]"):
        with pytest.raises(ValueError, match="JOULE_JOB_NETWORK_POLICY"):
            OperatorConfig.from_env({"JOULE_JOB_NETWORK_POLICY": bad})
