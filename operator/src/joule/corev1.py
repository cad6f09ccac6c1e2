"""The core/v1 calls the operator makes, through the Kubernetes client's ``ApiClient`` (its
configuration, authentication, connection pool, retries and ``ApiException``) but without
its generated ``CoreV1Api``. Importing that module (63,000 lines, a pydantic-checked
wrapper per call, and the models it names) takes 21.6 MiB of RSS, a quarter of the idle
operator, for the fourteen calls below (benchmarks/operator_latency.py).

The methods keep ``CoreV1Api``'s names and arguments. Answers are plain JSON, as the pod
watch's events are: dicts, or the raw answer with ``_preload_content=False``. Bodies are
checked by the API server, pods with ``fieldValidation=Strict``, which names an unknown field.
"""

from __future__ import annotations

from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

JSON = "application/json"
# What the generated client sends for a PATCH: a list is a JSON patch, a dict a strategic
# merge, which the API server merges by each field's strategy (an annotation set to None
# is removed).
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
Timeout = float | tuple[float, float] | None


class CoreV1:
    """``CoreV1Api``'s calls that the operator makes, by the same names."""

    def __init__(self, api_client: ApiClient) -> None:
        self.api_client = api_client

    def _call(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = JSON,
        _preload_content: bool = True,
        _request_timeout: Timeout = None,
    ) -> Any:
        headers = {"Accept": JSON}
        if body is not None:
            headers["Content-Type"] = content_type
        params = [(k, v) for k, v in (query or {}).items() if v is not None]
        request = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=params,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        answer = self.api_client.call_api(*request, _request_timeout=_request_timeout)
        if not _preload_content:
            if not 200 <= answer.status <= 299:
                answer.read()  # the connection goes back to the pool
                raise ApiException.from_response(http_resp=answer, body=None, data=None)
            return answer.response
        answer.read()
        return self.api_client.response_deserialize(answer, {"2XX": "object"}).data

    # --- pods ----------------------------------------------------------------------------

    def list_namespaced_pod(self, namespace: str, **kwargs: Any) -> Any:
        return self._call("GET", f"/api/v1/namespaces/{namespace}/pods", **_list(kwargs))

    def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
        return self._call("GET", "/api/v1/pods", **_list(kwargs))

    def create_namespaced_pod(
        self,
        namespace: str,
        body: dict[str, Any],
        *,
        field_validation: str | None = None,
        **kw: Any,
    ) -> Any:
        query = {"fieldValidation": field_validation}
        return self._call("POST", f"/api/v1/namespaces/{namespace}/pods", query, body, **kw)

    def patch_namespaced_pod(self, name: str, namespace: str, body: Any, **kw: Any) -> Any:
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"
        return self._call("PATCH", path, body=body, content_type=_patch(body), **kw)

    def delete_namespaced_pod(
        self, name: str, namespace: str, *, body: dict[str, Any] | None = None, **kw: Any
    ) -> Any:
        return self._call("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body=body, **kw)

    # --- services ------------------------------------------------------------------------

    def create_namespaced_service(self, namespace: str, body: dict[str, Any], **kw: Any) -> Any:
        return self._call("POST", f"/api/v1/namespaces/{namespace}/services", body=body, **kw)

    def delete_namespaced_service(self, name: str, namespace: str, **kw: Any) -> Any:
        return self._call("DELETE", f"/api/v1/namespaces/{namespace}/services/{name}", **kw)

    # --- events --------------------------------------------------------------------------

    def create_namespaced_event(self, namespace: str, body: dict[str, Any], **kw: Any) -> Any:
        return self._call("POST", f"/api/v1/namespaces/{namespace}/events", body=body, **kw)

    def patch_namespaced_event(self, name: str, namespace: str, body: Any, **kw: Any) -> Any:
        path = f"/api/v1/namespaces/{namespace}/events/{name}"
        return self._call("PATCH", path, body=body, content_type=_patch(body), **kw)

    # --- config maps (the energy bookkeeping) --------------------------------------------

    def read_namespaced_config_map(self, name: str, namespace: str, **kw: Any) -> Any:
        return self._call("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}", **kw)

    def create_namespaced_config_map(self, namespace: str, body: dict[str, Any], **kw: Any) -> Any:
        return self._call("POST", f"/api/v1/namespaces/{namespace}/configmaps", body=body, **kw)

    def replace_namespaced_config_map(
        self, name: str, namespace: str, body: dict[str, Any], **kw: Any
    ) -> Any:
        path = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
        return self._call("PUT", path, body=body, **kw)

    # --- nodes ---------------------------------------------------------------------------

    def list_node(self, **kwargs: Any) -> Any:
        return self._call("GET", "/api/v1/nodes", **_list(kwargs))


# A list's (and watch's) query parameters, by the generated client's argument names.
LIST_QUERY = {
    "label_selector": "labelSelector",
    "field_selector": "fieldSelector",
    "resource_version": "resourceVersion",
    "watch": "watch",
    "timeout_seconds": "timeoutSeconds",
    "allow_watch_bookmarks": "allowWatchBookmarks",
    "limit": "limit",
}


def _list(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Split a list call's arguments into its query and the call's own (``_preload_content``,
    ``_request_timeout``); an argument this module does not know is an error, not ignored."""
    query = {LIST_QUERY[k]: kwargs.pop(k) for k in list(kwargs) if k in LIST_QUERY}
    unknown = [k for k in kwargs if k not in ("_preload_content", "_request_timeout")]
    if unknown:
        raise TypeError(f"unexpected arguments for a list call: {', '.join(unknown)}")
    return {"query": query, **kwargs}


def _patch(body: Any) -> str:
    return JSON_PATCH if isinstance(body, list) else STRATEGIC_MERGE
