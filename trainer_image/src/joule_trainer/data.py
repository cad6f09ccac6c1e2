"""Data every worker can draw from without coordination: sample ``i`` of the run is a pure
function of (seed, i). The position in the data is therefore just the number of samples
consumed, which the checkpoint keeps as the step; a resumed or resized run continues exactly
where it left off."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from joule_trainer.dataset import Tokenizer


def _rng(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


class TextWindows:
    """Random windows of a character corpus: (input, next-character target) pairs."""

    def __init__(self, path: Path | None, block: int, seed: int) -> None:
        text = path.read_text() if path else bundled_corpus()
        tokenizer = Tokenizer.chars(text)  # what `joule-data prepare` uses too
        self.vocab = tokenizer.vocab_size
        self.data = torch.from_numpy(tokenizer.encode(text).astype("int64"))
        if len(self.data) <= block + 1:
            raise ValueError(f"corpus of {len(self.data)} characters is shorter than a block")
        self.block, self.seed = block, seed
        # What differential privacy counts as the dataset's samples (N): the windows of
        # block + 1 tokens the text would be cut into as a prepared dataset (ShardWindows).
        self.windows = (len(self.data) - 1) // block

    def batch(self, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
        starts = [
            int(
                torch.randint(
                    0, len(self.data) - self.block - 1, (1,), generator=_rng(self.seed, i)
                )
            )
            for i in indices
        ]
        x = torch.stack([self.data[s : s + self.block] for s in starts])
        y = torch.stack([self.data[s + 1 : s + self.block + 1] for s in starts])
        return x, y


class Shapes:
    """16x16 grey images of one of four patterns (bars, stripes, box, cross) with noise."""

    classes = 4

    def __init__(self, seed: int, size: int = 16) -> None:
        self.seed, self.size = seed, size

    def batch(self, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for i in indices:
            g = _rng(self.seed, i)
            label = int(torch.randint(0, self.classes, (1,), generator=g))
            img = torch.randn(self.size, self.size, generator=g) * 0.5
            o = int(torch.randint(2, self.size - 6, (1,), generator=g))
            if label == 0:
                img[:, o : o + 3] += 2
            elif label == 1:
                img[o : o + 3, :] += 2
            elif label == 2:
                img[o : o + 5, o : o + 5] += 2
            else:
                img[o + 2, :] += 2
                img[:, o + 2] += 2
            xs.append(img.unsqueeze(0))
            ys.append(label)
        return torch.stack(xs), torch.tensor(ys)


def bundled_corpus() -> str:
    return resources.files("joule_trainer").joinpath("data/corpus.txt").read_text()
