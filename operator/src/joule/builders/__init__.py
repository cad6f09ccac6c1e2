"""Pure builders: a TrainingJob in, the manifests of its children out. No I/O."""

from joule.builders.pod import pod_name, worker_pod
from joule.builders.service import service_name, worker_service

__all__ = ["pod_name", "service_name", "worker_pod", "worker_service"]
