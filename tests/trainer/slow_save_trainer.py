"""The built-in trainer with a slow disk: every checkpoint write takes JOULE_TEST_SAVE_DELAY
seconds longer. test_torchrun starts it under torchrun (as a script, in place of
``-m joule_trainer.train``) to see that the other ranks wait for rank 0's last save."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from joule_trainer import checkpoint, train

_save = checkpoint.save


def slow_save(*args: Any, **kwargs: Any) -> Path:
    time.sleep(float(os.environ["JOULE_TEST_SAVE_DELAY"]))
    return _save(*args, **kwargs)


if __name__ == "__main__":
    checkpoint.save = slow_save  # train.py calls checkpoint.save through the module
    code = train.main(sys.argv[1:])
    # When each rank leaves, told by the test itself rather than by the trainer under test.
    exited = {"ts": round(time.time(), 3), "event": "exited", "rank": int(os.environ["RANK"])}
    # One write, as the trainer does: print() may split text and newline, merging two ranks' lines.
    sys.stdout.write(json.dumps(exited) + "\n")
    sys.stdout.flush()
    train.exit_now(code)
