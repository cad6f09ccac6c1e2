"""The operator's own check of a spec matches the CRD's rules and defaults."""

from decimal import Decimal

import pytest

from joule.api import CleanPodPolicy, SpecError, TrainingJobSpec
from joule.api.types import MAX_NAME_LENGTH, parse_quantity


def test_defaults_match_the_crd():
    s = TrainingJobSpec.parse({"image": "x"})
    assert (s.replicas, s.gpus_per_replica, s.backoff_limit) == (1, 1, 3)
    assert s.clean_pod_policy == CleanPodPolicy.RUNNING
    assert s.startup_timeout_seconds == 300
    assert s.restart_backoff_seconds == 10
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
        ({"restartBackoffSeconds": -1}, r"spec.restartBackoffSeconds must be >= 0"),
        ({"restartBackoffSeconds": 3601}, r"spec.restartBackoffSeconds must be <= 3600"),
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


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"sharedMemory": "lots"}, r"spec.sharedMemory must be a positive quantity"),
        ({"sharedMemory": 0}, r"spec.sharedMemory must be a positive quantity"),
        ({"sharedMemory": "-1Gi"}, r"spec.sharedMemory must be a positive quantity"),
        ({"resources": {"requests": {"cpu": "abc"}}}, r"spec.resources.requests\[cpu\] must be"),
        ({"resources": {"limits": {"cpu": "abc"}}}, r"spec.resources.limits\[cpu\] must be"),
        ({"resources": {"requests": {"memory": "12 gigs"}}}, r"requests\[memory\] must be"),
        ({"resources": {"requests": {"memory": "12GB"}}}, r"requests\[memory\] must be"),
        ({"resources": {"limits": {"cpu": "-1"}}}, r"limits\[cpu\] must be a non-negative"),
        ({"resources": {"limits": {"cpu": True}}}, r"limits\[cpu\] must be"),
        ({"resources": {"limits": {"cpu": 1.5}}}, r"limits\[cpu\] must be"),  # schema: int|str
        ({"resources": {"limits": {"memory": "1" * 65}}}, r"at most 64 characters"),
        (
            {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}}},
            r"spec.resources.requests\[cpu\] must not be more than its limit",
        ),
        (
            {"resources": {"requests": {f"example.com/r{i}": 1 for i in range(17)}}},
            "at most 16 resources",
        ),
        ({"resources": {"limits": {"nvidia.com/gpu": 1}}}, "set GPUs with spec.gpusPerReplica"),
    ],
)
def test_a_bad_quantity_is_refused_with_its_field(spec, message):
    with pytest.raises(SpecError, match=message):
        TrainingJobSpec.parse({"image": "x", **spec})


def test_good_quantities_pass_through_to_the_pod_unchanged():
    resources = {
        "requests": {"cpu": "500m", "memory": "12Gi", "example.com/foo": 1},
        "limits": {"cpu": "1.5", "memory": "12Gi", "ephemeral-storage": "1e3"},
    }
    s = TrainingJobSpec.parse({"image": "x", "resources": resources, "sharedMemory": "16Gi"})
    assert s.pod["resources"] == resources and s.pod["sharedMemory"] == "16Gi"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", Decimal("0.5")),
        ("1.5", Decimal("1.5")),
        ("12Gi", Decimal(12 * 2**30)),
        ("2k", Decimal(2000)),
        ("1e3", Decimal(1000)),
        ("1E-3", Decimal("0.001")),
        (".5", Decimal("0.5")),
        ("5.", Decimal(5)),
        ("+1", Decimal(1)),
        ("100u", Decimal("0.0001")),
        ("3n", Decimal("3e-9")),
        ("1Ei", Decimal(2**60)),
        ("2E", Decimal("2e18")),  # exa, not an exponent
        (4, Decimal(4)),
        # Kubernetes' parser lets the digits go missing, and so must ours to agree with it.
        ("Gi", Decimal(0)),
        (".", Decimal(0)),
        ("-", Decimal(0)),
    ],
)
def test_quantities_are_read_as_kubernetes_reads_them(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "text",
    ["abc", "12 gigs", "12GB", "1K", "1ki", "1e", "1e1.5", " 1", "1 ", "--1", "", "1.2.3",
     "1Gi1", "0x10", "Ei", "-.e-20", "1e99999999999999999999", True, None, 1.5],
)  # fmt: skip
def test_things_that_are_not_quantities(text):
    assert parse_quantity(text) is None
