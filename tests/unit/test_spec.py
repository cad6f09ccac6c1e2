"""The operator's own check of a spec matches the CRD's rules and defaults."""

import pytest

from joule.api import CleanPodPolicy, SpecError, TrainingJobSpec
from joule.api.types import MAX_NAME_LENGTH


def test_defaults_match_the_crd():
    s = TrainingJobSpec.parse({"image": "x"})
    assert (s.replicas, s.gpus_per_replica, s.backoff_limit) == (1, 1, 3)
    assert s.clean_pod_policy == CleanPodPolicy.RUNNING
    assert s.startup_timeout_seconds == 300
    assert s.bounds == (1, 1) and not s.elastic


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "spec.image is required"),
        ({"image": "x", "replicas": 0}, "spec.replicas must be >= 1"),
        ({"image": "x", "gpusPerReplica": -1}, "gpusPerReplica must be >= 0"),
        (
            {"image": "x", "elastic": {"minReplicas": 3, "maxReplicas": 2}, "replicas": 2},
            "minReplicas must be less than or equal",
        ),
        (
            {"image": "x", "elastic": {"minReplicas": 1, "maxReplicas": 2}, "replicas": 3},
            "replicas must lie within",
        ),
        ({"image": "x", "cleanPodPolicy": "Some"}, "cleanPodPolicy must be"),
        ({"image": "x", "replicas": "2"}, "must be an integer"),
    ],
)
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(SpecError, match=message):
        TrainingJobSpec.parse(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"replicas": 1025}, r"spec.replicas must be <= 1024"),
        ({"elastic": {"minReplicas": 1, "maxReplicas": 1025}}, r"maxReplicas must be <= 1024"),
        ({"gpusPerReplica": 65}, r"spec.gpusPerReplica must be <= 64"),
        ({"scaling": {"cooldownSeconds": 86401}}, r"spec.scaling.cooldownSeconds must be <="),
        ({"energy": {"windowSeconds": 5}}, r"spec.energy.windowSeconds must be >= 10"),
    ],
)
def test_out_of_range_integers_name_the_field_and_the_bound(spec, message):
    with pytest.raises(SpecError, match=message):
        TrainingJobSpec.parse({"image": "x", **spec})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a" * (MAX_NAME_LENGTH + 1), "metadata.name must be at most 51 characters"),
        ("a" * 70, "metadata.name must be at most 51 characters"),
        ("1job", "must be a DNS-1035 label"),
        ("Job", "must be a DNS-1035 label"),
        ("job-", "must be a DNS-1035 label"),
        ("my.job", "must be a DNS-1035 label"),  # a valid object name, but no Service name
        ("", "must be a DNS-1035 label"),
    ],
)
def test_a_name_no_service_or_worker_pod_could_carry_is_refused(name, message):
    with pytest.raises(SpecError, match=message):
        TrainingJobSpec.parse({"image": "x"}, name=name)


@pytest.mark.parametrize("name", ["a", "llm-7b", "j0", "a" * MAX_NAME_LENGTH])
def test_dns_1035_names_up_to_the_limit_are_accepted(name):
    TrainingJobSpec.parse({"image": "x"}, name=name)
