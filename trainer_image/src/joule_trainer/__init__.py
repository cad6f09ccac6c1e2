"""joule_trainer: what a Joule worker runs. ``launch`` turns the operator's PET_* environment
into a torchrun command; ``train`` is the elastic DDP loop torchrun starts on every process;
``report`` lets any other training loop tell Joule its progress."""

from joule_trainer.report import report

__all__ = ["report"]
__version__ = "0.1.0"
