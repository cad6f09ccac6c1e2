"""Operator settings, read once from ``JOULE_*`` environment variables (the Helm chart sets
them); a bad value stops the operator at start with a message naming the variable."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorConfig:
    # Namespace to watch; empty: the whole cluster.
    namespace: str = ""
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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        fmt = env.get("JOULE_LOG_FORMAT", cls.log_format)
        if fmt not in ("json", "plain"):
            raise ValueError(f"JOULE_LOG_FORMAT must be json or plain, got {fmt!r}")
        return cls(
            namespace=env.get("JOULE_NAMESPACE", cls.namespace),
            resync_seconds=_number(env, "JOULE_RESYNC_SECONDS", cls.resync_seconds, 1),
            tick_seconds=_number(env, "JOULE_TICK_SECONDS", cls.tick_seconds, 0.1),
            metrics_port=int(_number(env, "JOULE_METRICS_PORT", cls.metrics_port, 0)),
            workers=int(_number(env, "JOULE_WORKERS", cls.workers, 1)),
            log_format=fmt,
        )


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
