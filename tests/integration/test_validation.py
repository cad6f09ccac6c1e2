"""Bad input fails at `kubectl apply`: the real API server, with the CRD's schema and CEL rules,
refuses it with a message that names the field, and accepts what the operator can run.

Only the control plane is needed (no operator): what is tested is the API server's answer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from joule.api import template as owned
from joule.api.types import (
    MAX_NAME_LENGTH,
    MAX_REPLICAS,
    SpecError,
    TrainingJobSpec,
    parse_quantity,
)
from tests.conftest import ROOT, Kubectl, wait_for

CRD = ROOT / "crds" / "joule.dev_trainingjobs.yaml"
API_VERSION = "joule.dev/v1alpha1"


def manifest(name: str, **spec: Any) -> str:
    # JSON, not YAML: kubectl reads an unquoted 1e9 or 1E-3 in YAML as a number.
    body = {
        "apiVersion": API_VERSION,
        "kind": "TrainingJob",
        "metadata": {"name": name},
        # image=None leaves the image out.
        "spec": {k: v for k, v in {"image": "trainer:test", **spec}.items() if v is not None},
    }
    return json.dumps(body)


def apply(kubectl: Kubectl, namespace: str, name: str, *flags: str, **spec: Any):
    return kubectl(
        "apply", "-n", namespace, *flags, "-f", "-", stdin=manifest(name, **spec), check=False
    )


def refused(proc) -> str:
    assert proc.returncode != 0, f"accepted: {proc.stdout}"
    return proc.stderr


NAME_TOO_LONG = f"metadata.name must be at most {MAX_NAME_LENGTH} characters"
NOT_DNS_1035 = "metadata.name must be a DNS-1035 label"
QUANTITY = "must be a non-negative quantity"
# The API server's own words for a schema error.
REQUIRED = "Required value"
NOT_ONE_OF = "Unsupported value"
NO_MATCH = "in body should match"
TOO_SHORT = "should be at least 1 chars long"
DUPLICATE = "Duplicate value"
AT_LEAST = "should be greater than or equal to"
AT_MOST = "should be less than or equal to"


def must_be(kind: str) -> str:
    return f"must be of type {kind}"


BUDGET = "budget must be a positive number of joules or a quantity like 250kWh"
LABEL_KEY = "each key must be a label key"
VOL = [{"name": "data", "emptyDir": {}}]
CKPT = {"checkpoint": {"path": "/ckpt", "volume": "data"}, "volumes": VOL}
SUBDOMAIN = "should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]"
UNKNOWN = "unknown field"
TPL = "spec.template.spec"
TRAINER = f"{TPL}.containers[0]"


SECRET_KEY = "encryption.secretRef.key must be a Secret's key"


def encrypted(secret_ref: dict[str, Any]) -> dict[str, Any]:
    """spec.checkpoint.encryption with this secretRef (and what it sits in)."""
    checkpoint = {"path": "/ckpt", "volume": "data", "encryption": {"secretRef": secret_ref}}
    if not secret_ref:
        checkpoint["encryption"] = {}
    return {"checkpoint": checkpoint, "volumes": VOL}


def tpl(**pod_spec: Any) -> dict[str, Any]:
    return {"template": {"spec": pod_spec}}


def trainer(**fields: Any) -> dict[str, Any]:
    return tpl(containers=[{"name": "trainer", **fields}])


@pytest.mark.parametrize(
    ("name", "spec", "field", "message"),
    [
        ("a" * 70, {}, "metadata.name", NAME_TOO_LONG),
        ("a" * (MAX_NAME_LENGTH + 1), {}, "metadata.name", NAME_TOO_LONG),
        ("7b-llm", {}, "metadata.name", NOT_DNS_1035),
        # Valid names for a custom object (DNS-1123 subdomains), but not for a Service.
        ("llm.7b", {}, "metadata.name", NOT_DNS_1035),
        ("llm-", {}, "metadata.name", NOT_DNS_1035),
        ("ok", {"sharedMemory": "lots"}, "spec.sharedMemory", "positive quantity of bytes"),
        ("ok", {"sharedMemory": 0}, "spec.sharedMemory", "positive quantity of bytes"),
        ("ok", {"resources": {"requests": {"cpu": "abc"}}}, "spec.resources.requests[cpu]",
         QUANTITY),
        ("ok", {"resources": {"limits": {"cpu": "abc"}}}, "spec.resources.limits[cpu]", QUANTITY),
        ("ok", {"resources": {"requests": {"memory": "12 gigs"}}},
         "spec.resources.requests[memory]", QUANTITY),
        ("ok", {"resources": {"limits": {"memory": "12GB"}}}, "spec.resources.limits[memory]",
         QUANTITY),
        ("ok", {"resources": {"requests": {"example.com/foo": -1}}},
         "spec.resources.requests[example.com/foo]", QUANTITY),
        ("ok", {"resources": {"limits": {"cpu": "-500m"}}}, "spec.resources.limits[cpu]",
         QUANTITY),
        ("ok", {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}}},
         "spec.resources.requests", "must not be more than its resources.limits"),
        ("ok", {"resources": {"requests": {f"example.com/r{i}": 1 for i in range(17)}}},
         "spec.resources.requests", "must have at most 16 items"),
        # The API server names map entries two ways: this for schema errors, [memory] for CEL's.
        ("ok", {"resources": {"limits": {"memory": "1" * 65}}}, "spec.resources.limits.memory",
         "Too long"),
        ("ok", {"replicas": MAX_REPLICAS + 1}, "spec.replicas",
         f"less than or equal to {MAX_REPLICAS}"),
        ("ok", {"replicas": 2, "elastic": {"minReplicas": MAX_REPLICAS + 1, "maxReplicas": 1}},
         "spec.elastic.minReplicas", f"less than or equal to {MAX_REPLICAS}"),
        ("ok", {"tensorboard": {"enabled": True}}, "spec.tensorboard",
         "tensorboard needs checkpoint.volume"),
        ("ok", {"tensorboard": {"enabled": True}, "checkpoint": {"path": "/c"}},
         "spec.tensorboard", "tensorboard needs checkpoint.volume"),
        # Every other field of the spec, in the CRD's order: what is required, each type,
        # range, enum and pattern, and the pairs that contradict each other.
        ("ok", {"image": None}, "spec.image", REQUIRED),
        ("ok", {"image": ""}, "spec.image", TOO_SHORT),
        ("ok", {"image": "trainer test"}, "spec.image", NO_MATCH),
        ("ok", {"command": "python train.py"}, "spec.command", must_be("array")),
        ("ok", {"args": ["--epochs", 3]}, "spec.args[1]", must_be("string")),
        ("ok", {"env": [{"value": "x"}]}, "spec.env[0].name", REQUIRED),
        ("ok", {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
         "spec.env[1]", DUPLICATE),
        ("ok", {"env": [{"name": "A=B", "value": "1"}]}, "spec.env[0].name", NO_MATCH),
        ("ok", {"env": [{"name": "EPOCHS", "value": 3}]}, "spec.env[0].value",
         must_be("string")),
        ("ok", {"envFrom": "my-config"}, "spec.envFrom", must_be("array")),
        ("ok", {"workingDir": 5}, "spec.workingDir", must_be("string")),
        ("ok", {"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy", NOT_ONE_OF),
        ("ok", {"imagePullSecrets": [{"name": ""}]}, "spec.imagePullSecrets[0].name",
         TOO_SHORT),
        ("ok", {"imagePullSecrets": ["regcred"]}, "spec.imagePullSecrets[0]",
         must_be("object")),
        ("ok", {"replicas": 0}, "spec.replicas", f"{AT_LEAST} 1"),
        ("ok", {"replicas": "2"}, "spec.replicas", must_be("integer")),
        ("ok", {"replicas": 2, "elastic": {"minReplicas": 3, "maxReplicas": 2}},
         "spec.elastic.minReplicas",
         "elastic.minReplicas must be less than or equal to elastic.maxReplicas"),
        ("ok", {"replicas": 3, "elastic": {"minReplicas": 1, "maxReplicas": 2}},
         "spec.replicas", "replicas must lie within [elastic.minReplicas, elastic.maxReplicas]"),
        ("ok", {"elastic": {"minReplicas": 1}}, "spec.elastic.maxReplicas", REQUIRED),
        ("ok", {"elastic": {"minReplicas": 0, "maxReplicas": 2}}, "spec.elastic.minReplicas",
         f"{AT_LEAST} 1"),
        ("ok", {"gpusPerReplica": -1}, "spec.gpusPerReplica", f"{AT_LEAST} 0"),
        ("ok", {"gpusPerReplica": 65}, "spec.gpusPerReplica", f"{AT_MOST} 64"),
        ("ok", {"resources": {"limits": {"nvidia.com/gpu": 1}}}, "spec.resources",
         "set GPUs with spec.gpusPerReplica, not in resources"),
        ("ok", {"resources": "big"}, "spec.resources", must_be("object")),
        ("ok", {"sharedMemory": "-1Gi"}, "spec.sharedMemory", "positive quantity of bytes"),
        ("ok", {"volumes": [{"emptyDir": {}}]}, "spec.volumes[0].name", REQUIRED),
        ("ok", {"volumes": [{"name": "Data", "emptyDir": {}}]}, "spec.volumes[0].name",
         NO_MATCH),
        ("ok", {"volumes": VOL * 2}, "spec.volumes[1]", DUPLICATE),
        ("ok", {"volumes": [{"name": "joule-dshm", "emptyDir": {}}]}, "spec.volumes[0].name",
         owned.VOLUMES),
        ("ok", {"volumes": [{"name": "joule-checkpoint-key", "emptyDir": {}}]},
         "spec.volumes[0].name", owned.VOLUMES),
        ("ok", {"volumeMounts": [{"name": "data", "mountPath": "/data"}]}, "spec.volumeMounts",
         "each of volumeMounts must name one of spec.volumes"),
        ("ok", {"volumes": VOL, "volumeMounts": [{"name": "data"}]},
         "spec.volumeMounts[0].mountPath", REQUIRED),
        ("ok", {"volumes": VOL, "volumeMounts": [{"name": "data", "mountPath": "/dev/shm"}]},
         "spec.volumeMounts[0].mountPath", "/dev/shm and /etc/joule are Joule's own mounts"),
        ("ok", {"checkpoint": {"volume": "data"}, "volumes": VOL}, "spec.checkpoint.path",
         REQUIRED),
        ("ok", {"checkpoint": {"path": "ckpt"}}, "spec.checkpoint.path", "should match '^/'"),
        ("ok", {"checkpoint": {"path": "/dev/shm", "volume": "data"}, "volumes": VOL},
         "spec.checkpoint.path", "checkpoint.path must not be /dev/shm"),
        ("ok", {"checkpoint": {"path": "/etc/joule/ckpt"}}, "spec.checkpoint.path",
         "nor under /etc/joule"),
        ("ok", {"checkpoint": {"path": "/ckpt", "volume": "ckpt"}, "volumes": VOL},
         "spec.checkpoint.volume", "checkpoint.volume must name one of spec.volumes"),
        ("ok", encrypted({}), "spec.checkpoint.encryption.secretRef", REQUIRED),
        ("ok", encrypted({"key": "k"}), "spec.checkpoint.encryption.secretRef.name", REQUIRED),
        ("ok", encrypted({"name": "k"}), "spec.checkpoint.encryption.secretRef.key", REQUIRED),
        ("ok", encrypted({"name": "", "key": "k"}), "spec.checkpoint.encryption.secretRef.name",
         TOO_SHORT),
        ("ok", encrypted({"name": "Ckpt_Key", "key": "k"}),
         "spec.checkpoint.encryption.secretRef.name", NO_MATCH),
        ("ok", encrypted({"name": "k", "key": ""}), "spec.checkpoint.encryption.secretRef.key",
         TOO_SHORT),
        ("ok", encrypted({"name": "k", "key": "aes/key"}),
         "spec.checkpoint.encryption.secretRef.key", SECRET_KEY),
        ("ok", encrypted({"name": "k", "key": "..data"}),
         "spec.checkpoint.encryption.secretRef.key", SECRET_KEY),
        ("ok", encrypted({"name": "k", "key": "k", "namespace": "other"}),
         "spec.checkpoint.encryption.secretRef.namespace", UNKNOWN),
        ("ok", {"privacy": {"maxGradNorm": 1}}, "spec.privacy",
         "privacy needs noiseMultiplier or targetEpsilon"),
        ("ok", {"privacy": {"noiseMultiplier": 0}}, "spec.privacy.noiseMultiplier",
         "should be greater than 0"),
        ("ok", {"privacy": {"targetEpsilon": 8, "delta": 1}}, "spec.privacy.delta",
         "should be less than 1"),
        ("ok", {"privacy": {"targetEpsilon": "8"}}, "spec.privacy.targetEpsilon",
         must_be("number")),
        ("ok", {"volumes": VOL, "data": {"volume": "data", "source": {"https": {
            "url": "ftp://files/x"}}}}, "spec.data.source.https.url", NO_MATCH),
        ("ok", {"volumes": VOL, "data": {"volume": "data", "source": {"s3": {
            "endpoint": "https://s3:9000", "bucket": "Bad_Bucket",
            "accessKeyId": {"secretKeyRef": {"name": "c", "key": "id"}},
            "secretAccessKey": {"secretKeyRef": {"name": "c", "key": "s"}}}}}},
         "spec.data.source.s3.bucket", NO_MATCH),
        ("ok", {"volumes": VOL, "data": {"volume": "data", "source": {"s3": {
            "endpoint": "https://s3:9000", "bucket": "sets"}}}},
         "spec.data.source.s3.accessKeyId", REQUIRED),
        ("ok", {"scaling": {"policy": "Fastest"}}, "spec.scaling.policy", NOT_ONE_OF),
        ("ok", {"scaling": {"policy": "Throughput"}}, "spec.scaling.policy",
         "needs spec.elastic bounds to scale within"),
        ("ok", {"scaling": {"evaluationIntervalSeconds": 1}},
         "spec.scaling.evaluationIntervalSeconds", f"{AT_LEAST} 5"),
        ("ok", {"scaling": {"cooldownSeconds": -60}}, "spec.scaling.cooldownSeconds",
         f"{AT_LEAST} 0"),
        ("ok", {"scaling": {"minGainPercent": 0}}, "spec.scaling.minGainPercent",
         f"{AT_LEAST} 1"),
        ("ok", {"scaling": {"minGainPercent": 101}}, "spec.scaling.minGainPercent",
         f"{AT_MOST} 100"),
        ("ok", {"energy": {"powerCapWatts": 0}}, "spec.energy.powerCapWatts", f"{AT_LEAST} 1"),
        ("ok", {"energy": {"powerCapWatts": "300W"}}, "spec.energy.powerCapWatts",
         must_be("integer")),
        ("ok", {"energy": {"windowSeconds": 5}}, "spec.energy.windowSeconds", f"{AT_LEAST} 10"),
        ("ok", {"energy": {"windowSeconds": 86401}}, "spec.energy.windowSeconds",
         f"{AT_MOST} 86400"),
        ("ok", {"energy": {"budget": "250 kWh"}}, "spec.energy.budget", BUDGET),
        ("ok", {"energy": {"budget": "250kwh"}}, "spec.energy.budget", BUDGET),
        ("ok", {"energy": {"budget": "5000"}}, "spec.energy.budget", BUDGET),
        ("ok", {"energy": {"budget": "0J"}}, "spec.energy.budget", BUDGET),
        ("ok", {"energy": {"budget": "0.0kWh"}}, "spec.energy.budget", BUDGET),
        ("ok", {"energy": {"budget": -5}}, "spec.energy.budget", BUDGET),
        ("ok", {"energy": {"budget": 1.5}}, "spec.energy.budget", must_be("integer,string")),
        ("ok", {"energy": {"budget": "5MJ", "onBudgetExhausted": "Stop"}},
         "spec.energy.onBudgetExhausted", NOT_ONE_OF),
        ("ok", {"energy": {"gpuPowerLimitWatts": 0}}, "spec.energy.gpuPowerLimitWatts",
         f"{AT_LEAST} 1"),
        ("ok", {"energy": {"powerCapWatts": 1000, "gpuPowerLimitWatts": 200,
                           "minGpuPowerLimitWatts": 300}},
         "spec.energy.minGpuPowerLimitWatts",
         "minGpuPowerLimitWatts must not be above gpuPowerLimitWatts"),
        ("ok", {"energy": {"minGpuPowerLimitWatts": 100}}, "spec.energy.minGpuPowerLimitWatts",
         "needs powerCapWatts, budget or scaling.policy EnergyEfficient"),
        ("ok", {"target": {"samples": 0}}, "spec.target.samples", f"{AT_LEAST} 1"),
        ("ok", {"target": {"deadline": "tomorrow"}}, "spec.target.deadline",
         must_be("date-time")),
        ("ok", {"target": {"deadline": "2030-01-01"}}, "spec.target.deadline",
         must_be("date-time")),
        ("ok", {"tensorboard": {"enabled": "yes"}, **CKPT}, "spec.tensorboard.enabled",
         must_be("boolean")),
        ("ok", {"tensorboard": {"enabled": True, "image": ""}, **CKPT}, "spec.tensorboard.image",
         TOO_SHORT),
        ("ok", {"tensorboard": {"enabled": True, "image": "tb :1"}, **CKPT},
         "spec.tensorboard.image", NO_MATCH),
        ("ok", {"progress": {"hangTimeoutSeconds": 59}}, "spec.progress.hangTimeoutSeconds",
         f"{AT_LEAST} 60"),
        ("ok", {"progress": {"hangTimeoutSeconds": 0}}, "spec.progress.hangTimeoutSeconds",
         f"{AT_LEAST} 60"),
        ("ok", {"progress": {"hangTimeoutSeconds": "30m"}}, "spec.progress.hangTimeoutSeconds",
         must_be("integer")),
        ("ok", {"progress": {"samplesMetric": "my-samples"}}, "spec.progress.samplesMetric",
         NO_MATCH),
        ("ok", {"progress": {"samplesMetric": "s_total", "port": 0}}, "spec.progress.port",
         f"{AT_LEAST} 1"),
        ("ok", {"progress": {"samplesMetric": "s_total", "port": 65536}}, "spec.progress.port",
         f"{AT_MOST} 65535"),
        ("ok", {"nodeSelector": {"gpu": True}}, "spec.nodeSelector.gpu", must_be("string")),
        ("ok", {"nodeSelector": {"gpu pool": "a100"}}, "spec.nodeSelector", LABEL_KEY),
        ("ok", {"nodeSelector": {"pool": "a100 x8"}}, "spec.nodeSelector.pool", NO_MATCH),
        ("ok", {"tolerations": "gpu"}, "spec.tolerations", must_be("array")),
        ("ok", {"tolerations": [{"key": "gpu", "operator": "exists"}]},
         "spec.tolerations[0].operator", NOT_ONE_OF),
        ("ok", {"tolerations": [{"key": "gpu", "effect": "Never"}]},
         "spec.tolerations[0].effect", NOT_ONE_OF),
        ("ok", {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}]},
         "spec.tolerations[0].value", "value must be empty when its operator is Exists"),
        ("ok", {"tolerations": [{"value": "yes"}]}, "spec.tolerations[0].operator",
         "a toleration without a key must have operator Exists"),
        ("ok", {"tolerations": [{"key": "gpu", "tolerationSeconds": 60}]},
         "spec.tolerations[0].tolerationSeconds", "tolerationSeconds needs effect NoExecute"),
        ("ok", {"affinity": "gpu-nodes"}, "spec.affinity", must_be("object")),
        ("ok", {"securityContext": "root"}, "spec.securityContext", must_be("object")),
        ("ok", {"securityContext": {"privileged": True}}, "spec.securityContext.privileged",
         "privileged true needs allowPrivilegeEscalation true too"),
        ("ok", {"securityContext": {"privileged": "yes"}}, "spec.securityContext.privileged",
         must_be("boolean")),
        ("ok", {"securityContext": {"runAsUser": -1}}, "spec.securityContext.runAsUser",
         f"{AT_LEAST} 0"),
        ("ok", {"securityContext": {"runAsNonRoot": True, "runAsUser": 0}},
         "spec.securityContext.runAsUser", "runAsNonRoot true and runAsUser 0 contradict"),
        ("ok", {"podSecurityContext": {"fsGroup": "users"}}, "spec.podSecurityContext.fsGroup",
         must_be("integer")),
        ("ok", {"podSecurityContext": {"runAsGroup": 2**31}},
         "spec.podSecurityContext.runAsGroup", f"{AT_MOST} {2**31 - 1}"),
        ("ok", {"podSecurityContext": {"runAsNonRoot": True, "runAsUser": 0}},
         "spec.podSecurityContext.runAsUser", "runAsNonRoot true and runAsUser 0 contradict"),
        ("ok", {"priorityClassName": "High Priority"}, "spec.priorityClassName", SUBDOMAIN),
        ("ok", {"schedulerName": "Volcano"}, "spec.schedulerName", SUBDOMAIN),
        ("ok", {"serviceAccountName": "trainer_sa"}, "spec.serviceAccountName", SUBDOMAIN),
        ("ok", {"podLabels": {"team": 1}}, "spec.podLabels.team", must_be("string")),
        ("ok", {"podLabels": {"-team": "ml"}}, "spec.podLabels", LABEL_KEY),
        ("ok", {"podLabels": {"team": "ml-" + "x" * 61}}, "spec.podLabels.team",
         "Too long: may not be more than 63 bytes"),
        ("ok", {"podLabels": {f"l{i}": "x" for i in range(65)}}, "spec.podLabels",
         "must have at most 64 items"),
        ("ok", {"podAnnotations": {"note": 1}}, "spec.podAnnotations.note", must_be("string")),
        ("ok", {"podAnnotations": {"Example.com/note": "x"}}, "spec.podAnnotations", LABEL_KEY),
        # spec.template: what Joule owns is refused with the reason, and a misspelt field too.
        ("ok", {"template": {"metadata": {"name": "w"}}}, "spec.template.metadata.name",
         owned.OWNED_METADATA["name"]),
        ("ok", {"template": {"metadata": {"namespace": "w"}}},
         "spec.template.metadata.namespace", owned.OWNED_METADATA["namespace"]),
        ("ok", {"template": {"metadata": {"labels": {"joule.dev/job-name": "x"}}}},
         "spec.template.metadata.labels", owned.LABELS),
        ("ok", {"template": {"metadata": {"annotations": {"joule.dev/x": "1"}}}},
         "spec.template.metadata.annotations", owned.ANNOTATIONS),
        ("ok", {"template": {"metadata": {"labels": {"-team": "a"}}}},
         "spec.template.metadata.labels", LABEL_KEY),
        ("ok", {"template": {"metadata": {"finalizers": ["x"]}}},
         "spec.template.metadata.finalizers", UNKNOWN),
        ("ok", tpl(restartPolicy="OnFailure"), f"{TPL}.restartPolicy",
         owned.OWNED_SPEC["restartPolicy"]),
        ("ok", tpl(hostname="w"), f"{TPL}.hostname", owned.OWNED_SPEC["hostname"]),
        ("ok", tpl(subdomain="w"), f"{TPL}.subdomain", owned.OWNED_SPEC["subdomain"]),
        ("ok", tpl(hostnameOverride="w"), f"{TPL}.hostnameOverride",
         owned.OWNED_SPEC["hostnameOverride"]),
        ("ok", tpl(activeDeadlineSeconds=60), f"{TPL}.activeDeadlineSeconds",
         owned.OWNED_SPEC["activeDeadlineSeconds"]),
        ("ok", tpl(initContainer=[]), f"{TPL}.initContainer", UNKNOWN),
        ("ok", tpl(containers=[{"image": "busybox"}]), f"{TPL}.containers[0].name", REQUIRED),
        ("ok", tpl(containers=[{"name": "Logs", "image": "b"}]), f"{TPL}.containers[0].name",
         NO_MATCH),
        ("ok", tpl(containers=[{"name": "a", "image": "x"}, {"name": "a", "image": "y"}]),
         f"{TPL}.containers[1]", DUPLICATE),
        ("ok", tpl(containers=[{"name": "logs"}]), f"{TPL}.containers[0].image",
         owned.SIDECAR_IMAGE),
        ("ok", trainer(image="mine:1"), f"{TRAINER}.image", owned.TRAINER_IMAGE),
        ("ok", trainer(resources={"limits": {"nvidia.com/gpu": 1}}), f"{TRAINER}.resources",
         owned.TRAINER_GPUS),
        ("ok", trainer(restartPolicy="Always"), f"{TRAINER}.restartPolicy",
         owned.TRAINER_RESTARTS),
        ("ok", trainer(volumeMounts=[{"name": "d", "mountPath": "/etc/joule"}]),
         f"{TRAINER}.volumeMounts", owned.TRAINER_MOUNTS),
        ("ok", trainer(livenesProbe={}), f"{TRAINER}.livenesProbe", UNKNOWN),
        ("ok", trainer(env=[{"value": "x"}]), f"{TRAINER}.env[0].name", REQUIRED),
        ("ok", tpl(initContainers=[{"name": "fetch"}]), f"{TPL}.initContainers[0].image",
         REQUIRED),
        ("ok", tpl(initContainers=[{"name": "trainer", "image": "x"}]),
         f"{TPL}.initContainers[0].name", owned.INIT_NAME),
        ("ok", tpl(volumes=[{"name": "joule-power", "emptyDir": {}}]), f"{TPL}.volumes[0].name",
         owned.VOLUMES),
        ("ok", tpl(volumes=[{"name": "joule-checkpoint-key", "emptyDir": {}}]),
         f"{TPL}.volumes[0].name", owned.VOLUMES),
        ("ok", tpl(runtimeClassName="G Visor"), f"{TPL}.runtimeClassName", SUBDOMAIN),
        ("ok", tpl(terminationGracePeriodSeconds=-1), f"{TPL}.terminationGracePeriodSeconds",
         f"{AT_LEAST} 0"),
        ("ok", {"backoffLimit": -1}, "spec.backoffLimit", f"{AT_LEAST} 0"),
        ("ok", {"restartBackoffSeconds": -1}, "spec.restartBackoffSeconds", f"{AT_LEAST} 0"),
        ("ok", {"restartBackoffSeconds": 3601}, "spec.restartBackoffSeconds", f"{AT_MOST} 3600"),
        ("ok", {"nodeLostTimeoutSeconds": -1}, "spec.nodeLostTimeoutSeconds", f"{AT_LEAST} 0"),
        ("ok", {"nodeLostTimeoutSeconds": 3601}, "spec.nodeLostTimeoutSeconds",
         f"{AT_MOST} 3600"),
        ("ok", {"nodeLostTimeoutSeconds": "1m"}, "spec.nodeLostTimeoutSeconds",
         must_be("integer")),
        ("ok", {"activeDeadlineSeconds": 0}, "spec.activeDeadlineSeconds", f"{AT_LEAST} 1"),
        ("ok", {"ttlSecondsAfterFinished": -1}, "spec.ttlSecondsAfterFinished",
         f"{AT_LEAST} 0"),
        ("ok", {"cleanPodPolicy": "Failed"}, "spec.cleanPodPolicy", NOT_ONE_OF),
        ("ok", {"suspend": "yes"}, "spec.suspend", must_be("boolean")),
        ("ok", {"startupTimeoutSeconds": 0}, "spec.startupTimeoutSeconds", f"{AT_LEAST} 1"),
        # A misspelt field is refused (kubectl validates strictly), not dropped in silence.
        ("ok", {"replica": 2}, "spec.replica", "unknown field"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)  # fmt: skip
def test_bad_input_is_refused_at_apply_with_the_field_named(
    kubectl, crd, namespace, name, spec, field, message
):
    stderr = refused(apply(kubectl, namespace, name, **spec))
    assert field in stderr and message in stderr, stderr


# Unusual but valid: the rules above must not refuse these, nor may the parser refuse what the
# API server stored (the operator would mark the job InvalidSpec).
GOOD_SPECS = [
    {"image": "localhost:5000/team/trainer@sha256:" + "0" * 64},
    {"env": [{"name": "my.var-1", "value": "x"}]},  # relaxed names, as pods take them
    {"nodeLostTimeoutSeconds": 0},  # evicted as soon as the node is tainted
    {"nodeLostTimeoutSeconds": 3600},
    {"volumes": VOL, "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
     "checkpoint": {"path": "/data/ckpt", "volume": "data"}},
    encrypted({"name": "ckpt-key.v2", "key": "AES_256-key.b64"}),
    {"privacy": {"noiseMultiplier": 1.1, "maxGradNorm": 0.5, "targetEpsilon": 8,
                 "delta": 1e-5}},
    {"privacy": {"targetEpsilon": 3}},
    {"volumes": VOL, "data": {"volume": "data", "path": "/datasets", "image": "t:1",
                              "source": {"persistentVolumeClaim": {"claimName": "sets",
                                                                   "path": "a/b"}}}},
    {"energy": {"budget": "0.5kWh", "powerCapWatts": 900, "gpuPowerLimitWatts": 300,
                "minGpuPowerLimitWatts": 300}},
    {"energy": {"budget": "007MJ", "onBudgetExhausted": "Warn"}},
    {"energy": {"budget": 1}},
    {"target": {"samples": 1, "deadline": "2030-01-01t00:00:00z"}},  # RFC 3339 allows t and z
    {"progress": {"hangTimeoutSeconds": 60}},  # joule_trainer's own counter: no samplesMetric
    {"progress": {"samplesMetric": "imgs_total", "port": 8000, "hangTimeoutSeconds": 86400}},
    {"target": {"deadline": "2030-01-01T00:00:00.123456789+01:00"}},
    {"nodeSelector": {"example.com/pool": "a100", "kubernetes.io/os": "linux", "empty": ""}},
    {"tolerations": [{"operator": "Exists"},
                     {"key": "gpu", "effect": "NoExecute", "tolerationSeconds": 30},
                     {"key": "dedicated", "operator": "Equal", "value": "ops"}]},
    {"securityContext": {"privileged": True, "allowPrivilegeEscalation": True}},
    {"securityContext": {"runAsUser": 0, "capabilities": {"add": ["SYS_PTRACE"]}}},
    {"podSecurityContext": {"runAsNonRoot": True, "runAsUser": 2**31 - 1, "fsGroup": 0,
                            "seccompProfile": {"type": "RuntimeDefault"}}},
    {"priorityClassName": "system-cluster-critical", "schedulerName": "volcano",
     "serviceAccountName": "trainer.sa"},
    {"podLabels": {"x" * 63: "y" * 63, "example.com/team": "ml_a.b-c"},
     "podAnnotations": {"example.com/note": "any text: at all"}},
    {"template": {
        "metadata": {"labels": {"team": "ml"}, "annotations": {"prometheus.io/port": "9100"}},
        "spec": {
            "initContainers": [
                {"name": "fetch", "image": "busybox", "command": ["sh", "-c", "true"]},
                # A native sidecar: stopped when the trainer exits.
                {"name": "proxy", "image": "envoy", "restartPolicy": "Always"},
            ],
            "containers": [
                {"name": "trainer", "env": [{"name": "HF_HOME", "value": "/cache"}],
                 "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                 "readinessProbe": {"httpGet": {"path": "/metrics", "port": 9090}},
                 "resources": {"requests": {"cpu": "2"}}},
                {"name": "logs", "image": "fluent-bit", "securityContext": {"runAsUser": 0}},
            ],
            "volumes": [{"name": "cache", "emptyDir": {}}],
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                           "whenUnsatisfiable": "ScheduleAnyway"}],
            "runtimeClassName": "gvisor",
            "terminationGracePeriodSeconds": 600,
            "dnsConfig": {"options": [{"name": "ndots", "value": "1"}]},
        },
    }},
]  # fmt: skip


def test_unusual_but_valid_specs_pass_the_api_server_and_then_the_parser(kubectl, crd, namespace):
    failed = []
    for spec in GOOD_SPECS:
        proc = apply(kubectl, namespace, "ok", "--dry-run=server", "-o", "json", **spec)
        if proc.returncode != 0:
            failed.append((spec, proc.stderr.strip()))
            continue
        stored = json.loads(proc.stdout)  # with the schema's defaults, as the operator reads it
        try:
            TrainingJobSpec.parse(stored["spec"], name=stored["metadata"]["name"])
        except SpecError as exc:
            failed.append((spec, f"parser: {exc}"))
    assert not failed, failed


GOOD_RESOURCES = {
    "requests": {"cpu": "500m", "memory": "12Gi", "example.com/foo": 1},
    "limits": {"cpu": "1.5", "memory": "12Gi", "ephemeral-storage": "1e9"},
}


@pytest.mark.parametrize("length", [50, MAX_NAME_LENGTH])
def test_good_quantities_and_a_long_name_are_accepted_and_stored_as_written(
    kubectl, crd, namespace, length
):
    name = "j" + "0" * (length - 1)
    # Suspended: where an operator runs in the same test session, it makes no 1024 pods.
    proc = apply(kubectl, namespace, name, resources=GOOD_RESOURCES, sharedMemory="16Gi",
                 replicas=MAX_REPLICAS, suspend=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stored = json.loads(kubectl("get", "-n", namespace, f"tj/{name}", "-o", "json").stdout)
    assert stored["spec"]["resources"] == GOOD_RESOURCES
    assert stored["spec"]["sharedMemory"] == "16Gi"


def test_defaults_pass_the_rules(kubectl, crd, namespace):
    # The default sharedMemory (2Gi) goes through the same rule as a written one.
    proc = apply(kubectl, namespace, "plain")
    assert proc.returncode == 0, proc.stderr


def test_kubectl_scale_past_the_replica_bound_is_refused(kubectl, crd, namespace):
    assert apply(kubectl, namespace, "scaled").returncode == 0
    proc = kubectl(
        "scale", "-n", namespace, "tj/scaled", f"--replicas={MAX_REPLICAS + 1}", check=False
    )
    assert "spec.replicas" in refused(proc)


QUANTITIES = [
    "500m", "1.5", "12Gi", "4", "0", "1e3", "1E-3", ".5", "5.", "+1", "100u", "3n", "2E", "1Ei",
    "abc", "12 gigs", "12GB", "1K", "1ki", "1e", "1e1.5", " 1", "--1", ".", "1.2.3", "1Gi1",
    "0x10", "-1", "-1Gi",
    # Kubernetes' parser lets the digits go missing (these are 0), mostly:
    "Gi", "-", ".5Gi", "1.G", "1e-20", "Ei", "-.e-20", "1e99999999999999999999",
]  # fmt: skip


def test_the_parser_and_the_api_server_agree_on_what_a_quantity_is(kubectl, crd, namespace):
    """The parser's own grammar (for objects stored before the rules) against CEL's
    isQuantity, which is Kubernetes' own parser."""
    disagree = []
    for text in QUANTITIES:
        proc = apply(kubectl, namespace, "q", "--dry-run=server",
                     resources={"requests": {"cpu": text}})  # fmt: skip
        parsed = parse_quantity(text)
        ours = parsed is not None and parsed >= 0
        if (proc.returncode == 0) != ours:
            disagree.append((text, proc.returncode == 0, ours, proc.stderr.strip()))
    assert not disagree, disagree


# PodSpec fields spec.template leaves out (see the CRD): not settable at creation, an old
# name of serviceAccountName, and what admission derives from priorityClassName.
NOT_IN_TEMPLATE = {"ephemeralContainers", "serviceAccount", "priority"}


def test_the_templates_fields_are_the_served_kubernetes_pod_fields(kubectl, crd):
    """spec.template is closed at its top (a misspelt field is refused) and open within each
    field: its field names must follow the Kubernetes it runs on, or a new field could not be
    written."""
    served = json.loads(kubectl("get", "--raw", "/openapi/v3/api/v1").stdout)
    schemas = served["components"]["schemas"]
    crd = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    ours = crd["properties"]["spec"]["properties"]["template"]["properties"]["spec"]
    fields = ours["properties"]
    assert set(fields) == set(schemas["io.k8s.api.core.v1.PodSpec"]["properties"]) - NOT_IN_TEMPLATE
    container = fields["containers"]["items"]["properties"]
    assert set(container) == set(schemas["io.k8s.api.core.v1.Container"]["properties"])
    assert fields["initContainers"]["items"]["properties"] == container
    explain = kubectl("explain", "trainingjob.spec.template").stdout
    assert "Joule owns" in explain and "restartPolicy" in explain


def test_the_crd_keeps_its_rules_once_applied(kubectl, crd):
    """The API server accepted the CRD with its rules (a rule over its cost budget would have
    refused the whole CRD) and kept them (nothing was pruned)."""
    served = json.loads(kubectl("get", "crd", "trainingjobs.joule.dev", "-o", "json").stdout)
    ours = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema = served["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema["x-kubernetes-validations"] == ours["x-kubernetes-validations"]
    requests = schema["properties"]["spec"]["properties"]["resources"]["properties"]["requests"]
    assert requests["additionalProperties"]["x-kubernetes-validations"]


def without_name_rules(crd: dict[str, Any]) -> dict[str, Any]:
    old = copy.deepcopy(crd)
    schema = old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["x-kubernetes-validations"] = [
        r for r in schema["x-kubernetes-validations"] if "metadata.name" not in r["rule"]
    ]
    return old


@pytest.fixture
def restore_crd(kubectl, crd, namespace) -> Iterator[Callable[[], None]]:
    """Puts the CRD as it was before the name rules in place, and yields what brings the real
    one back (done again on teardown, whatever the test did). Tests run one at a time, so
    no other test sees the swap."""
    current = yaml.safe_load(CRD.read_text())

    def accepted(name: str) -> bool:
        return apply(kubectl, namespace, name, "--dry-run=server").returncode == 0

    def restore() -> None:
        kubectl("apply", "-f", "-", stdin=yaml.safe_dump(current))
        wait_for(lambda: not accepted("7b-probe"), what="the CRD with its name rules again")

    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(without_name_rules(current)))
    try:
        wait_for(lambda: accepted("7b-probe"), what="the CRD without its name rules")
        yield restore
    finally:
        restore()


def test_a_job_named_before_the_rules_can_still_be_updated_and_deleted(
    kubectl, restore_crd, namespace
):
    """The name rules run on create only: a job stored before them must still take the
    operator's status (InvalidSpec), labels, finalizers and its deletion."""
    name = "7b-" + "x" * 60
    # Suspended: an operator running in the same session would try to make its pods.
    assert apply(kubectl, namespace, name, suspend=True).returncode == 0
    restore_crd()
    ref = ["-n", namespace, f"tj/{name}"]
    status = {"status": {"phase": "Failed", "reason": "InvalidSpec", "message": "bad name"}}
    kubectl("patch", *ref, "--subresource=status", "--type=merge", "-p", json.dumps(status))
    kubectl("label", *ref, "team=a")
    kubectl("patch", *ref, "--type=merge", "-p", '{"metadata":{"finalizers":["example.com/x"]}}')
    kubectl("patch", *ref, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    kubectl("delete", *ref, "--wait=true", "--timeout=30s")
