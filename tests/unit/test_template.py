"""spec.template: what the flat spec lacks comes through into every worker, merged under the pod
Joule builds; what Joule owns does not move, and the parser refuses it as the CRD does."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from joule.api import JobRef, SpecError, TrainingJobSpec
from joule.api import template as owned
from joule.builders import worker_pod
from joule.builders.template import merge_template, placement
from joule.constants import LABEL_INDEX, LABEL_JOB, LABEL_MANAGED_BY

JOB = JobRef("llm", "team-a", "uid-123")
ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "joule.dev_trainingjobs.yaml"
SPREAD = {
    "maxSkew": 1,
    "topologyKey": "kubernetes.io/hostname",
    "whenUnsatisfiable": "DoNotSchedule",
    "labelSelector": {"matchLabels": {LABEL_JOB: "llm"}},
}


def pod(template: dict[str, Any], index: int = 0, **flat: Any) -> dict[str, Any]:
    spec = TrainingJobSpec.parse({"image": "trainer:1", "template": template, **flat})
    return worker_pod(JOB, spec, index)


def container(p: dict[str, Any], name: str = "trainer") -> dict[str, Any]:
    return next(c for c in p["spec"]["containers"] if c["name"] == name)


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_init_containers_and_sidecars_come_through_after_the_trainer():
    fetch = {"name": "fetch", "image": "busybox", "command": ["sh", "-c", "cp -r /src /data"]}
    native = {"name": "proxy", "image": "envoy", "restartPolicy": "Always"}
    shipper = {"name": "logs", "image": "fluent-bit", "securityContext": {"runAsUser": 0}}
    p = pod({"spec": {"initContainers": [fetch, native], "containers": [shipper]}})
    assert p["spec"]["initContainers"] == [fetch, native]
    assert [c["name"] for c in p["spec"]["containers"]] == ["trainer", "logs"]
    # A sidecar keeps what the template says: Joule's restricted defaults are the trainer's.
    assert container(p, "logs") == shipper
    assert container(p)["securityContext"]["allowPrivilegeEscalation"] is False
    # kubectl logs and exec pick the trainer among several containers.
    assert p["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "trainer"
    assert "kubectl.kubernetes.io/default-container" not in pod({})["metadata"]["annotations"]


def test_pod_fields_the_flat_spec_lacks_come_through():
    fields = {
        "topologySpreadConstraints": [SPREAD],
        "runtimeClassName": "gvisor",
        "dnsConfig": {"options": [{"name": "ndots", "value": "1"}]},
        "schedulingGates": [{"name": "example.com/quota"}],
        "hostAliases": [{"ip": "10.0.0.1", "hostnames": ["data"]}],
        "shareProcessNamespace": True,
    }
    p = pod({"spec": fields})
    assert {k: p["spec"][k] for k in fields} == fields


def test_the_trainers_template_goes_under_joules_env_mounts_and_ports_by_key():
    trainer = {
        "name": "trainer",
        "env": [
            {"name": "HF_HOME", "value": "/cache"},
            {"name": "LR", "value": "1e-3"},  # the flat spec's LR wins
            {"name": "PET_RDZV_ENDPOINT", "value": "evil:1"},  # Joule's wins
        ],
        "volumeMounts": [
            {"name": "cache", "mountPath": "/cache"},
            {"name": "cache", "mountPath": "/ckpt"},  # the flat spec's checkpoint mount wins
        ],
        "ports": [
            {"name": "debug", "containerPort": 5678},
            {"name": "metrics", "containerPort": 9100},  # the name is Joule's
            {"name": "mine", "containerPort": 29400},  # the port is Joule's
        ],
        "readinessProbe": {"httpGet": {"path": "/metrics", "port": 9090}},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "resources": {"requests": {"cpu": "4", "memory": "8Gi"}},
        "command": ["python", "-m", "mine"],
    }
    p = pod(
        {"spec": {"containers": [trainer], "volumes": [{"name": "cache", "emptyDir": {}}]}},
        env=[{"name": "LR", "value": "3e-4"}],
        resources={"requests": {"memory": "64Gi"}},
        volumes=[{"name": "ckpt", "emptyDir": {}}],
        checkpoint={"path": "/ckpt", "volume": "ckpt"},
        gpusPerReplica=2,
    )
    c = container(p)
    assert p["spec"]["containers"][0] is c and c["image"] == "trainer:1"
    values = env(c)
    assert values["HF_HOME"] == "/cache" and values["LR"] == "3e-4"
    assert values["PET_RDZV_ENDPOINT"] == "llm-worker-0.llm:29400"
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names))
    assert names.index("HF_HOME") < names.index("LR") < names.index("PET_NNODES")  # $(VAR)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/cache"] == "cache" and mounts["/ckpt"] == "ckpt"
    assert mounts["/dev/shm"] == "joule-dshm"
    assert len(mounts) == len(c["volumeMounts"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"rdzv": 29400, "metrics": 9090, "debug": 5678}
    assert c["readinessProbe"] == trainer["readinessProbe"]
    assert c["lifecycle"] == trainer["lifecycle"]
    assert c["command"] == ["python", "-m", "mine"]  # the flat spec has none
    assert c["resources"] == {
        "requests": {"cpu": "4", "memory": "64Gi"},
        "limits": {"nvidia.com/gpu": "2"},
    }
    assert {v["name"] for v in p["spec"]["volumes"]} == {"cache", "ckpt", "joule-dshm",
                                                         "joule-power"}  # fmt: skip
    # The flat spec's command, where it has one, wins.
    flat = pod({"spec": {"containers": [trainer]}}, command=["torchrun"])
    assert container(flat)["command"] == ["torchrun"]


def test_joule_owned_fields_do_not_move_even_where_the_crd_was_not_asked():
    """merge_template keeps Joule's values whatever the template says (the CRD and the parser
    refuse such a template; an object stored before them still cannot move these)."""
    ours = pod({})
    template = {
        "metadata": {"name": "x", "namespace": "elsewhere", "ownerReferences": [],
                     "labels": {LABEL_JOB: "other", LABEL_INDEX: "7", LABEL_MANAGED_BY: "me"}},
        "spec": {"restartPolicy": "Always", "hostname": "x", "subdomain": "y",
                 "containers": [{"name": "trainer", "image": "evil:1",
                                 "resources": {"limits": {"nvidia.com/gpu": "8"}}}],
                 "volumes": [{"name": "joule-dshm", "hostPath": {"path": "/"}}]},
    }  # fmt: skip
    merged = merge_template(ours, template)
    for key in ("name", "namespace", "ownerReferences", "labels"):
        assert merged["metadata"][key] == ours["metadata"][key]
    for key in ("restartPolicy", "hostname", "subdomain", "volumes"):
        assert merged["spec"][key] == ours["spec"][key]
    c = container(merged)
    assert c["image"] == "trainer:1" and c["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_labels_and_annotations_merge_under_the_flat_spec_and_joules():
    p = pod(
        {"metadata": {"labels": {"team": "a", "tier": "gold", LABEL_MANAGED_BY: "me"},
                      "annotations": {"note": "t", "owner": "t", "prometheus.io/port": "9100"}}},
        podLabels={"tier": "silver"},
        podAnnotations={"owner": "flat"},
        energy={"gpuPowerLimitWatts": 300},
    )  # fmt: skip
    labels, annotations = p["metadata"]["labels"], p["metadata"]["annotations"]
    assert labels["team"] == "a" and labels["tier"] == "silver"
    assert labels[LABEL_JOB] == "llm" and labels[LABEL_MANAGED_BY] == "joule"
    assert annotations["note"] == "t" and annotations["owner"] == "flat"
    # The scrape annotations are Joule's defaults: the template may change them.
    assert annotations["prometheus.io/port"] == "9100"
    assert annotations["joule.dev/gpu-power-limit-watts"] == "300"


def test_the_flat_spec_wins_over_the_template_entry_by_entry():
    p = pod(
        {"spec": {
            "nodeSelector": {"pool": "a", "zone": "z1"},
            "tolerations": [{"key": "spot", "operator": "Exists"},
                            {"key": "gpu", "operator": "Exists"}],
            "affinity": {"nodeAffinity": {"mine": 1}, "podAntiAffinity": {"mine": 2}},
            "volumes": [{"name": "data", "emptyDir": {}}, {"name": "extra", "emptyDir": {}}],
            "imagePullSecrets": [{"name": "a"}],
            "priorityClassName": "low",
            "securityContext": {"fsGroup": 100, "runAsUser": 1},
            "containers": [{"name": "trainer",
                            "securityContext": {"runAsUser": 5, "readOnlyRootFilesystem": True}}],
        }},
        nodeSelector={"pool": "b"},
        tolerations=[{"key": "gpu", "operator": "Exists"}],
        affinity={"nodeAffinity": {"flat": 1}},
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "d"}}],
        imagePullSecrets=[{"name": "b"}],
        priorityClassName="high",
        podSecurityContext={"runAsUser": 2},
        securityContext={"runAsUser": 1000},
    )  # fmt: skip
    s = p["spec"]
    assert s["nodeSelector"] == {"pool": "b", "zone": "z1"}
    # Every toleration applies, once (the node-lost ones are Joule's own, added to any).
    mine = [t for t in s["tolerations"] if not t["key"].startswith("node.kubernetes.io/")]
    assert mine == [{"key": "gpu", "operator": "Exists"}, {"key": "spot", "operator": "Exists"}]
    assert s["affinity"] == {"nodeAffinity": {"flat": 1}, "podAntiAffinity": {"mine": 2}}
    volumes = {v["name"]: v for v in s["volumes"]}
    assert "persistentVolumeClaim" in volumes["data"] and "extra" in volumes
    assert [x["name"] for x in s["imagePullSecrets"]] == ["b", "a"]
    assert s["priorityClassName"] == "high"
    # Joule's restricted defaults, then the template, then the flat spec, key by key.
    assert s["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"},
                                    "fsGroup": 100, "runAsUser": 2}  # fmt: skip
    assert container(p)["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsUser": 1000,
    }


def test_the_template_wins_over_joules_defaults():
    p = pod({"spec": {
        "terminationGracePeriodSeconds": 600,  # a long final checkpoint
        "enableServiceLinks": True,
        "securityContext": {"seccompProfile": {"type": "Localhost",
                                               "localhostProfile": "p.json"}},
        "containers": [{"name": "trainer", "terminationMessagePolicy": "File",
                        "securityContext": {"allowPrivilegeEscalation": True}}],
    }})  # fmt: skip
    assert p["spec"]["terminationGracePeriodSeconds"] == 600
    assert p["spec"]["enableServiceLinks"] is True
    assert p["spec"]["securityContext"]["seccompProfile"]["type"] == "Localhost"
    c = container(p)
    assert c["terminationMessagePolicy"] == "File"
    assert c["securityContext"]["allowPrivilegeEscalation"] is True
    plain = pod({})
    assert plain["spec"]["terminationGracePeriodSeconds"] == 60
    assert container(plain)["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_the_torchrun_rules_see_the_templates_env_too():
    p = pod({"spec": {"containers": [{"name": "trainer", "env": [
        {"name": "PET_MAX_RESTARTS", "value": "0"},
        {"name": "PET_RDZV_CONF", "value": "join_timeout=60"},
    ]}]}}, index=1)  # fmt: skip
    values = env(container(p))
    assert values["PET_MAX_RESTARTS"] == "0"
    assert values["PET_RDZV_CONF"] == "join_timeout=60,is_host=false"


def test_no_template_leaves_the_pod_as_it_was():
    spec = TrainingJobSpec.parse({"image": "trainer:1", "replicas": 2})
    plain = worker_pod(JOB, spec, 1)
    assert merge_template(plain, None) is plain
    assert pod({}, 1, replicas=2) == plain
    assert pod({"metadata": {}, "spec": {}}, 1, replicas=2) == plain


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ({"metadata": {"name": "x"}}, owned.OWNED_METADATA["name"]),
        ({"metadata": {"namespace": "x"}}, owned.OWNED_METADATA["namespace"]),
        ({"metadata": {"ownerReferences": []}}, owned.OWNED_METADATA["ownerReferences"]),
        ({"metadata": {"labels": {"joule.dev/job-name": "x"}}}, owned.LABELS),
        ({"metadata": {"annotations": {"joule.dev/gpu-power-limit-watts": "1"}}},
         owned.ANNOTATIONS),
        *[({"spec": {key: "x"}}, message) for key, message in owned.OWNED_SPEC.items()],
        ({"spec": {"containers": [{"image": "x"}]}}, "name is required"),
        ({"spec": {"containers": [{"name": "logs"}]}}, owned.SIDECAR_IMAGE),
        ({"spec": {"containers": [{"name": "trainer", "image": "x"}]}}, owned.TRAINER_IMAGE),
        ({"spec": {"containers": [{"name": "trainer",
                                   "resources": {"requests": {"nvidia.com/gpu": 1}}}]}},
         owned.TRAINER_GPUS),
        ({"spec": {"containers": [{"name": "trainer", "restartPolicyRules": []}]}},
         owned.TRAINER_RESTARTS),
        ({"spec": {"containers": [{"name": "trainer", "volumeMounts": [
            {"name": "x", "mountPath": "/etc/joule"}]}]}}, owned.TRAINER_MOUNTS),
        ({"spec": {"initContainers": [{"name": "trainer", "image": "x"}]}}, owned.INIT_NAME),
        ({"spec": {"volumes": [{"name": "joule-power"}]}}, owned.VOLUMES),
        ("a pod", "must be an object"),
    ],
)  # fmt: skip
def test_the_parser_refuses_what_joule_owns(template, message):
    with pytest.raises(SpecError) as exc:
        TrainingJobSpec.parse({"image": "x", "template": template})
    assert message in str(exc.value)


def template_rules(schema: dict[str, Any]) -> list[str]:
    found = [r["message"] for r in schema.get("x-kubernetes-validations") or []]
    for sub in (schema.get("properties") or {}).values():
        found += template_rules(sub)
    if "items" in schema:
        found += template_rules(schema["items"])
    return found


def test_the_crds_messages_are_the_parsers():
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    crd_messages = set(template_rules(spec["properties"]["template"]))
    # The label-key rule is the one spec.nodeSelector and podLabels have too.
    crd_messages -= set(template_rules(spec["properties"]["nodeSelector"]))
    ours = {
        *owned.OWNED_METADATA.values(), *owned.OWNED_SPEC.values(), owned.LABELS,
        owned.ANNOTATIONS, owned.TRAINER_IMAGE, owned.SIDECAR_IMAGE, owned.TRAINER_GPUS,
        owned.TRAINER_RESTARTS, owned.TRAINER_MOUNTS, owned.INIT_NAME, owned.VOLUMES,
    }  # fmt: skip
    assert crd_messages == ours


@pytest.mark.parametrize(
    ("template", "flat"),
    [
        ({}, {}),
        ({"spec": {"nodeSelector": {"pool": "a"}}}, {}),
        ({"spec": {"tolerations": [{"key": "spot", "operator": "Exists"}]}},
         {"tolerations": [{"key": "gpu", "operator": "Exists"}]}),
        ({"spec": {"nodeSelector": {"pool": "a", "zone": "z1"},
                   "tolerations": [{"key": "gpu", "operator": "Exists"}]}},
         {"nodeSelector": {"pool": "b"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]}),
    ],
)  # fmt: skip
def test_the_room_is_counted_where_the_workers_can_go(template, flat):
    """The autoscaler counts free GPUs on the nodes the worker pod can use: the same
    nodeSelector and tolerations as the pod Joule creates, template included."""
    spec = TrainingJobSpec.parse({"image": "trainer:1", "template": template, **flat})
    s = worker_pod(JOB, spec, 0)["spec"]
    selector, tolerations = placement(spec.pod)
    assert selector == s.get("nodeSelector", {})
    lost = [t for t in s["tolerations"] if t["key"].startswith("node.kubernetes.io/")]
    assert tolerations == [t for t in s["tolerations"] if t not in lost]
