"""`joule operator`: load credentials, register handlers, serve metrics, run kopf."""

from __future__ import annotations

import asyncio
import logging

from joule.config import OperatorConfig


def run_operator(config: OperatorConfig) -> None:
    import kopf
    from kubernetes import client
    from kubernetes import config as kube_config
    from prometheus_client import start_http_server

    from joule import handlers, metrics
    from joule.autoscaler import Autoscaler
    from joule.kube import JobApi
    from joule.lifecycle import Reconciler

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()  # KUBECONFIG or ~/.kube/config
    kopf.configure(
        log_format=kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.PLAIN,
        verbose=False,
    )
    logging.getLogger("joule").setLevel(logging.INFO)
    # kopf logs every handler run at INFO; our reconcile logs what was decided instead.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    api = JobApi(client.ApiClient())
    handlers.register(Reconciler(api), config, Autoscaler(api))
    metrics.register()
    if config.metrics_port:
        start_http_server(config.metrics_port, addr="0.0.0.0")
        logging.getLogger("joule").info("metrics on :%d/metrics", config.metrics_port)
    asyncio.run(
        kopf.operator(
            clusterwide=not config.namespace,
            namespaces=[config.namespace] if config.namespace else [],
            standalone=True,
        )
    )
