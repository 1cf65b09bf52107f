"""Landmark stage: 68 2D landmarks for every corpus image, written per shard.

Source 'dlib' (the real one): dlib's HOG face detector and its 68-point shape predictor
(``server.photo.landmarks``). Why dlib: its weights come from a registry package
(face-recognition-models), so nothing is downloaded at run time; the predictor is the one
FFHQ itself was aligned with, so its points mean the same thing on FFHQ-trained generators as
on the alignment the generator learnt; and it runs in milliseconds per image on a CPU, so the
stage needs no GPU. Images in which no face is found are flagged (``found`` False) and every
later stage skips them.

Source 'synthetic' (tests only): the landmarks of the face model itself, posed with random
parameters drawn per sample (``SeedSequence([seed, index])``: global rotation ~ N(0, 0.15 rad),
jaw opening ~ |N(0, 0.05)|, the first ten expression components ~ N(0, 0.5)) and projected
with an orthographic camera that frames the head. A randomly initialised generator paints noise in
which dlib finds no face; these targets let the pipeline run end to end on such a generator.
They are not landmarks of the images and never appear unless asked for.

Per shard, ``landmarks.npz`` holds ``landmarks`` float32 [n, 68, 2] (dlib convention: pixel
(i, j) centred on (i, j), x right, y down, image pixels of the corpus), ``found`` bool [n],
``score`` float32 [n] (detector confidence; 0 when not found) and ``source``.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from portrait_rig.face_data import FaceData
from portrait_rig.face_source import load_face_data
from portrait_rig.files import atomic_path
from portrait_rig.params import Camera
from server.renderer.face_model import FaceModel
from server.photo.landmarks import N_LANDMARKS, FaceDetector
from server.photo.embedding import embedding_for
from server.renderer import CameraBatch, project, screen_space

from server.training.stylerig.corpus import Corpus
from server.training.progress import Progress

SOURCES = ("dlib", "synthetic")


def dlib_landmarks(images: np.ndarray, detector: FaceDetector
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(landmarks [n, 68, 2], found [n], score [n]) of the most certain face per image."""
    n = len(images)
    points = np.zeros((n, N_LANDMARKS, 2), dtype=np.float32)
    found = np.zeros(n, dtype=bool)
    score = np.zeros(n, dtype=np.float32)
    for i, image in enumerate(images):
        detections = detector.detect(image)
        if detections:
            points[i], found[i], score[i] = detections[0].landmarks, True, detections[0].score
    return points, found, score


def framing_camera(data: FaceData) -> Camera:
    """An orthographic camera whose frame the head's height fills to 85%, centred."""
    lo, hi = data.v_template.min(0), data.v_template.max(0)
    centre = (lo + hi) / 2
    return Camera(type="orthographic", scale=1.7 / float(hi[1] - lo[1]),
                  tx=-float(centre[0]), ty=-float(centre[1]))


def synthetic_landmarks(indices: np.ndarray, seed: int, size: int, data: FaceData,
                        embedding_path=None) -> np.ndarray:
    """Projected model landmarks [n, 68, 2] (dlib convention) for samples ``indices``."""
    model = FaceModel(data)
    embedding = embedding_for(data, embedding_path)
    n = len(indices)
    pose = torch.zeros(n, model.parents.shape[0], 3)
    expression = torch.zeros(n, model.n_expression)
    k = min(model.n_expression, 10)
    for row, index in enumerate(indices):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, int(index)])))
        pose[row, 0] = torch.from_numpy(rng.normal(0.0, 0.15, 3))
        pose[row, 2, 0] = float(abs(rng.normal(0.0, 0.05)))
        expression[row, :k] = torch.from_numpy(rng.normal(0.0, 0.5, k))
    with torch.no_grad():
        vertices, _ = model.pose(torch.zeros(n, model.n_shape), expression, pose)
        points = embedding.points(vertices, model.triangles)
        cameras = CameraBatch.from_params([framing_camera(data)] * n)
        ndc, depth = project(points, cameras, size, size)
        pixel = screen_space(ndc, depth, cameras, size, size)[0]
    return (pixel - 0.5).numpy().astype(np.float32)            # renderer -> dlib pixels


def _write(path: Path, points, found, score, source: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:    # a file: savez adds no suffix
        np.savez(f, landmarks=points.astype(np.float32), found=found.astype(bool),
                 score=score.astype(np.float32), source=np.array(source))


def _existing_source(path: Path) -> str | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return str(data["source"])


def _dlib_shard(args) -> tuple[str, int, int]:
    """Worker: detect one shard (runs in a subprocess when workers > 1)."""
    shard, detector_kind, upsample, source = args
    images = np.load(Path(shard) / "images.npy", mmap_mode="r")
    points, found, score = dlib_landmarks(images, FaceDetector(detector_kind, upsample))
    _write(Path(shard) / "landmarks.npz", points, found, score, source)
    return shard, len(images), int(found.sum())


def detect_corpus_landmarks(root, source: str = "dlib", detector: str = "hog",
                            upsample: int = 0, workers: int = 1, face_model: str = "demo",
                            embedding: str | None = None, progress: bool = True) -> dict:
    """Write ``landmarks.npz`` into every shard that lacks it; returns a summary
    {'source', 'found', 'flagged', 'flagged_indices'} also written to ``landmarks.json``."""
    if source not in SOURCES:
        raise ValueError(f"source: expected one of {', '.join(SOURCES)}, got {source!r}")
    corpus = Corpus(root)
    label = f"dlib-{detector}" if source == "dlib" else "synthetic"
    todo = []
    for folder, path in zip(corpus.shards, corpus.landmark_files()):
        existing = _existing_source(path)
        if existing is None:
            todo.append(folder)
        elif existing != label:
            raise ValueError(f"{path} holds {existing} landmarks, not {label}; delete the "
                             "landmarks.npz files to redo the stage with another source")
    bar = Progress(corpus.n, "landmarks", start=corpus.n - sum(
        len(np.load(f / "index.npy", mmap_mode="r")) for f in todo), enabled=progress,
        unit="img")
    if source == "dlib":
        jobs = [(str(f), detector, upsample, label) for f in todo]
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for _, n, _ in pool.map(_dlib_shard, jobs):
                    bar.update(n)
        else:
            for job in jobs:
                bar.update(_dlib_shard(job)[1])
    else:
        data = load_face_data(face_model)
        for folder in todo:
            indices = np.load(folder / "index.npy")
            points = synthetic_landmarks(indices, corpus.manifest["seed"], corpus.image_size,
                                         data, embedding)
            n = len(indices)
            _write(folder / "landmarks.npz", points, np.ones(n, bool), np.ones(n, np.float32),
                   label)
            bar.update(n)
    bar.close()
    _, found, source_label = corpus.landmarks()
    flagged = np.flatnonzero(~found)
    summary = {"source": source_label, "found": int(found.sum()), "flagged": int(len(flagged)),
               "flagged_indices": flagged[:1000].tolist()}
    (Path(root) / "landmarks.json").write_text(json.dumps(summary, indent=2))
    return summary
