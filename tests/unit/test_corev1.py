"""The operator's core/v1 calls go through ``joule.corev1``, not the client's generated
``CoreV1Api``, whose module alone is 21.6 MiB of the operator's memory. The calls themselves
run against kube-apiserver in tests/integration (test_connections, test_operator, ...)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from joule.corev1 import _list


def test_the_operator_builds_its_api_edge_and_pod_cache_without_the_generated_core_api():
    code = """
import sys
from kubernetes import client
import joule.runner, joule.handlers, joule.lifecycle, joule.autoscaler, joule.leader
from joule.kube import JobApi
from joule.podcache import PodCache
configuration = client.Configuration()
configuration.host = "https://127.0.0.1:1"
api = JobApi(client.ApiClient(configuration))
api.pod_cache = PodCache(api.core)
print(sorted(m for m in sys.modules if m.startswith("kubernetes.client.api.")))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "core_v1_api" not in out, out
    assert "custom_objects_api" in out  # what it does use is imported (the check can fail)


def test_a_list_calls_arguments_become_its_query_and_an_unknown_one_is_refused():
    assert _list({"label_selector": "a=b", "watch": True, "_request_timeout": 5}) == {
        "query": {"labelSelector": "a=b", "watch": True},
        "_request_timeout": 5,
    }
    with pytest.raises(TypeError, match="pretty"):
        _list({"label_selector": "a=b", "pretty": "true"})
