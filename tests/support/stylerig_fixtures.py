"""Small inputs for the StyleRig pipeline tests.

* ``write_generator``: a tiny random StyleGAN2 (32 px) saved with ``save_generator``.
* ``write_test_face``: the sphere head of ``synthetic_face.py`` (738 vertices, a tenth of the
  demo head's, so training steps are fast) as a FaceData ``.npz``, with a 68-point landmark
  embedding in DECA's ``landmark_embedding.npy`` format: a face-like 2D layout of the iBUG
  points (jaw line, brows, nose, eyes, lips) placed on the front of the sphere, each point on
  the triangle under it in a frontal orthographic view.
* ``write_corpus``: both of the above and a 12-sample corpus (two shards) of the generator
  with synthetic landmarks of the sphere head.
* ``write_random_rignet``: a RigNet with a random decoder, saved with ``save_rignet``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from server.checkpoints.stylegan import save_generator
from server.checkpoints.stylerig import save_rignet
from server.models.rignet import ControlLayout, RigNet
from tests.support.stylegan_fixtures import TINY_SG2, random_generator
from tests.support.synthetic_face import synthetic_face


def write_generator(folder, seed: int = 0) -> Path:
    path = Path(folder) / "generator.safetensors"
    save_generator(random_generator(TINY_SG2, seed), path)
    return path


def write_corpus(root) -> tuple[Path, Path, Path]:
    """``write_generator`` and ``write_test_face`` in ``root``, and the generator's 12-sample
    corpus in two shards at ``root / "corpus"`` with the head's synthetic landmarks. Returns
    the generator, face model and embedding paths."""
    from server.training.stylerig.corpus import CorpusSettings, build_corpus
    from server.training.stylerig.landmarks import detect_corpus_landmarks

    root = Path(root)
    generator = write_generator(root)
    face, embedding = write_test_face(root)
    build_corpus(root / "corpus", CorpusSettings(str(generator), count=12, shard_size=8,
                                                 image_size=32), progress=False)
    detect_corpus_landmarks(root / "corpus", source="synthetic", face_model=str(face),
                            embedding=str(embedding), progress=False)
    return generator, face, embedding


def write_random_rignet(path, G, n_expression: int, seed: int = 0):
    """A RigNet for ``G`` (latent size 4, the control layout of a face model with
    ``n_expression`` components) whose decoder and light map have random weights, so that it
    moves the latent (an untrained one leaves it as it is) and changes light requests, saved
    to ``path``. Returns the network."""
    torch.manual_seed(seed)
    net = RigNet(G.num_ws, G.w_dim, latent_dim=4, layout=ControlLayout.for_model(n_expression))
    with torch.no_grad():
        net.decoder.weight.normal_(0, 0.5)
        net.light_mean.normal_(0, 0.1)
        net.light_map.add_(torch.randn(27, 27) * 0.1)
    save_rignet(net.eval(), path)
    return net


def _ellipse(centre, radii, count, start=0.0):
    t = start + 2 * math.pi * np.arange(count) / count
    return np.stack([centre[0] + radii[0] * np.cos(t), centre[1] + radii[1] * np.sin(t)], 1)


def landmark_layout() -> np.ndarray:
    """[68, 2] iBUG points in units of the head radius, x = model +X (image right), y up."""
    t = math.pi + math.pi * np.arange(17) / 16
    jaw = np.stack([0.75 * np.cos(t), -0.05 + 0.75 * np.sin(t)], 1)
    brows = [np.stack([np.linspace(a, b, 5), 0.45 + 0.05 * np.sin(np.linspace(0, math.pi, 5))], 1)
             for a, b in ((-0.6, -0.2), (0.2, 0.6))]
    bridge = np.stack([np.zeros(4), np.linspace(0.3, 0.0, 4)], 1)
    nostrils = np.stack([np.linspace(-0.15, 0.15, 5), np.full(5, -0.1)], 1)
    eyes = [_ellipse((cx, 0.3), (0.12, 0.05), 6, math.pi) for cx in (-0.35, 0.35)]
    lips = [_ellipse((0.0, -0.4), (0.3, 0.12), 12, math.pi),
            _ellipse((0.0, -0.4), (0.2, 0.05), 8, math.pi)]
    return np.concatenate([jaw, *brows, bridge, nostrils, *eyes, *lips])


def write_test_face(folder) -> tuple[Path, Path]:
    """(face model .npz, DECA-format landmark embedding .npy) of the sphere head."""
    folder = Path(folder)
    data = synthetic_face()
    face_path, embedding_path = folder / "sphere_head.npz", folder / "landmark_embedding.npy"
    data.save(face_path)

    radius = float(np.abs(data.v_template).max())
    corners = data.v_template[data.triangles] / radius                     # [F, 3, 3]
    front = corners[:, :, 2].min(1) > 0
    triangles, bary = np.zeros(68, np.int64), np.zeros((68, 3))
    for i, (x, y) in enumerate(landmark_layout()):
        for f in np.flatnonzero(front):
            a, b, c = corners[f, :, :2]
            m = np.array([[a[0], b[0], c[0]], [a[1], b[1], c[1]], [1.0, 1.0, 1.0]])
            weights = np.linalg.solve(m, [x, y, 1.0])
            if weights.min() >= -1e-9:
                triangles[i], bary[i] = f, weights
                break
        else:
            raise AssertionError(f"landmark {i} at ({x}, {y}) is on no front triangle")
    np.save(embedding_path, {"full_lmk_faces_idx": triangles[None],
                             "full_lmk_bary_coords": bary[None].astype(np.float32)},
            allow_pickle=True)
    return face_path, embedding_path
