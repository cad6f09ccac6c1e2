"""Build the control-plane binaries from the published Go modules, once per version.

``k8s.io/kubernetes`` is not meant to be required as a module: its go.mod points every
``k8s.io/*`` staging module at a path inside its own repository. A throwaway module that
requires it and maps each of those staging modules to its published ``v0.<minor>.<patch>``
release builds cleanly. etcd's server module has local ``replace`` lines too, so it gets the
same treatment; kwok has none and installs directly.

Binaries land in ``<cache>/<component>/<version>/bin/``; a build writes to a temporary folder
and renames, so an interrupted build never leaves a half-written binary that looks cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from joule.cluster.settings import ClusterSettings, cache_dir

Progress = Callable[[str], None]

K8S_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet")
# Bumped when the way we build Kubernetes changes, so caches built the old way are not reused.
K8S_BUILD_REVISION = 2


class BuildError(RuntimeError):
    """A component could not be built; the message names it and quotes the Go error."""


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kubelet: Path
    kwok: Path
    # kwok's own default Stages (node init and heartbeat, pod ready/complete/delete), taken
    # from the module source of the kwok version we built, as kwokctl does.
    kwok_stages: Path

    def all(self) -> list[Path]:
        return [
            self.etcd,
            self.kube_apiserver,
            self.kube_controller_manager,
            self.kube_scheduler,
            self.kubectl,
            self.kubelet,
            self.kwok,
            self.kwok_stages,
        ]


def binaries_for(settings: ClusterSettings, root: Path | None = None) -> Binaries:
    """Where the binaries of these versions live (built or not)."""
    root = root or cache_dir()
    k8s = root / "kubernetes" / f"{settings.kubernetes_version}-r{K8S_BUILD_REVISION}" / "bin"
    return Binaries(
        etcd=root / "etcd" / settings.etcd_version / "bin" / "etcd",
        kube_apiserver=k8s / "kube-apiserver",
        kube_controller_manager=k8s / "kube-controller-manager",
        kube_scheduler=k8s / "kube-scheduler",
        kubectl=k8s / "kubectl",
        kubelet=k8s / "kubelet",
        kwok=root / "kwok" / settings.kwok_version / "bin" / "kwok",
        kwok_stages=root / "kwok" / settings.kwok_version / "stages.yaml",
    )


def staging_replacements(upstream_gomod: str, version: str) -> list[tuple[str, str]]:
    """Map each module that ``k8s.io/kubernetes`` replaces with a local path to its release.

    ``version`` is the Kubernetes version (``v1.36.3``); staging modules are published as
    ``v0.36.3``. Replacements that point at other versions (not local paths) are kept as-is.
    """
    match = re.fullmatch(r"v1\.(\d+\.\d+)", version)
    if not match:
        raise ValueError(f"Kubernetes version must look like v1.36.3, got {version!r}")
    staging_version = f"v0.{match.group(1)}"
    replacements: list[tuple[str, str]] = []
    for old, new in _replace_lines(upstream_gomod):
        if new.startswith("./") or new.startswith("../"):
            replacements.append((old, f"{old} {staging_version}"))
    if not replacements:
        raise ValueError("no local replace lines found in the upstream go.mod")
    return replacements


def _replace_lines(gomod: str) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    in_block = False
    for raw in gomod.splitlines():
        line = raw.split("//", 1)[0].strip()
        if in_block:
            if line == ")":
                in_block = False
            elif "=>" in line:
                old, new = (part.strip() for part in line.split("=>", 1))
                lines.append((old.split()[0], new))
        elif line.startswith("replace ("):
            in_block = True
        elif line.startswith("replace ") and "=>" in line:
            old, new = (part.strip() for part in line[len("replace ") :].split("=>", 1))
            lines.append((old.split()[0], new))
    return lines


def go_directive(gomod: str) -> str:
    """The ``go`` line of a go.mod: the minimum Go version the module needs."""
    match = re.search(r"^go (\S+)\s*$", gomod, re.MULTILINE)
    if not match:
        raise ValueError("go.mod has no go directive")
    return match.group(1)


def render_gomod(
    module: str,
    go_version: str,
    requires: Sequence[tuple[str, str]],
    replacements: Sequence[tuple[str, str]] = (),
) -> str:
    """A throwaway go.mod whose only purpose is to build someone else's commands."""
    out = [f"module {module}", "", f"go {go_version}", ""]
    out += ["require ("] + [f"\t{path} {ver}" for path, ver in requires] + [")", ""]
    if replacements:
        out += ["replace ("] + [f"\t{old} => {new}" for old, new in replacements] + [")", ""]
    return "\n".join(out)


def render_tools_go(packages: Sequence[str]) -> str:
    """Imports that keep `go mod tidy` from dropping the commands we want to build."""
    imports = "\n".join(f'\t_ "{pkg}"' for pkg in packages)
    return f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n"


def ensure_binaries(settings: ClusterSettings, progress: Progress | None = None) -> Binaries:
    """Build whatever is missing from the cache and return the paths of all binaries."""
    say = progress or _stderr
    bins = binaries_for(settings)
    missing = [p for p in bins.all() if not p.is_file()]
    if not missing:
        return bins
    go = _find_go()
    if missing != [bins.kwok_stages]:
        say(
            f"building {', '.join(p.name for p in missing if p != bins.kwok_stages)} with {go}, "
            f"once per version into {cache_dir()}; the first build takes 10-30 minutes on "
            "2 cores, later starts take seconds"
        )
    started = time.monotonic()
    if not bins.etcd.is_file():
        _build_etcd(go, settings.etcd_version, bins.etcd, say)
    if not all(
        p.is_file()
        for p in (
            bins.kube_apiserver,
            bins.kubectl,
            bins.kube_scheduler,
            bins.kube_controller_manager,
            bins.kubelet,
        )
    ):
        _build_kubernetes(go, settings.kubernetes_version, bins.kube_apiserver.parent, say)
    if not bins.kwok.is_file():
        _build_kwok(go, settings.kwok_version, bins.kwok, say)
    if not bins.kwok_stages.is_file():
        _collect_kwok_stages(go, settings.kwok_version, bins.kwok_stages)
    say(f"control plane built in {_fmt_elapsed(time.monotonic() - started)}")
    return bins


def _build_kubernetes(go: str, version: str, bin_dir: Path, say: Progress) -> None:
    workdir = cache_dir() / "build" / f"kubernetes-{version}"
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"[kubernetes {version}] resolving k8s.io/kubernetes and its staging modules")
    info = _go_json(go, ["mod", "download", "-json", f"k8s.io/kubernetes@{version}"], workdir)
    upstream = Path(info["GoMod"]).read_text()
    packages = [f"k8s.io/kubernetes/cmd/{cmd}" for cmd in K8S_COMMANDS]
    gomod = render_gomod(
        "joule.local/build/kubernetes",
        go_directive(upstream),
        [("k8s.io/kubernetes", version)],
        staging_replacements(upstream, version),
    )
    # Kubernetes sets its own GODEBUG defaults; without them some behaviour changes.
    godebug = re.search(r"^godebug .*$", upstream, re.MULTILINE)
    if godebug:
        gomod += godebug.group(0) + "\n"
    _write_module(workdir, gomod, packages)
    _tidy(go, workdir, f"kubernetes {version}", say)
    _go_build(
        go, workdir, packages, bin_dir, f"kubernetes {version}", say, version_ldflags(version)
    )


def _build_etcd(go: str, version: str, target: Path, say: Progress) -> None:
    workdir = cache_dir() / "build" / f"etcd-{version}"
    workdir.mkdir(parents=True, exist_ok=True)
    pkg = "go.etcd.io/etcd/server/v3"
    info = _go_json(go, ["mod", "download", "-json", f"{pkg}@{version}"], workdir)
    gomod = render_gomod(
        "joule.local/build/etcd", go_directive(Path(info["GoMod"]).read_text()), [(pkg, version)]
    )
    _write_module(workdir, gomod, [pkg])
    _tidy(go, workdir, f"etcd {version}", say)
    _go_build(go, workdir, [pkg], target.parent, f"etcd {version}", say, output_name="etcd")


def version_ldflags(version: str) -> str:
    """Stamp the release into the binaries, as Kubernetes' own build does; without it they
    report v0.0.0-master and `kubectl version` cannot parse that."""
    major, minor = version.lstrip("v").split(".")[:2]
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return " ".join(flags)


def _build_kwok(go: str, version: str, target: Path, say: Progress) -> None:
    package = f"sigs.k8s.io/kwok/cmd/kwok@{version}"
    go_install(go, [[package]], target.parent, f"kwok {version}", say)


def go_install(
    go: str,
    batches: Sequence[Sequence[str]],
    bin_dir: Path,
    label: str,
    say: Progress,
    extra_env: dict[str, str] | None = None,
    flags: Sequence[Sequence[str]] = (),
) -> None:
    """``go install`` each batch of ``pkg@version``s (with its ``flags[i]``, e.g. build tags)
    into a staging folder, then publish it as ``bin_dir``, so that an interrupted build never
    looks cached. For modules without local ``replace`` lines."""
    staging = bin_dir.with_name(bin_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for n, batch in enumerate(batches):
        extra = list(flags[n]) if n < len(flags) else []
        _run_go(
            go,
            ["install", "-v", "-trimpath", "-ldflags=-s -w", *extra, *batch],
            cwd=staging,
            label=label,
            say=say,
            extra_env={"GOBIN": str(staging), **(extra_env or {})},
        )
    (staging / "build.log").unlink(missing_ok=True)
    _publish(staging, bin_dir)


KWOK_STAGE_FILES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)


def _collect_kwok_stages(go: str, version: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    info = _go_json(go, ["mod", "download", "-json", f"sigs.k8s.io/kwok@{version}"], target.parent)
    source = Path(info["Dir"])
    docs = []
    for rel in KWOK_STAGE_FILES:
        path = source / rel
        if not path.is_file():
            raise BuildError(f"kwok {version} has no default stage {rel}; cannot configure it")
        docs.append(path.read_text().strip())
    tmp = target.with_suffix(".tmp")
    tmp.write_text("\n---\n".join(docs) + "\n")
    os.replace(tmp, target)


def go_program_sources(source: Path, label: str) -> list[Path]:
    """What a small Go program shipped in this package is built from: go.mod, go.sum and
    its non-test Go files."""
    files = [source / "go.mod", source / "go.sum"]
    files += sorted(p for p in source.glob("*.go") if not p.name.endswith("_test.go"))
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise BuildError(
            f"the {label}'s sources are incomplete (missing {', '.join(map(str, missing))});"
            " was the package installed without its package data?"
        )
    return files


def go_program_hash(source: Path, label: str) -> str:
    """A short digest of the program's source names and contents: its cache key."""
    digest = hashlib.sha256()
    for path in go_program_sources(source, label):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_go_program(go: str, source: Path, target: Path, label: str, say: Progress) -> None:
    """Build the program in ``source`` into ``target`` (a binary path). The sources are copied
    into a work folder next to the target first: the package may be installed read-only, and
    the Go build leaves a log where it runs."""
    workdir = target.parent.with_name("src")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    for path in go_program_sources(source, label):
        shutil.copy2(path, workdir / path.name)
    _go_build(go, workdir, ["."], target.parent, label, say, output_name=target.name)


def _write_module(workdir: Path, gomod: str, packages: Sequence[str]) -> None:
    (workdir / "go.mod").write_text(gomod)
    (workdir / "tools.go").write_text(render_tools_go(packages))


def _tidy(go: str, workdir: Path, label: str, say: Progress) -> None:
    say(f"[{label}] downloading modules (go mod tidy)")
    _run_go(go, ["mod", "tidy"], cwd=workdir, label=label, say=say)


def _go_build(
    go: str,
    workdir: Path,
    packages: Sequence[str],
    bin_dir: Path,
    label: str,
    say: Progress,
    ldflags: str = "",
    output_name: str | None = None,
) -> None:
    staging = bin_dir.with_name(bin_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    out = staging / output_name if output_name else staging
    names = output_name or ", ".join(p.rsplit("/", 1)[-1] for p in packages)
    say(f"[{label}] compiling {names}")
    args = [
        "build",
        "-v",
        "-trimpath",
        f"-ldflags=-s -w {ldflags}".strip(),
        "-o",
        f"{out}{'' if output_name else '/'}",
    ]
    _run_go(go, [*args, *packages], cwd=workdir, label=label, say=say)
    _publish(staging, bin_dir)


def _publish(staging: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        for item in staging.iterdir():
            os.replace(item, final / item.name)
        staging.rmdir()
    else:
        os.replace(staging, final)


def _run_go(
    go: str,
    args: Sequence[str],
    cwd: Path,
    label: str,
    say: Progress,
    extra_env: dict[str, str] | None = None,
) -> None:
    """Run go, printing a heartbeat (packages compiled, elapsed) while it works."""
    env = {**os.environ, "GOFLAGS": "-mod=mod", **(extra_env or {})}
    env.setdefault("GOTOOLCHAIN", "auto")  # an older local Go fetches the one the module needs
    log_path = cwd / "build.log"
    tail: deque[str] = deque(maxlen=40)
    count = 0
    started = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"$ go {' '.join(args)}\n")
        proc = subprocess.Popen(
            [go, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None

        def pump() -> None:
            nonlocal count
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                tail.append(line.rstrip())
                count += 1

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while reader.is_alive():
            reader.join(timeout=15)
            if reader.is_alive():
                say(
                    f"[{label}] go {args[0]}: {count} packages so far, "
                    f"{_fmt_elapsed(time.monotonic() - started)} elapsed"
                )
        code = proc.wait()
    if code != 0:
        detail = "\n".join(tail)
        raise BuildError(
            f"building {label} failed (go {' '.join(args)} exited {code}); "
            f"full log: {log_path}\n{detail}"
        )


def _go_json(go: str, args: Sequence[str], cwd: Path) -> dict[str, str]:
    env = {**os.environ, "GOFLAGS": "-mod=mod"}
    env.setdefault("GOTOOLCHAIN", "auto")
    proc = subprocess.run([go, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"go {' '.join(args)} failed:\n{proc.stderr.strip()}")
    data: dict[str, str] = json.loads(proc.stdout)
    if "Error" in data:
        raise BuildError(f"go {' '.join(args)}: {data['Error']}")
    return data


def _find_go() -> str:
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").is_file() else None
    )
    if go is None:
        raise BuildError(
            "the Go toolchain is needed to build the control plane once, and `go` is not on "
            "PATH. Install Go 1.22 or newer (it fetches the exact toolchain it needs itself)."
        )
    return go


def _fmt_elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def _stderr(message: str) -> None:
    print(f"joule: {message}", file=sys.stderr, flush=True)
