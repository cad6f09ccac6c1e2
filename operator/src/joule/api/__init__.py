"""Typed views of the TrainingJob resource: the spec as the user wrote it (with the CRD's
defaults), and the phases the status moves through."""

from joule.api.types import CleanPodPolicy, JobRef, Phase, SpecError, TrainingJobSpec

__all__ = ["CleanPodPolicy", "JobRef", "Phase", "SpecError", "TrainingJobSpec"]
