"""The `joule` command line. Parses arguments, calls the package, prints results; no logic."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from joule import __version__

if TYPE_CHECKING:
    from joule.cluster import ClusterSettings

# The development tooling (local cluster, images, demo, simulator) is imported by its commands
# only: the operator image ships without it, and `joule operator` must start there.
DEV_ONLY = ("joule", "cryptography", "matplotlib")  # top-level names of what may be absent


class MissingTooling(RuntimeError):
    pass


def _dev_import(module: str) -> None:
    """Fail with what to install when a development command runs where its code is absent."""
    try:
        __import__(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in DEV_ONLY:
            raise MissingTooling(
                f"`{module}` cannot be imported here: {exc.name} is missing (the development "
                "tooling is not part of the operator's install); from a source checkout: "
                "pip install -e '.[local]'"
            ) from exc
        raise


def _say(message: str) -> None:
    print(f"joule: {message}", file=sys.stderr, flush=True)


def _positive_or_zero(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _cluster_settings(args: argparse.Namespace) -> ClusterSettings:
    _dev_import("joule.cluster")
    from joule.cluster import ClusterSettings
    from joule.cluster.settings import NodeShape

    shape = NodeShape(
        gpus=getattr(args, "gpus_per_node", NodeShape.gpus),
        cpu=getattr(args, "node_cpu", NodeShape.cpu),
        memory=getattr(args, "node_memory", NodeShape.memory),
        gpu_product=getattr(args, "gpu_product", NodeShape.gpu_product),
    )
    return ClusterSettings(
        name=args.name,
        nodes=getattr(args, "nodes", 4),
        shape=shape,
        real_node=getattr(args, "real_node", None),
        node_gpus=getattr(args, "node_gpus", 4),
        node_taints=tuple(getattr(args, "node_taint", None) or ()),
    )


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def cmd_cluster_up(args: argparse.Namespace) -> int:
    settings = _cluster_settings(args)
    from joule.cluster import up
    from joule.cluster.realnode import unavailable_reason

    info = up(settings, progress=_say)
    if args.json:
        print(json.dumps({**info.to_json(), "started_in_s": info.started_in_s}, indent=2))
        return 0
    if info.already_running:
        _say(f"cluster {info.name!r} is already running")
    else:
        _say(
            f"cluster {info.name!r} is up in {info.started_in_s:.1f}s (Kubernetes "
            f"{info.versions['kubernetes']}, {info.nodes} kwok nodes x {info.gpus_per_node} "
            "nvidia.com/gpu)"
        )
        if info.node is not None:
            _say(
                f"real node 'local' (kubelet + containerd) at {info.node['state']}; images "
                f"from the registry at {info.node['registry']}"
            )
        else:
            reason = unavailable_reason()
            if reason:
                _say(f"no real node: {reason}")
    print(f"API server:  {info.server}")
    print(f"kubeconfig:  {info.kubeconfig}")
    print(f"kubectl:     {info.kubectl}")
    print(f"\nexport KUBECONFIG={info.kubeconfig}")
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    settings = _cluster_settings(args)
    from joule.cluster import status

    info = status(settings)
    if info is None:
        if args.json:
            print(json.dumps({"name": args.name, "running": False}))
        else:
            print(f"cluster {args.name!r} is not running")
        return 1
    if args.json:
        data = info.to_json()
        data["running"] = info.running
        data["components"] = [vars(c) for c in info.components]
        print(json.dumps(data, indent=2))
        return 0 if info.running else 1
    state = "running" if info.running else "DEGRADED"
    print(f"cluster {info.name!r}: {state}  {info.server}  kubeconfig={info.kubeconfig}")
    total = 0
    for comp in info.components:
        total += comp.rss_bytes or 0
        health = "healthy" if comp.healthy else ("alive, not healthy" if comp.alive else "DEAD")
        print(f"  {comp.name:<24} pid {comp.pid:<8} {health:<18} rss {_fmt_bytes(comp.rss_bytes)}")
    print(f"  {'total':<24} {'':<12} {'':<18} rss {_fmt_bytes(total)}")
    return 0 if info.running else 1


def cmd_cluster_down(args: argparse.Namespace) -> int:
    settings = _cluster_settings(args)
    from joule.cluster import down

    stopped = down(settings)
    if stopped:
        _say(f"cluster {args.name!r} stopped ({', '.join(stopped)})")
    else:
        _say(f"cluster {args.name!r} was not running; nothing left behind")
    return 0


def cmd_cluster_build(args: argparse.Namespace) -> int:
    _dev_import("joule.cluster")
    from joule.cluster import ClusterSettings
    from joule.cluster.build import ensure_binaries
    from joule.cluster.deviceplugin import ensure_device_plugin
    from joule.cluster.dns import ensure_coredns
    from joule.cluster.helm import ensure_helm
    from joule.cluster.nodebuild import ensure_node_binaries
    from joule.cluster.objectstore import ensure_versitygw
    from joule.cluster.prometheus import ensure_prometheus
    from joule.cluster.realnode import unavailable_reason

    bins = ensure_binaries(ClusterSettings(), progress=_say)
    for path in bins.all():
        print(path)
    print(ensure_helm(progress=_say))  # the chart's tests run it
    for path in ensure_prometheus(progress=_say):  # the metrics tests scrape with it
        print(path)
    print(ensure_versitygw(progress=_say))  # the object store the data tests read from
    if unavailable_reason() is None:
        node = ensure_node_binaries(ClusterSettings().kubernetes_version, progress=_say)
        for path in (node.containerd, node.ctr, node.shim, node.pause, node.runc):
            print(path)
        print(ensure_device_plugin(progress=_say))
        print(ensure_coredns(progress=_say))
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    _dev_import("joule.images")
    from joule.images import ensure_base, ensure_operator, ensure_trainer, push

    progress = _say  # each step's lines carry their elapsed time, e.g. "STEP 6/15: ... [85s]"
    ensure = {"trainer": ensure_trainer, "operator": ensure_operator, "base": ensure_base}
    image = ensure[args.target](progress=progress)
    state = "built" if image.built else "up to date (cached)"
    _say(f"{image.ref} {state}: id {image.id[:12]}, inputs {image.key[:12]}")
    print(image.ref)
    if args.push:
        name = args.name or f"joule-dev/{args.target}"
        pushed = push(image, args.push, name, args.tag, progress=progress)
        _say(f"{pushed.ref} {'pushed' if pushed.pushed else 'already in the registry'}")
        print(f"{pushed.ref}@{pushed.digest}")
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from joule.config import OperatorConfig
    from joule.runner import run_operator

    config = OperatorConfig.from_env()
    if args.namespace is not None:
        config = replace(config, namespaces=tuple(args.namespace))
    if args.metrics_port is not None:
        config = replace(config, metrics_port=args.metrics_port)
    run_operator(config)
    return 0


def cmd_node_agent(args: argparse.Namespace) -> int:
    from joule.nodeagent.main import Options, run

    if not args.node:
        raise ValueError("--node (or NODE_NAME) is required: the name of this node")
    options = Options(
        node=args.node,
        state_dir=args.state_dir,
        socket=args.pod_resources_socket,
        gpus=args.gpus,
        port=args.port,
        interval=args.interval,
        resource=args.resource,
        simulated_watts=args.simulated_watts,
    )
    return run(options)


def cmd_demo(args: argparse.Namespace) -> int:
    _dev_import("joule.demo.run")
    from joule.demo.run import Options, run_demo

    if not args.examples.exists():
        raise ValueError(f"--examples {args.examples}: no such file or directory")
    options = Options(
        examples=args.examples,
        until_done=args.until_done,
        timeout=args.timeout,
        gpus=args.gpus,
    )
    return run_demo(options, _say)


def cmd_report(args: argparse.Namespace) -> int:
    import time

    from joule.report.draw import write
    from joule.report.model import parse_since
    from joule.report.sources import from_cluster, from_prometheus

    end = time.time()
    start = end - parse_since(args.since)
    out = args.output or Path(f"{args.job}.html")
    if args.prometheus:
        report = from_prometheus(args.prometheus, args.namespace, args.job, start, end)
    else:
        from kubernetes import config

        api = config.new_client_from_config(config_file=args.kubeconfig)
        report = from_cluster(api, args.namespace, args.job, start, end)
    write(report, out)
    empty = report.empty_panels()
    _say(
        f"report of {args.namespace}/{args.job} from {report.source}: {len(report.decisions)} "
        f"decisions{'; no data for ' + ', '.join(empty) if empty else ''}; written to {out}"
    )
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    _dev_import("joule.sim.report")
    from joule.sim.report import plot, run, table

    seeds = list(range(args.seed, args.seed + args.seeds))
    _say(f"simulating {args.jobs} jobs on {args.gpus} GPUs, seeds {seeds[0]}..{seeds[-1]}")
    results = run(seeds, args.jobs, args.gpus)
    print(table(results))
    if args.plot:
        plot(results, args.plot)
        _say(f"plot written to {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="joule",
        description="Joule: elastic, energy-aware multi-GPU PyTorch training on Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"joule {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    op = sub.add_parser(
        "operator",
        help="run the operator (in-cluster credentials, else KUBECONFIG); settings: JOULE_*",
    )
    op.add_argument(
        "--namespace",
        action="append",
        help="watch only this namespace; repeat for more (default: all, or JOULE_WATCH_NAMESPACES)",
    )
    op.add_argument(
        "--metrics-port", type=_positive_or_zero, help="port of /metrics, 0 for none (default 8080)"
    )
    op.set_defaults(func=cmd_operator)

    agent = sub.add_parser(
        "node-agent",
        help="run the node agent (DaemonSet): measure GPUs per pod, set their power limits",
    )
    agent.add_argument("--node", default=os.environ.get("NODE_NAME"),
                       help="this node's name (default: NODE_NAME)")  # fmt: skip
    agent.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/var/lib/joule-node-agent"),
        help="where the energy ledger is kept across restarts (a hostPath)",
    )
    agent.add_argument(
        "--pod-resources-socket",
        type=Path,
        default=Path("/var/lib/kubelet/pod-resources/kubelet.sock"),
        help="the kubelet's pod-resources API",
    )
    agent.add_argument(
        "--gpus",
        choices=("nvml", "simulated"),
        default="nvml",
        help="nvml: the node's GPUs; simulated: an NVML double over the kubelet's GPU IDs "
        "(nodes without GPUs; every series says source=simulated)",
    )
    agent.add_argument("--simulated-watts", type=float, default=30.0,
                       help="a simulated GPU's draw, below its limit (default 30)")  # fmt: skip
    agent.add_argument("--port", type=_positive, default=9410, help="/metrics port (9410)")
    agent.add_argument("--interval", type=float, default=5.0, help="seconds between updates")
    agent.add_argument("--resource", default="nvidia.com/gpu", help="the GPUs' resource name")
    agent.set_defaults(func=cmd_node_agent)

    demo = sub.add_parser(
        "demo",
        help="the whole loop here: control plane, operator, a real node, example jobs, live view "
        "(root on Linux)",
    )
    demo.add_argument(
        "--examples",
        type=Path,
        default=Path(__file__).resolve().parents[3] / "examples" / "demo",
        help="TrainingJob manifests to apply (default: examples/demo)",
    )
    demo.add_argument(
        "--until-done",
        action="store_true",
        help="exit when every job has finished (0 if all Succeeded) instead of on Ctrl-C",
    )
    demo.add_argument("--timeout", type=float, default=None, help="give up after SECONDS")
    demo.add_argument(
        "--gpus",
        type=_positive,
        default=4,
        help="nvidia.com/gpu slots of the local node (slots for pods, not GPUs; default 4)",
    )
    demo.set_defaults(func=cmd_demo)

    rep = sub.add_parser(
        "report",
        help="draw one job's power, energy, workers, throughput and decisions over time",
    )
    rep.add_argument("job", help="the TrainingJob's name")
    rep.add_argument("-n", "--namespace", default="default", help="its namespace (default)")
    rep.add_argument("--since", default="1h", help="how far back: 90s, 30m, 1h, 2h30m (default 1h)")
    rep.add_argument(
        "-o", "--output", type=Path, default=None,
        help="report.html (a page with the figure and every decision) or report.png "
        "(default: JOB.html)",
    )  # fmt: skip
    rep.add_argument(
        "--prometheus", default=os.environ.get("JOULE_PROMETHEUS_URL", ""), metavar="URL",
        help="a Prometheus that scrapes the operator (default $JOULE_PROMETHEUS_URL); without "
        "one, the job's status and Events (no history)",
    )  # fmt: skip
    rep.add_argument(
        "--kubeconfig", default=None, help="without --prometheus (default: $KUBECONFIG)"
    )
    rep.set_defaults(func=cmd_report)

    sim = sub.add_parser(
        "simulate",
        help="compare scaling strategies (static, HPA, Pollux-like, Joule, oracle) on a cluster",
    )
    sim.add_argument("--jobs", type=_positive, default=40, help="jobs per seed (default 40)")
    sim.add_argument("--gpus", type=_positive, default=64, help="cluster GPUs (default 64 = 8 x 8)")
    sim.add_argument("--seed", type=int, default=1, help="first seed (default 1)")
    sim.add_argument("--seeds", type=_positive, default=5, help="seeds to run (default 5)")
    sim.add_argument("--plot", type=Path, default=None, help="write a PNG of the comparison")
    sim.set_defaults(func=cmd_simulate)

    image = sub.add_parser("image", help="Joule's container images, built here with buildah")
    isub = image.add_subparsers(dest="image_command", required=True)
    ibuild = isub.add_parser(
        "build",
        help="build an image unless one of the same inputs is cached (needs root, buildah, "
        "mmdebstrap)",
    )
    ibuild.add_argument(
        "target",
        nargs="?",
        choices=("trainer", "operator", "base"),
        default="trainer",
        help="trainer (default), operator (operator/Dockerfile), or base; each image builds "
        "the base first if needed",
    )
    ibuild.add_argument(
        "--push",
        metavar="HOST:PORT",
        help="then push it to this plain-HTTP registry (skipped if it is there already)",
    )
    ibuild.add_argument("--name", help="repository in the registry (default joule-dev/TARGET)")
    ibuild.add_argument("--tag", default=__version__, help=f"tag (default {__version__})")
    ibuild.set_defaults(func=cmd_image_build)

    cluster = sub.add_parser("cluster", help="a local Kubernetes control plane with GPU nodes")
    csub = cluster.add_subparsers(dest="cluster_command", required=True)

    def with_name(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--name", default="joule", help="cluster name (default: joule)")
        p.add_argument("--json", action="store_true", help="print machine-readable JSON")
        return p

    up_p = with_name(csub.add_parser("up", help="build (once) and start the control plane"))
    up_p.add_argument("--nodes", type=_positive_or_zero, default=4, help="GPU nodes (default 4)")
    up_p.add_argument(
        "--gpus-per-node",
        type=_positive_or_zero,
        default=8,
        help="nvidia.com/gpu per node (default 8)",
    )
    up_p.add_argument(
        "--gpu-product",
        default="NVIDIA-H100-80GB-HBM3",
        help="value of the nvidia.com/gpu.product node label",
    )
    up_p.add_argument("--node-cpu", default="96", help="cpu capacity per node (default 96)")
    up_p.add_argument("--node-memory", default="1024Gi", help="memory per node (default 1024Gi)")
    up_p.add_argument(
        "--real-node",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also start a real node, kubelet + containerd (default: when root on Linux)",
    )
    up_p.add_argument(
        "--node-gpus",
        type=_positive_or_zero,
        default=4,
        help="nvidia.com/gpu slots on the real node (slots, not GPUs; default 4)",
    )
    up_p.add_argument(
        "--node-taint",
        action="append",
        help="a taint on the real node, key=value:NoSchedule (repeatable)",
    )
    up_p.set_defaults(func=cmd_cluster_up)
    build_p = csub.add_parser(
        "build", help="build the control-plane binaries into the cache (up does this too)"
    )
    build_p.set_defaults(func=cmd_cluster_build)
    with_name(csub.add_parser("status", help="processes, health and memory")).set_defaults(
        func=cmd_cluster_status
    )
    with_name(csub.add_parser("down", help="stop every process and remove state")).set_defaults(
        func=cmd_cluster_down
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, RuntimeError) as exc:  # ClusterError, BuildError, ImageError too
        _say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
