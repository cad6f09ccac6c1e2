"""The operator installs and starts without the development tooling: no local cluster, images,
demo or simulator code, and none of their dependencies (cryptography, matplotlib, torch)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ABSENT = ("joule.cluster", "joule.images", "joule.demo", "joule.sim", "cryptography", "torch")

# Run in a child interpreter where those modules cannot be found, as in the operator image.
BLOCKER = f"""
import importlib.abc, sys
ABSENT = {ABSENT!r} + ("matplotlib",)
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == a or name.startswith(a + ".") for a in ABSENT):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Absent())
"""


def run_without_tooling(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=60
    )


def test_the_operator_imports_everything_it_runs_without_the_development_tooling():
    # What `joule operator` imports, the lazily imported modules of run_operator included.
    code = """
import joule.cli, joule.runner, joule.handlers, joule.lifecycle, joule.autoscaler, joule.kube
import joule.scrape, joule.metrics, joule.config
import kopf, kubernetes, prometheus_client
sys.exit(joule.cli.main(["operator", "--help"]))
"""
    proc = run_without_tooling(code)
    assert proc.returncode == 0, proc.stderr
    assert "usage: joule operator" in proc.stdout


def test_a_development_command_where_its_tooling_is_absent_says_what_to_install():
    proc = run_without_tooling("import joule.cli; sys.exit(joule.cli.main(['cluster', 'status']))")
    assert proc.returncode == 2, proc.stderr
    assert "joule.cluster" in proc.stderr and "pip install -e '.[local]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_operators_install_pulls_no_development_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("[")[0] for dep in project["dependencies"]}
    assert names == {"kopf", "kubernetes", "prometheus-client", "pyyaml"}
    assert "cryptography>=42" in project["optional-dependencies"]["local"]
