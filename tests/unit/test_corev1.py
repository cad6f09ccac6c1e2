"""The operator's core/v1 calls go through ``joule.corev1``, not the client's generated
``CoreV1Api``, whose module alone is 21.6 MiB of the operator's memory. Here: the requests it
makes and how it answers, at the client's REST layer; the calls themselves run against
kube-apiserver in tests/integration (test_connections, test_operator, ...)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import urllib3
from kubernetes import client
from kubernetes.client import rest
from kubernetes.client.rest import ApiException

from joule.corev1 import CoreV1, _list


class Server:
    """The REST layer's place: records each request, answers with the next status and body."""

    def __init__(self, status: int = 200, answer: Any = None) -> None:
        self.status, self.answer = status, answer if answer is not None else {"kind": "Pod"}
        self.requests: list[dict[str, Any]] = []

    def request(self, method, url, headers=None, body=None, post_params=None, **kw):
        self.requests.append({"method": method, "url": url, "headers": headers, "body": body})
        raw = urllib3.HTTPResponse(
            body=json.dumps(self.answer).encode(),
            status=self.status,
            headers={"content-type": "application/json"},
            preload_content=False,
        )
        return rest.RESTResponse(raw)


def core_v1(server: Server) -> CoreV1:
    configuration = client.Configuration()
    configuration.host = "https://k8s.test"
    api = client.ApiClient(configuration)
    api.rest_client.request = server.request
    return CoreV1(api)


def test_a_pod_is_posted_as_json_with_strict_field_validation_and_answered_as_a_dict():
    server = Server(201, {"kind": "Pod", "metadata": {"name": "w-0"}})
    pod = {"metadata": {"name": "w-0"}, "spec": {"containers": []}}
    answer = core_v1(server).create_namespaced_pod("ns", pod, field_validation="Strict")
    assert answer == {"kind": "Pod", "metadata": {"name": "w-0"}}
    [sent] = server.requests
    assert (sent["method"], sent["url"]) == (
        "POST",
        "https://k8s.test/api/v1/namespaces/ns/pods?fieldValidation=Strict",
    )
    assert sent["headers"]["Content-Type"] == "application/json" and sent["body"] == pod


def test_a_list_sends_its_selector_and_watch_as_the_generated_client_does():
    server = Server(answer={"items": []})
    core = core_v1(server)
    assert core.list_namespaced_pod("ns", label_selector="joule.dev/job-name=a,x=y") == {
        "items": []
    }
    core.list_pod_for_all_namespaces(watch=True, resource_version="7", _preload_content=False)
    urls = [r["url"] for r in server.requests]
    assert urls == [
        "https://k8s.test/api/v1/namespaces/ns/pods?labelSelector=joule.dev/job-name%3Da%2Cx%3Dy",
        "https://k8s.test/api/v1/pods?watch=true&resourceVersion=7",
    ]


def test_a_dict_patch_is_a_strategic_merge_and_a_list_a_json_patch():
    server = Server()
    core = core_v1(server)
    core.patch_namespaced_pod("w-0", "ns", {"metadata": {"annotations": {"a": None}}})
    core.patch_namespaced_event("e", "ns", [{"op": "replace", "path": "/count", "value": 2}])
    assert [r["headers"]["Content-Type"] for r in server.requests] == [
        "application/strategic-merge-patch+json",
        "application/json-patch+json",
    ]


@pytest.mark.parametrize("preload", [True, False])
def test_a_refusal_raises_the_clients_api_exception_with_its_status_and_body(preload):
    server = Server(404, {"kind": "Status", "reason": "NotFound", "message": 'pods "w" not found'})
    with pytest.raises(ApiException) as refused:
        core_v1(server).delete_namespaced_pod("w", "ns", _preload_content=preload)
    assert refused.value.status == 404
    assert json.loads(refused.value.body)["reason"] == "NotFound"


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
