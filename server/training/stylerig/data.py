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
    """A corpus and its landmarks; ``usable`` [M] are the indices of images with a face.

    ``also``: more corpora of the same generator and image size (an edit corpus, see
    ``corpus``), read as if appended to the first: their samples take the indices after it.
    ``corpus`` stays the first one (its manifest names the generator)."""

    def __init__(self, root, also=()):
        self.corpus = Corpus(root)
        self.parts = [self.corpus] + [Corpus(extra) for extra in also]
        for part in self.parts[1:]:
            for key in ("generator_fingerprint", "num_ws", "w_dim", "image_size"):
                if part.manifest.get(key) != self.corpus.manifest.get(key):
                    raise ValueError(f"{part.root}: {key} {part.manifest.get(key)!r} differs "
                                     f"from {self.corpus.root}'s {self.corpus.manifest.get(key)!r}"
                                     "; extra corpora must come from the same generator")
        read = [part.landmarks() for part in self.parts]
        sources = sorted({source for _, _, source in read})
        if len(sources) != 1:
            raise ValueError(f"the corpora have landmarks from different sources {sources}")
        self.landmarks = np.concatenate([points for points, _, _ in read])
        self.landmark_source = sources[0]
        self.usable = np.flatnonzero(np.concatenate([found for _, found, _ in read]))
        self.starts = np.cumsum([0] + [part.n for part in self.parts])
        if len(self.usable) < 2:
            raise ValueError(f"{root}: {len(self.usable)} of {self.starts[-1]} images have "
                             "landmarks; training needs at least 2")
        self.image_size = self.corpus.image_size

    def _gather(self, indices, read):
        """``read(part, local indices)`` of each corpus, stacked back in ``indices``' order."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(self.parts) == 1:
            return read(self.corpus, indices)
        which = np.searchsorted(self.starts, indices, side="right") - 1
        pieces, order = [], []
        for k in np.unique(which):
            chosen = np.flatnonzero(which == k)
            pieces.append(read(self.parts[k], indices[chosen] - self.starts[k]))
            order.append(chosen)
        inverse = np.argsort(np.concatenate(order))
        if isinstance(pieces[0], torch.Tensor):
            stacked = torch.cat(pieces)
            return stacked[torch.as_tensor(inverse, device=stacked.device)]
        return np.concatenate(pieces)[inverse]

    def batch(self, seed: int, step: int, size: int, stream: int = BATCH_STREAM) -> np.ndarray:
        """``size`` usable sample indices for ``step`` (without repeats when possible)."""
        rng = step_rng(seed, step, stream)
        return rng.choice(self.usable, size, replace=len(self.usable) < size)

    def w(self, indices, device) -> torch.Tensor:
        return self._gather(indices, lambda part, local: part.w(local, device))

    def images(self, indices) -> np.ndarray:
        return self._gather(indices, lambda part, local: part.images(local))

    def targets(self, indices, size: int, device) -> Targets:
        return make_targets(self.images(indices), self.landmarks[indices], size, device)

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
