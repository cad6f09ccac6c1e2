"""Operator settings, read once from ``JOULE_*`` environment variables (the Helm chart sets
them); a bad value stops the operator at start with a message naming the variable."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Where a pod finds its own namespace; the lease lives there unless JOULE_LEASE_NAMESPACE says.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class OperatorConfig:
    # Namespaces to watch (JOULE_WATCH_NAMESPACES, comma-separated); empty: the whole cluster.
    namespaces: tuple[str, ...] = ()
    # Every job is reconciled at least this often even when nothing happens (seconds).
    resync_seconds: float = 30.0
    # How often due timers (startup timeout, deadline, TTL) are checked (seconds).
    tick_seconds: float = 2.0
    # Port of the operator's own /metrics; 0 turns it off.
    metrics_port: int = 8080
    # Threads reconciling different jobs at once.
    workers: int = 16
    # "json" for structured logs (one JSON object a line), "plain" for people.
    log_format: str = "json"
    # Port of /healthz (liveness) and /readyz (readiness); 0 turns it off.
    health_port: int = 8081
    # Take a coordination.k8s.io Lease before reconciling, so that only one of several
    # replicas acts. Off for a single `joule operator` run by hand; the chart turns it on.
    leader_elect: bool = False
    # The Lease's name and namespace (the namespace defaults to the pod's own).
    lease_name: str = "joule-operator"
    lease_namespace: str = "default"
    # This replica's name in the Lease (holderIdentity); empty: "<hostname>-<pid>".
    identity: str = ""
    # client-go's defaults scaled down, as controller-runtime's are: a standby takes over a
    # lease not renewed for lease_duration; the leader gives up (exits) when it could not
    # renew for renew_deadline; both retry every retry_period (seconds).
    lease_duration_seconds: int = 8
    renew_deadline_seconds: float = 6.0
    retry_period_seconds: float = 1.0
    # Where jobs' energy comes from (JOULE_JOB_ENERGY_SOURCE): "node", the node agents'
    # readings of each pod's GPUs; or "trainer", what Joule's trainer reports of itself.
    energy_source: str = "node"
    # Where the node agents run (namespace: the operator's own unless set), and their port.
    node_agent_namespace: str = "default"
    node_agent_selector: str = "app.kubernetes.io/name=joule,app.kubernetes.io/component=node-agent"
    node_agent_port: int = 9410
    # Whether node agents run (they set power limits and confirm them, whatever the source).
    node_agents: bool = True
    # The "prometheus" source: the server, and a preset query (joule, dcgm) or "custom" with
    # JOULE_PROMETHEUS_QUERY, _POD_LABEL and _COUNTER (see joule.prometheus_energy).
    prometheus_url: str = ""
    prometheus_preset: str = "joule"
    # JOULE_JOB_NETWORK_POLICY: a JSON list of NetworkPolicy peers that may scrape workers'
    # /metrics; set (even to []), every job gets a NetworkPolicy that admits only its own
    # workers and these. None: no policy per job.
    job_network_policy: tuple[dict[str, Any], ...] | None = None
    prometheus_query: str = ""
    prometheus_pod_label: str = ""
    prometheus_counter: str = ""

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE,
    ) -> OperatorConfig:
        env = os.environ if env is None else env
        fmt = env.get("JOULE_LOG_FORMAT", cls.log_format)
        if fmt not in ("json", "plain"):
            raise ValueError(f"JOULE_LOG_FORMAT must be json or plain, got {fmt!r}")
        duration = float(
            _number(env, "JOULE_LEASE_DURATION_SECONDS", cls.lease_duration_seconds, 1)
        )
        if not duration.is_integer():  # leaseDurationSeconds is an integer in the Lease
            raise ValueError(f"JOULE_LEASE_DURATION_SECONDS must be whole seconds, got {duration}")
        deadline = _number(
            env, "JOULE_LEASE_RENEW_DEADLINE_SECONDS", cls.renew_deadline_seconds, 0.1
        )
        retry = _number(env, "JOULE_LEASE_RETRY_PERIOD_SECONDS", cls.retry_period_seconds, 0.1)
        # The same order client-go insists on: the leader must give up before a standby may
        # take over, and must get more than one try within its deadline.
        if not duration > deadline:
            raise ValueError(
                f"JOULE_LEASE_DURATION_SECONDS ({duration:g}) must be greater than "
                f"JOULE_LEASE_RENEW_DEADLINE_SECONDS ({deadline:g})"
            )
        if not deadline > retry * 1.2:
            raise ValueError(
                f"JOULE_LEASE_RENEW_DEADLINE_SECONDS ({deadline:g}) must be greater than "
                f"1.2 x JOULE_LEASE_RETRY_PERIOD_SECONDS ({retry:g})"
            )
        config = cls(
            namespaces=_namespaces(env, "JOULE_WATCH_NAMESPACES"),
            resync_seconds=_number(env, "JOULE_RESYNC_SECONDS", cls.resync_seconds, 1),
            tick_seconds=_number(env, "JOULE_TICK_SECONDS", cls.tick_seconds, 0.1),
            metrics_port=_port(env, "JOULE_METRICS_PORT", cls.metrics_port),
            workers=int(_number(env, "JOULE_WORKERS", cls.workers, 1)),
            log_format=fmt,
            health_port=_port(env, "JOULE_HEALTH_PORT", cls.health_port),
            leader_elect=_boolean(env, "JOULE_LEADER_ELECT", cls.leader_elect),
            lease_name=env.get("JOULE_LEASE_NAME") or cls.lease_name,
            lease_namespace=(env.get("JOULE_LEASE_NAMESPACE") or _own_namespace(namespace_file)),
            identity=env.get("JOULE_POD_NAME", cls.identity),
            lease_duration_seconds=int(duration),
            renew_deadline_seconds=deadline,
            retry_period_seconds=retry,
            energy_source=_choice(
                env, "JOULE_JOB_ENERGY_SOURCE", ENERGY_SOURCES, cls.energy_source
            ),
            node_agent_namespace=(
                env.get("JOULE_NODE_AGENT_NAMESPACE") or _own_namespace(namespace_file)
            ),
            node_agent_selector=env.get("JOULE_NODE_AGENT_SELECTOR") or cls.node_agent_selector,
            node_agent_port=_port(env, "JOULE_NODE_AGENT_PORT", cls.node_agent_port),
            node_agents=_boolean(env, "JOULE_NODE_AGENTS", cls.node_agents),
            prometheus_url=env.get("JOULE_PROMETHEUS_URL", ""),
            prometheus_preset=_choice(
                env, "JOULE_PROMETHEUS_PRESET", PROMETHEUS_PRESETS, cls.prometheus_preset
            ),
            prometheus_query=env.get("JOULE_PROMETHEUS_QUERY", ""),
            prometheus_pod_label=env.get("JOULE_PROMETHEUS_POD_LABEL", ""),
            prometheus_counter=env.get("JOULE_PROMETHEUS_COUNTER", ""),
            job_network_policy=_peers(env, "JOULE_JOB_NETWORK_POLICY"),
        )
        config.check()
        return config

    def check(self) -> None:
        """Settings that only make sense together."""
        if self.energy_source == "node" and not self.node_agents:
            raise ValueError(
                "JOULE_JOB_ENERGY_SOURCE=node needs the node agents (JOULE_NODE_AGENTS)"
            )
        if self.energy_source == "prometheus":
            if not self.prometheus_url.startswith(("http://", "https://")):
                raise ValueError(
                    "JOULE_JOB_ENERGY_SOURCE=prometheus needs JOULE_PROMETHEUS_URL, an http(s) "
                    f"URL, got {self.prometheus_url!r}"
                )
            if self.prometheus_preset == "custom" and "$pods" not in self.prometheus_query:
                raise ValueError(
                    "JOULE_PROMETHEUS_PRESET=custom needs JOULE_PROMETHEUS_QUERY, a PromQL query "
                    "with $namespace and $pods (the workers' names), returning joules per pod"
                )
        if self.prometheus_counter and self.prometheus_counter not in ("pod", "device"):
            raise ValueError(
                f"JOULE_PROMETHEUS_COUNTER must be pod or device, got {self.prometheus_counter!r}"
            )


ENERGY_SOURCES = ("node", "trainer", "prometheus")
PROMETHEUS_PRESETS = ("joule", "dcgm", "custom")


def _choice(env: Mapping[str, str], key: str, allowed: tuple[str, ...], default: str) -> str:
    raw = env.get(key) or default
    if raw not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {raw!r}")
    return raw


def _number(env: Mapping[str, str], key: str, default: float, minimum: float) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum:g}, got {raw}")
    return value


def _namespaces(env: Mapping[str, str], key: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in env.get(key, "").split(",") if n.strip())
    bad = [n for n in names if not _DNS_LABEL.fullmatch(n)]
    if bad:
        raise ValueError(f"{key} must be comma-separated namespace names, got {bad[0]!r}")
    return tuple(dict.fromkeys(names))  # in order, once each


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _port(env: Mapping[str, str], key: str, default: int) -> int:
    value = float(_number(env, key, default, 0))
    if not value.is_integer() or value > 65535:
        raise ValueError(f"{key} must be a port number (0 turns it off), got {env[key]!r}")
    return int(value)


def _peers(env: Mapping[str, str], name: str) -> tuple[dict[str, Any], ...] | None:
    """A JSON list of NetworkPolicy peers (objects with podSelector, namespaceSelector or
    ipBlock); unset or empty text: None."""
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        peers = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{name} is not JSON: {exc}") from None
    keys = {"podSelector", "namespaceSelector", "ipBlock"}
    if not isinstance(peers, list) or not all(
        isinstance(p, dict) and p and set(p) <= keys for p in peers
    ):
        raise ValueError(
            f"{name} must be a JSON list of NetworkPolicy peers (objects with podSelector, "
            f"namespaceSelector or ipBlock), got {text[:200]!r}"
        )
    return tuple(peers)


def _boolean(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    if raw not in ("true", "false"):  # no "yes"/"1": the chart writes exactly these
        raise ValueError(f"{key} must be true or false, got {raw!r}")
    return raw == "true"


def _own_namespace(path: Path) -> str:
    """The pod's namespace (its service account's), or "default" outside a cluster."""
    try:
        return path.read_text().strip() or OperatorConfig.lease_namespace
    except OSError:
        return OperatorConfig.lease_namespace
