"""Joule's container images, built on this machine with a real builder and cached by content.

- `ensure_base()`: `localhost/joule-base:bookworm`, a minimal Debian with Python (mmdebstrap,
  imported with buildah);
- `ensure_trainer()`: `trainer_image/Dockerfile` built with `buildah build` on that base,
  torch from PyPI in its own early layer;
- `ensure_operator()`: `operator/Dockerfile` on the same base, from the repository's root cut
  down to the operator's own code (`operator/Dockerfile.dockerignore`);
- `push(image, registry="127.0.0.1:PORT")`: to a plain-HTTP registry, for a node to pull.

Each image is named by the hash of its inputs and built only when no image of that hash is in
storage; each push happens only when the registry does not serve it already. Everything lives
in Joule's cache (`<cache>/buildah`), apart from the system's container storage. Development
tooling: the operator imports none of it.
"""

from joule.images.build import (
    Image,
    ensure_base,
    ensure_operator,
    ensure_trainer,
    operator_inputs,
    storage,
    trainer_inputs,
)
from joule.images.recipe import BaseRecipe, OperatorRecipe, TrainerRecipe
from joule.images.registry import Pushed, manifest_digest, push
from joule.images.tools import ImageError

__all__ = [
    "BaseRecipe",
    "Image",
    "ImageError",
    "OperatorRecipe",
    "Pushed",
    "TrainerRecipe",
    "ensure_base",
    "ensure_operator",
    "ensure_trainer",
    "manifest_digest",
    "operator_inputs",
    "push",
    "storage",
    "trainer_inputs",
]
