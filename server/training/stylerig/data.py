"""What the training stages read: the corpus restricted to images with a face, the face model
and its landmark embedding, and deterministic batches.

Batches are a pure function of (seed, step, stream): the indices of step s come from PCG64
seeded with SeedSequence([seed, s, stream]). A resumed run therefore draws exactly the batches
the uninterrupted run would have drawn, with no random state to save.
"""

from __future__ import annotations

import numpy as np
import torch

from portrait_rig.face_data import FaceData
from portrait_rig.face_source import load_face_data
from server.photo.embedding import LandmarkEmbedding, embedding_for

from server.training.stylerig.corpus import Corpus
from server.training.stylerig.losses import Targets, make_targets


BATCH_STREAM, PARTNER_STREAM, MODE_STREAM, STATISTICS_STREAM = 0, 1, 2, 3


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, stream])))


class TrainingData:
    """A corpus and its landmarks; ``usable`` [M] are the indices of images with a face."""

    def __init__(self, root):
        self.corpus = Corpus(root)
        self.landmarks, found, self.landmark_source = self.corpus.landmarks()
        self.usable = np.flatnonzero(found)
        if len(self.usable) < 2:
            raise ValueError(f"{root}: {len(self.usable)} of {self.corpus.n} images have "
                             "landmarks; training needs at least 2")
        self.image_size = self.corpus.image_size

    def batch(self, seed: int, step: int, size: int, stream: int = BATCH_STREAM) -> np.ndarray:
        """``size`` usable sample indices for ``step`` (without repeats when possible)."""
        rng = step_rng(seed, step, stream)
        return rng.choice(self.usable, size, replace=len(self.usable) < size)

    def w(self, indices, device) -> torch.Tensor:
        return self.corpus.w(indices, device)

    def targets(self, indices, size: int, device) -> Targets:
        return make_targets(self.corpus.images(indices), self.landmarks[indices], size, device)

    def sample(self, count: int, seed: int = 0) -> np.ndarray:
        """Up to ``count`` usable indices in a fixed random order (for statistics)."""
        rng = step_rng(seed, 0, STATISTICS_STREAM)
        return rng.permutation(self.usable)[:count]


def load_face(face_model: str, embedding: str | None = None
              ) -> tuple[FaceData, LandmarkEmbedding]:
    """The face model ('demo' or a file) and its landmark embedding (the file given, or one
    detected on a render of the model)."""
    data = load_face_data(face_model)
    return data, embedding_for(data, embedding)
