"""The scaling policy against static, HPA-style, Pollux-like, power-limit-tuned and oracle
strategies, on the same simulated jobs and seeds. Prints the table; writes a PNG.

    .venv/bin/python benchmarks/policy_simulation.py [--seeds 10] [--jobs 40] [--plot sim.png]

The same as `joule simulate`; the model is in operator/src/joule/sim/model.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from joule.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--plot" not in args:
        args += ["--plot", str(Path("benchmarks") / "policy_simulation.png")]
    if "--seeds" not in args:
        args += ["--seeds", "10"]
    sys.exit(main(["simulate", *args]))
