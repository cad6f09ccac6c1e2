"""torchrun as ``python -m torch.distributed.run`` runs it, with two changes when a process
fails, so that a pod's status says something useful:

- torchrun exits 1 whatever its processes did; where one exited with the trainer's
  ``EXIT_CONFIG`` (78: a checkpoint key that opens none of the checkpoints, or a key file
  that is no key) or ``EXIT_STORAGE`` (74: its checkpoint directory cannot take a
  checkpoint), so does this (78 first), and the pod's exit code says that the job or a
  volume needs fixing rather than that code crashed;
  likewise with ``dataset.EXIT_DATA`` (65: a dataset shard not what its manifest says);
- torchrun's report ends with a row of "=", which a worker's status would quote as its log's
  last line: one line naming the failed rank and how it ended follows it.

joule-launch runs this in place of ``torch.distributed.run``; the flags are torchrun's.
"""

from __future__ import annotations

import sys

from joule_trainer.checkpoint import EXIT_CONFIG, EXIT_STORAGE
from joule_trainer.dataset import EXIT_DATA


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as exc:
        rank, first = exc.get_first_failure()
        codes = {f.exitcode for f in exc.failures.values()}
        code = next((c for c in (EXIT_CONFIG, EXIT_STORAGE, EXIT_DATA) if c in codes), 1)
        how = (
            f"exited with code {first.exitcode}"
            if first.exitcode >= 0
            else f"was killed by {first.signal_name()}"
        )
        # torchrun's report as it prints it (less the launcher's own traceback), then ours.
        sys.stderr.write(f"{exc}\njoule-launch: {exc.name} failed: rank {rank} {how}\n")
        sys.stderr.flush()
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
