"""The local control plane: a real Kubernetes API on one machine, for tests and the demo.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are built once from the
published Go modules and cached (``build``); ``lifecycle`` starts them as local processes with
generated certificates (``pki``) and the flags from ``components``; kwok keeps the fake GPU
nodes (``nodes``) Ready and marks their pods Running.
"""

from joule.cluster.lifecycle import ClusterError, ClusterInfo, down, status, up
from joule.cluster.settings import ClusterSettings

__all__ = ["ClusterError", "ClusterInfo", "ClusterSettings", "down", "status", "up"]
