"""Checks the node agent's NVML layer (joule.nodeagent.gpu.Gpus) against nvidia-smi on GPU 0.

    python benchmarks/nvml_check.py

Run on a machine WITH an NVIDIA GPU and driver; needs python3, nvidia-ml-py
(`pip install nvidia-ml-py`) and nvidia-smi. From a checkout it needs nothing installed of
the repository: the wrapper imports only pynvml, and the script finds it in operator/src.

What it checks, one PASS/FAIL line each (exit status 1 if any fails):
1. the energy counter (nvmlDeviceGetTotalEnergyConsumption) increases over 5 s, and the
   average power it implies is plausible (above 0, below the max limit plus a margin);
2. nvmlDeviceGetPowerUsage agrees with nvidia-smi's power.draw (both are sampled, so within
   15 % or 10 W), and the enforced limit with nvidia-smi's enforced.power.limit;
3. as root only: lowering the limit to max(min limit, 0.8 x default) is read back by NVML and
   by nvidia-smi; restoring the default (set_limit(None)) is read back by both.
The default limit is restored in any case on the way out (even if it was not the limit in force
before: the script says so). This is what the simulated NVML (simnvml.py) stands in for
elsewhere; a FAIL here means the double and the wrapper disagree with the hardware.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

try:
    from joule.nodeagent.gpu import Gpus
except ImportError:  # a plain checkout: the wrapper needs only pynvml
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator" / "src"))
    from joule.nodeagent.gpu import Gpus

WAIT_S = 5.0
failures: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def smi(index: int) -> tuple[float, float, float]:
    """nvidia-smi's power.draw, power.limit, enforced.power.limit for one GPU, in watts."""
    out = subprocess.run(
        [
            "nvidia-smi",
            f"--id={index}",
            "--query-gpu=power.draw,power.limit,enforced.power.limit",
            "--format=csv,noheader,nounits",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    draw, limit, enforced = (float(v) for v in out.strip().split(","))
    return draw, limit, enforced


def close(a: float | None, b: float, tolerance: float = 0.5) -> bool:
    return a is not None and abs(a - b) <= tolerance


def main() -> int:
    gpus = Gpus.open_nvml()
    uuid = gpus.uuids()[0]
    first = gpus.read(uuid)
    print(f"GPU {first.index} {first.name} {uuid} (source={gpus.source})")
    print(
        f"  limits: in force {first.power_limit_watts} W, default {first.default_limit_watts} W,"
        f" range [{first.min_limit_watts}, {first.max_limit_watts}] W"
    )
    try:
        # 1. The energy counter over WAIT_S seconds.
        start = time.monotonic()
        time.sleep(WAIT_S)
        second_reading = gpus.read(uuid)
        elapsed = time.monotonic() - start
        if first.energy_joules is None or second_reading.energy_joules is None:
            check("energy counter", False, "not supported on this GPU (pre-Volta?)")
        else:
            joules = second_reading.energy_joules - first.energy_joules
            watts = joules / elapsed
            ceiling = (first.max_limit_watts or 1000.0) * 1.2
            print(
                f"  energy: {first.energy_joules:.3f} J, then {second_reading.energy_joules:.3f} J"
                f" {elapsed:.2f} s later: {watts:.1f} W on average"
            )
            check(
                "energy counter", 0 < watts < ceiling, f"{watts:.1f} W average over {elapsed:.1f} s"
            )

        # 2. NVML against nvidia-smi.
        reading = gpus.read(uuid)
        draw, _, enforced = smi(reading.index)
        power = reading.power_watts
        agree = power is not None and abs(power - draw) <= max(10.0, 0.15 * draw)
        check("power vs nvidia-smi", agree, f"NVML {power} W, nvidia-smi power.draw {draw} W")
        check(
            "enforced limit vs nvidia-smi",
            close(reading.power_limit_watts, enforced),
            f"NVML {reading.power_limit_watts} W, nvidia-smi {enforced} W",
        )

        # 3. Setting and restoring a limit.
        if os.geteuid() != 0:
            print("SKIP  power limits: not root")
        elif reading.default_limit_watts is None or reading.min_limit_watts is None:
            check("power limits", False, "this GPU reports no default limit or constraints")
        else:
            default = reading.default_limit_watts
            if not close(reading.power_limit_watts, default):
                print(
                    f"  note: the limit in force is not the default; it will be left at {default} W"
                )
            target = max(reading.min_limit_watts, round(default * 0.8))
            enforced_nvml = gpus.set_limit(uuid, target)
            check("lowered limit, NVML", close(enforced_nvml, target), f"{enforced_nvml} W")
            _, _, enforced_smi = smi(reading.index)
            check("lowered limit, nvidia-smi", close(enforced_smi, target), f"{enforced_smi} W")
            restored = gpus.set_limit(uuid, None)
            check("default restored, NVML", close(restored, default), f"{restored} W")
            _, _, enforced_smi = smi(reading.index)
            check("default restored, nvidia-smi", close(enforced_smi, default), f"{enforced_smi} W")
    finally:
        if os.geteuid() == 0:
            try:
                gpus.set_limit(uuid, None)  # never leave the GPU capped
            except Exception as exc:
                print(f"WARNING: could not restore the default limit: {exc}", file=sys.stderr)
        gpus.close()
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
