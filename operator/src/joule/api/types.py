"""The TrainingJob spec as a typed value, and its phases.

The CRD schema and its CEL rules reject bad input at `kubectl apply`; ``TrainingJobSpec.parse``
checks the same things again (and applies the same defaults) so that the operator never acts
on a spec the API server would not have accepted, for example one stored before a CRD upgrade.
The limits below are the CRD's own; tests/unit/test_crd_spec.py reads the CRD and checks that
each one agrees, so neither can change alone.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from joule.api.scaling import (
    Energy,
    JobPolicySpec,
    OnBudgetExhausted,
    Policy,
    Scaling,
    Target,
)
from joule.api.template import template_problem

if TYPE_CHECKING:
    from joule.api.data import DataSpec
    from joule.api.privacy import Privacy


class Phase(enum.StrEnum):
    """Where a job is. Transitions:

    Pending -> Starting -> Running <-> Resizing; any of these -> Suspended -> Pending;
    any non-terminal -> Succeeded | Failed. Succeeded and Failed are final. A startup timeout
    takes Starting back to Pending (pods released) until backoffLimit is spent.
    """

    PENDING = "Pending"
    STARTING = "Starting"
    RUNNING = "Running"
    RESIZING = "Resizing"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class CleanPodPolicy(enum.StrEnum):
    ALL = "All"
    RUNNING = "Running"
    NONE = "None"


class SpecError(ValueError):
    """The spec is invalid; the message names the field."""


# Most worker pods a job may have (spec.replicas and spec.elastic's maximum).
MAX_REPLICAS = 1024
# The job's name is its headless Service's name (a DNS-1035 label) and the stem of its pods'
# names and hostnames, <name>-worker-<index> (DNS-1123 labels): with index up to
# MAX_REPLICAS - 1 = 1023, the longest is <name>-worker-1023, 12 characters more than the name,
# and a label has 63 at most.
MAX_NAME_LENGTH = 51
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Bounds on resources.requests/limits, which also keep the CRD's CEL rules over these maps
# within the API server's cost budget.
MAX_RESOURCES = 16
MAX_QUANTITY_LENGTH = 64
# The largest user or group ID a pod may run as.
MAX_ID = 2**31 - 1


@dataclass(frozen=True)
class IntField:
    """Bounds and default of one integer field, as in the CRD schema."""

    minimum: int
    maximum: int | None = None
    default: int | None = None


INT_FIELDS: dict[str, IntField] = {
    "spec.replicas": IntField(1, MAX_REPLICAS, 1),
    "spec.elastic.minReplicas": IntField(1, MAX_REPLICAS),
    "spec.elastic.maxReplicas": IntField(1, MAX_REPLICAS),
    "spec.gpusPerReplica": IntField(0, 64, 1),
    "spec.backoffLimit": IntField(0, None, 3),
    "spec.activeDeadlineSeconds": IntField(1),
    "spec.ttlSecondsAfterFinished": IntField(0),
    "spec.startupTimeoutSeconds": IntField(1, None, 300),
    "spec.restartBackoffSeconds": IntField(0, 3600, 10),
    "spec.nodeLostTimeoutSeconds": IntField(0, 3600, 60),
    "spec.scaling.evaluationIntervalSeconds": IntField(5, 3600, 30),
    "spec.scaling.cooldownSeconds": IntField(0, 86400, 120),
    "spec.scaling.minGainPercent": IntField(1, 100, 5),
    "spec.energy.powerCapWatts": IntField(1),
    "spec.energy.windowSeconds": IntField(10, 86400, 300),
    "spec.energy.gpuPowerLimitWatts": IntField(1),
    "spec.energy.minGpuPowerLimitWatts": IntField(1),
    "spec.target.samples": IntField(1),
    "spec.progress.port": IntField(1, 65535),
    # A minute at least: a shorter quiet spell (a checkpoint, an evaluation) is no hang.
    "spec.progress.hangTimeoutSeconds": IntField(60),
    # User and group IDs, bounded as the pod's validation bounds them. The parser copies the
    # security contexts into the pods as they are and does not read these.
    **{
        f"spec.{context}.{key}": IntField(0, MAX_ID)
        for context, keys in (
            ("securityContext", ("runAsUser", "runAsGroup")),
            ("podSecurityContext", ("runAsUser", "runAsGroup", "fsGroup")),
        )
        for key in keys
    },
}


def check_name(name: str) -> None:
    """Refuse a job name its Service or worker pods could not carry (see MAX_NAME_LENGTH)."""
    if len(name) > MAX_NAME_LENGTH:
        raise SpecError(
            f"metadata.name must be at most {MAX_NAME_LENGTH} characters, not {len(name)}: "
            f"worker pods are named <name>-worker-<index> (index up to {MAX_REPLICAS - 1}), "
            "and a pod's hostname must fit 63"
        )
    if not re.fullmatch(NAME_PATTERN, name):
        raise SpecError(
            f"metadata.name {name!r} must be a DNS-1035 label: lowercase letters, digits and "
            "'-', starting with a letter and ending with a letter or digit"
        )


@dataclass(frozen=True)
class TrainingJobSpec:
    image: str
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    gpus_per_replica: int = 1
    backoff_limit: int = 3
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None
    clean_pod_policy: CleanPodPolicy = CleanPodPolicy.RUNNING
    suspend: bool = False
    startup_timeout_seconds: int = 300
    # The wait before a failed worker's replacement, doubled with each restart (see
    # reconcile.restart_delay); 0 replaces at once.
    restart_backoff_seconds: int = 10
    # How long a worker stays on a node that is unreachable or NotReady before it is evicted
    # (its tolerationSeconds for those taints; the cluster's default is 300).
    node_lost_timeout_seconds: int = 60
    scaling: Scaling = field(default_factory=Scaling)
    energy: Energy = field(default_factory=Energy)
    target: Target = field(default_factory=Target)
    progress: Progress = field(default_factory=lambda: Progress())
    tensorboard: Tensorboard = field(default_factory=lambda: Tensorboard())
    # spec.checkpoint.encryption: the Secret key the workers' checkpoints are encrypted with.
    encryption: Encryption | None = None
    # spec.data: the dataset staged into a cache volume before the workers start.
    data: DataSpec | None = None
    # spec.privacy: differential privacy in Joule's trainer.
    privacy: Privacy | None = None
    # Parts copied into the pod as they are (the API server validated their shape).
    pod: dict[str, Any] = field(default_factory=dict)

    @property
    def elastic(self) -> bool:
        return self.min_replicas is not None

    @property
    def bounds(self) -> tuple[int, int]:
        """The (min, max) worker count; a non-elastic job is fixed at its replicas."""
        if self.min_replicas is None or self.max_replicas is None:
            return self.replicas, self.replicas
        return self.min_replicas, self.max_replicas

    @property
    def managed(self) -> bool:
        """Whether the operator measures and decides for this job (a policy or energy limits)."""
        e = self.energy
        return self.scaling.policy != Policy.FIXED or (
            e.power_cap_watts is not None or e.budget_joules is not None
        )

    def policy_spec(self) -> JobPolicySpec:
        low, high = self.bounds
        return JobPolicySpec(
            low, high, self.gpus_per_replica, self.scaling, self.energy, self.target
        )

    @property
    def nproc_per_node(self) -> int:
        return max(self.gpus_per_replica, 1)

    @classmethod
    def parse(cls, spec: dict[str, Any], name: str | None = None) -> TrainingJobSpec:
        """``name``: the job's metadata.name, checked too where given (the CRD checks it at
        create time only, so a job created before that rule reaches the operator as it is)."""
        from joule.api.data import parse_data  # they build on this module's names
        from joule.api.privacy import parse_privacy

        if name is not None:
            check_name(name)
        image = spec.get("image")
        if not isinstance(image, str) or not image:
            raise SpecError("spec.image is required")
        replicas = _int(spec, "spec.replicas")
        elastic = spec.get("elastic")
        min_r = max_r = None
        if elastic is not None:
            min_r = _int(elastic, "spec.elastic.minReplicas")
            max_r = _int(elastic, "spec.elastic.maxReplicas")
            if min_r is None or max_r is None:
                raise SpecError("spec.elastic needs minReplicas and maxReplicas")
            if min_r > max_r:
                raise SpecError("elastic.minReplicas must be less than or equal to maxReplicas")
            if not min_r <= replicas <= max_r:
                raise SpecError("replicas must lie within [elastic.minReplicas, maxReplicas]")
        policy = spec.get("cleanPodPolicy", CleanPodPolicy.RUNNING.value)
        try:
            clean = CleanPodPolicy(policy)
        except ValueError:
            raise SpecError(
                f"spec.cleanPodPolicy must be All, Running or None, not {policy!r}"
            ) from None
        pod_keys = (
            "command", "args", "env", "envFrom", "workingDir", "imagePullPolicy",
            "imagePullSecrets", "resources", "sharedMemory", "volumes", "volumeMounts",
            "checkpoint", "nodeSelector", "tolerations", "affinity", "priorityClassName",
            "schedulerName", "serviceAccountName", "podLabels", "podAnnotations",
            "securityContext", "podSecurityContext", "template",
        )  # fmt: skip
        _resources(spec.get("resources") or {})
        if (problem := template_problem(spec.get("template"))) is not None:
            raise SpecError(problem)
        if "sharedMemory" in spec:
            _quantity(spec["sharedMemory"], "spec.sharedMemory", positive=True)
        scaling = _scaling(spec.get("scaling") or {}, elastic is not None)
        energy = _energy(spec.get("energy") or {})
        reason_to_lower = (
            energy.power_cap_watts is not None
            or energy.budget_joules is not None
            or scaling.policy == Policy.ENERGY_EFFICIENT
        )
        if energy.min_gpu_power_limit_watts is not None and not reason_to_lower:
            raise SpecError(
                "energy.minGpuPowerLimitWatts needs powerCapWatts, budget or scaling.policy "
                "EnergyEfficient (a reason to lower the limit)"
            )
        data = parse_data(spec.get("data"))
        if data is not None and not any(
            isinstance(v, dict) and v.get("name") == data.volume for v in spec.get("volumes") or []
        ):
            raise SpecError("data.volume must name one of spec.volumes")
        return cls(
            image=image,
            replicas=replicas,
            min_replicas=min_r,
            max_replicas=max_r,
            gpus_per_replica=_int(spec, "spec.gpusPerReplica"),
            backoff_limit=_int(spec, "spec.backoffLimit"),
            active_deadline_seconds=_int(spec, "spec.activeDeadlineSeconds"),
            ttl_seconds_after_finished=_int(spec, "spec.ttlSecondsAfterFinished"),
            clean_pod_policy=clean,
            suspend=bool(spec.get("suspend", False)),
            startup_timeout_seconds=_int(spec, "spec.startupTimeoutSeconds"),
            restart_backoff_seconds=_int(spec, "spec.restartBackoffSeconds"),
            node_lost_timeout_seconds=_int(spec, "spec.nodeLostTimeoutSeconds"),
            scaling=scaling,
            energy=energy,
            target=_target(spec.get("target") or {}),
            progress=_progress(spec.get("progress")),
            tensorboard=_tensorboard(spec.get("tensorboard"), spec.get("checkpoint")),
            encryption=_encryption(spec.get("checkpoint")),
            data=data,
            privacy=parse_privacy(spec.get("privacy")),
            pod={k: spec[k] for k in pod_keys if k in spec},
        )


def _int(data: dict[str, Any], path: str) -> Any:
    """The integer field at ``path`` (a key of INT_FIELDS) of ``data``, its parent object."""
    bounds = INT_FIELDS[path]
    value = data.get(path.rpartition(".")[2], bounds.default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path} must be an integer, got {value!r}")
    if value < bounds.minimum:
        raise SpecError(f"{path} must be >= {bounds.minimum}, got {value}")
    if bounds.maximum is not None and value > bounds.maximum:
        raise SpecError(f"{path} must be <= {bounds.maximum}, got {value}")
    return value


# Kubernetes' quantity grammar, as k8s.io/apimachinery's resource.ParseQuantity (CEL's
# isQuantity) reads it: a signed decimal number, then a binary-SI suffix, a decimal-SI suffix
# or a decimal exponent. ParseQuantity lets the digits go missing ("Gi", "." and "-" are 0).
_QUANTITY = re.compile(
    r"(?P<number>[+-]?[0-9]*(?:\.[0-9]*)?)"
    r"(?:(?P<binary>Ki|Mi|Gi|Ti|Pi|Ei)|(?P<decimal>[numkMGTPE])|[eE](?P<exponent>[+-]?[0-9]+))?"
)
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def parse_quantity(value: Any) -> Decimal | None:
    """The value of a Kubernetes quantity ("500m", "1.5", "12Gi", 4), or None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if not isinstance(value, str) or not value or len(value) > MAX_QUANTITY_LENGTH:
        return None
    m = _QUANTITY.fullmatch(value)
    if not m:
        return None
    text = m["number"]
    digits = any(c.isdigit() for c in text)
    number = Decimal(text) if digits else Decimal(0)
    binary = m["binary"]
    exponent = _DECIMAL[m["decimal"]] if m["decimal"] else int(m["exponent"] or 0)
    if not digits and (binary in ("Pi", "Ei") or exponent < -9):
        return None  # ParseQuantity's slow path, taken for these, finds no number to read
    if not -(2**63) <= exponent < 2**63:
        return None  # nor does it take an exponent beyond int64
    if binary:
        return number * 2 ** _BINARY[binary]
    # Beyond 10^±1000 no comparison this is used for changes (Decimal's own range is smaller).
    return number.scaleb(max(-1000, min(1000, exponent)))


def _quantity(value: Any, path: str, positive: bool = False) -> Decimal:
    q = parse_quantity(value)
    if q is None or q < 0 or (positive and q == 0):
        sign = "positive" if positive else "non-negative"
        raise SpecError(
            f"{path} must be a {sign} quantity such as 500m, 1.5, 4 or 12Gi "
            f"(at most {MAX_QUANTITY_LENGTH} characters), not {value!r}"
        )
    return q


def _resources(resources: dict[str, Any]) -> None:
    """What the pod's validation would refuse, refused here (as the CRD does) instead."""
    found: dict[str, dict[str, Decimal]] = {}
    for kind in ("requests", "limits"):
        values = resources.get(kind) or {}
        if len(values) > MAX_RESOURCES:
            raise SpecError(f"spec.resources.{kind} may name at most {MAX_RESOURCES} resources")
        if "nvidia.com/gpu" in values:
            raise SpecError("set GPUs with spec.gpusPerReplica, not in resources")
        found[kind] = {
            name: _quantity(q, f"spec.resources.{kind}[{name}]") for name, q in values.items()
        }
    for name, request in found["requests"].items():
        limit = found["limits"].get(name)
        if limit is not None and request > limit:
            raise SpecError(
                f"spec.resources.requests[{name}] must not be more than its limit "
                f"({resources['requests'][name]} > {resources['limits'][name]})"
            )


@dataclass(frozen=True)
class JobRef:
    """Identity of a TrainingJob: enough to name, label and own its children."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> JobRef:
        meta = body["metadata"]
        return cls(meta["name"], meta["namespace"], meta["uid"])


ENERGY_UNITS = {"J": 1.0, "kJ": 1e3, "MJ": 1e6, "GJ": 1e9, "Wh": 3600.0, "kWh": 3.6e6, "MWh": 3.6e9}


def parse_energy(value: Any) -> float:
    """Joules from a number or a quantity such as "250kWh", "5MJ", "800Wh"."""
    if isinstance(value, bool):
        raise SpecError(f"spec.energy.budget must be an energy, not {value!r}")
    if isinstance(value, int | float):
        joules = float(value)
    else:
        m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(J|kJ|MJ|GJ|Wh|kWh|MWh)", str(value).strip())
        if not m:
            raise SpecError(
                f"spec.energy.budget {value!r}: use joules or a quantity like 250kWh, 5MJ, 800Wh"
            )
        joules = float(m.group(1)) * ENERGY_UNITS[m.group(2)]
    if joules <= 0:
        raise SpecError("spec.energy.budget must be positive")
    return joules


def _choice(enum_type: type[enum.StrEnum], value: Any, path: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum_type)  # type: ignore[attr-defined]
        raise SpecError(f"{path} must be one of {allowed}, not {value!r}") from None


def _scaling(d: dict[str, Any], elastic: bool) -> Scaling:
    policy = _choice(Policy, d.get("policy", "Fixed"), "spec.scaling.policy")
    if policy != Policy.FIXED and not elastic:
        raise SpecError(f"scaling.policy {policy.value} needs spec.elastic bounds to scale within")
    p = "spec.scaling."
    return Scaling(
        policy=policy,
        evaluation_interval_seconds=float(_int(d, p + "evaluationIntervalSeconds")),
        cooldown_seconds=float(_int(d, p + "cooldownSeconds")),
        min_gain=_int(d, p + "minGainPercent") / 100,
    )


def _energy(d: dict[str, Any]) -> Energy:
    p = "spec.energy."
    cap = _int(d, p + "powerCapWatts")
    limit, floor = _watts(d, "gpuPowerLimitWatts"), _watts(d, "minGpuPowerLimitWatts")
    if floor is not None and limit is not None and floor > limit:
        raise SpecError(f"{p}minGpuPowerLimitWatts must not be above gpuPowerLimitWatts")

    return Energy(
        power_cap_watts=float(cap) if cap is not None else None,
        window_seconds=float(_int(d, p + "windowSeconds")),
        budget_joules=parse_energy(d["budget"]) if "budget" in d else None,
        on_budget_exhausted=_choice(
            OnBudgetExhausted, d.get("onBudgetExhausted", "Suspend"), p + "onBudgetExhausted"
        ),
        gpu_power_limit_watts=_watts(d, "gpuPowerLimitWatts"),
        min_gpu_power_limit_watts=floor,
    )


def _watts(d: dict[str, Any], key: str) -> float | None:
    value = _int(d, "spec.energy." + key)
    return float(value) if value is not None else None


@dataclass(frozen=True)
class Progress:
    """Where workers report the samples they trained: joule_trainer's series (the default),
    or a counter the user's script serves, named in spec.progress; and how long that count
    may stand still before the workers count as hung (see ``joule.hang``)."""

    samples_metric: str | None = None
    port: int | None = None  # one /metrics per pod; None: 9090 + local rank per process
    hang_timeout_seconds: int | None = None  # None: no hang detection

    @property
    def metric(self) -> str:
        """The counter of samples the operator reads, as a message names it."""
        return self.samples_metric or "joule_trainer_samples_total"


@dataclass(frozen=True)
class Tensorboard:
    """A TensorBoard for the job: a Deployment and Service that read the event files the
    workers write under the checkpoint volume (``log_dir``)."""

    enabled: bool = False
    image: str | None = None  # None: the job's image
    log_dir: str = ""  # <checkpoint.path>/tensorboard, where enabled


def _tensorboard(d: Any, checkpoint: Any) -> Tensorboard:
    if not isinstance(d, dict) or not d.get("enabled"):
        return Tensorboard()
    if not isinstance(checkpoint, dict) or not checkpoint.get("volume"):
        raise SpecError(
            "spec.tensorboard needs spec.checkpoint.volume: TensorBoard reads the workers' "
            "event files from the job's checkpoint volume"
        )
    image = d.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise SpecError(f"spec.tensorboard.image must be an image name, not {image!r}")
    return Tensorboard(True, image, f"{str(checkpoint['path']).rstrip('/')}/tensorboard")


@dataclass(frozen=True)
class Encryption:
    """spec.checkpoint.encryption.secretRef: the key of a Secret in the job's namespace that
    holds the checkpoint key. The operator only names it in the worker pods (a ``secret``
    volume of that one key); it never reads the Secret."""

    secret_name: str
    key: str


# A Secret's name (a DNS-1123 subdomain) and a key of its data, as Kubernetes validates them.
SECRET_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
SECRET_KEY = r"[-._a-zA-Z0-9]+"
MAX_SECRET_NAME = 253


def _encryption(checkpoint: Any) -> Encryption | None:
    if not isinstance(checkpoint, dict) or checkpoint.get("encryption") is None:
        return None
    ref = (
        checkpoint["encryption"].get("secretRef")
        if isinstance(checkpoint["encryption"], dict)
        else None
    )
    if not isinstance(ref, dict):
        raise SpecError("spec.checkpoint.encryption needs secretRef: {name, key}")
    name, key = ref.get("name"), ref.get("key")
    if (
        not isinstance(name, str)
        or len(name) > MAX_SECRET_NAME
        or not re.fullmatch(SECRET_NAME, name)
    ):
        raise SpecError(
            "spec.checkpoint.encryption.secretRef.name must be a Secret's name (a DNS-1123 "
            f"subdomain), not {name!r}"
        )
    if (
        not isinstance(key, str)
        or len(key) > MAX_SECRET_NAME
        or not re.fullmatch(SECRET_KEY, key)
        or key == "."
        or key.startswith("..")
    ):
        raise SpecError(
            "spec.checkpoint.encryption.secretRef.key must be a Secret's key: letters, digits, "
            f"'-', '_' and '.', and neither '.' nor starting with '..', not {key!r}"
        )
    return Encryption(name, key)


METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


def _progress(d: Any) -> Progress:
    if d is None:
        return Progress()
    if not isinstance(d, dict):
        raise SpecError(f"spec.progress must be an object, not {d!r}")
    # Absent: joule_trainer's own counter (its trainer and joule_trainer.report serve it).
    name = d.get("samplesMetric")
    if name is not None and (
        not isinstance(name, str) or not re.fullmatch(METRIC_NAME, name) or len(name) > 200
    ):
        raise SpecError(
            f"spec.progress.samplesMetric must be a Prometheus metric name, not {name!r}"
        )
    return Progress(
        name, _int(d, "spec.progress.port"), _int(d, "spec.progress.hangTimeoutSeconds")
    )


def _target(d: dict[str, Any]) -> Target:
    deadline = None
    if d.get("deadline"):
        try:
            # RFC 3339 (and the API server's date-time) allows a lowercase t and z.
            text = str(d["deadline"]).upper().replace("Z", "+00:00")
            deadline = dt.datetime.fromisoformat(text)
        except ValueError:
            raise SpecError(f"spec.target.deadline {d['deadline']!r} is not RFC 3339") from None
        if deadline.tzinfo is None:
            deadline = deadline.replace(tzinfo=dt.UTC)
    samples = _int(d, "spec.target.samples")
    return Target(samples=float(samples) if samples is not None else None, deadline=deadline)
