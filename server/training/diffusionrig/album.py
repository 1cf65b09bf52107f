"""Training data for DiffusionRig: photos fitted once, then aligned images plus DECA buffers.

* ``fit_photos``: every photo of a folder through ``server.photo.PhotoFitter`` (face
  detection, FFHQ alignment, DECA's encoder or optimisation), each result cached in
  ``cache_dir`` under the photo's content hash and the fitter's settings, so a second run
  (a resumed training, another model name) fits nothing again. Photos without a face are
  reported and skipped.
* ``album_data``: a personal album in memory, as DiffusionRig's stage 2 trains on it: every
  photo's identity replaced by the album's mean shape (``create_data.py --use_meanshape``),
  each keeping its own texture code (``appearance.texture``, DECA's ``tex``: the official
  data uses every photo's), buffers rendered in DECA's conventions (``server.renderer.deca``,
  exactly as the ``diffusionrig`` backend renders them at inference), images in [-1, 1].
* ``FolderData``: a stage-1 dataset folder (``<stem>.png`` aligned crops with their
  ``<stem>.json`` rig parameters, as ``write_dataset`` writes them), read lazily and rendered
  per batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from portrait_rig.params import RigParams
from server.renderer.deca import DecaBufferRenderer
from server.renderer.face_model import FaceModel

from server.training.diffusionrig.trainer import TensorData

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class FittedPhoto:
    """One fitted photo: ``source`` path, FFHQ-aligned crop RGB uint8 [S, S, 3], the rig
    parameters that frame it (orthographic camera of the crop), how they were found and the
    mean landmark error in crop pixels."""
    source: str
    aligned: np.ndarray
    params: RigParams
    method: str
    landmark_error: float


def list_photos(folder) -> list[Path]:
    """The image files of ``folder``, sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"photo folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)


def fitter_key(fitter) -> str:
    """What makes two fits of one photo equal: the method, crop size, fitting settings and
    the face model's, embedding's and texture space's content."""
    data = fitter.model.data
    digest = hashlib.sha256()
    arrays = [data.v_template, data.triangles, data.shapedirs, data.exprdirs, data.vertex_albedo,
              fitter.embedding.triangles, fitter.embedding.barycentric]
    texture = getattr(fitter, "texture", None)
    if texture is not None:
        arrays += [texture.mean.cpu().numpy(), texture.face_uv.cpu().numpy(),
                   np.array([texture.n_components])]
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps({"method": fitter.method, "size": fitter.size,
                              "detector": fitter.detector.detector,
                              "settings": dataclasses.asdict(fitter.settings)},
                             sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _json_array(obj) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)


def _from_json_array(array: np.ndarray):
    return json.loads(bytes(array).decode())


def fit_photos(photos: list[Path], fitter, cache_dir, log=None) -> tuple[list[FittedPhoto], dict]:
    """Fit (or read back from the cache) every photo; returns the fitted photos in order
    and counts {"fitted", "cached", "skipped": [(name, reason)]}."""
    from server.photo import NoFaceFound

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = fitter_key(fitter)
    fitted, stats = [], {"fitted": 0, "cached": 0, "skipped": []}
    for i, path in enumerate(photos, 1):
        raw = Path(path).read_bytes()
        cache = cache_dir / f"{hashlib.sha256(raw).hexdigest()[:24]}-{key}.npz"
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as stored:
                meta = _from_json_array(stored["meta"])
                fitted.append(FittedPhoto(str(path), stored["aligned"],
                                          RigParams.from_dict(meta["params"]), meta["method"],
                                          meta["landmark_error"]))
            stats["cached"] += 1
            continue
        try:
            fit = fitter.fit(raw)
        except (NoFaceFound, ValueError) as exc:
            log(f"[{i}/{len(photos)}] {Path(path).name}: skipped ({exc})")
            stats["skipped"].append((Path(path).name, str(exc)))
            continue
        result = fit.result
        photo = FittedPhoto(str(path), fit.aligned, result.params, result.method,
                            result.landmark_error)
        meta = {"params": result.params.to_dict(), "method": result.method,
                "landmark_error": result.landmark_error, "source": str(path)}
        tmp = cache.with_name(cache.stem + ".tmp.npz")
        np.savez(tmp, aligned=fit.aligned, meta=_json_array(meta))
        tmp.replace(cache)
        fitted.append(photo)
        stats["fitted"] += 1
        log(f"[{i}/{len(photos)}] {Path(path).name}: fitted ({result.method}, landmark error "
            f"{result.landmark_error:.2f} px)")
    return fitted, stats


def mean_shape(photos: list[FittedPhoto]) -> list[float]:
    """The album's mean identity coefficients (shorter lists count as zero-padded)."""
    if not photos:
        raise ValueError("mean shape of an empty album")
    n = max(len(p.params.shape) for p in photos)
    table = np.zeros((len(photos), n))
    for row, p in zip(table, photos):
        row[: len(p.params.shape)] = p.params.shape
    return [float(v) for v in table.mean(axis=0)]


def image_tensor(aligned: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 [S, S, 3] -> [3, size, size] in [-1, 1] (antialiased resize when needed)."""
    if aligned.shape[0] != size:
        aligned = np.asarray(Image.fromarray(aligned).resize((size, size), Image.LANCZOS))
    return torch.from_numpy(aligned.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def render_buffers(renderer: DecaBufferRenderer, params: list[RigParams], size: int,
                   chunk: int = 8) -> torch.Tensor:
    """DiffusionRig's buffers [N, 9, size, size] (rendered, normal, albedo) on the CPU."""
    out = []
    with torch.no_grad():
        for start in range(0, len(params), chunk):
            part = params[start:start + chunk]
            codes = renderer.codes(part, size, size)
            out.append(renderer.conditioning(renderer.render(codes, size)).cpu())
    return torch.cat(out)


def album_data(photos: list[FittedPhoto], face_model: FaceModel, size: int,
               texture=None, use_mean_shape: bool = True) -> TensorData:
    """A personal album as training data (module notes)."""
    params = [p.params.copy() for p in photos]
    if use_mean_shape:
        shape = mean_shape(photos)
        for p in params:
            p.shape = list(shape)
    renderer = DecaBufferRenderer(face_model, texture)
    images = torch.stack([image_tensor(p.aligned, size) for p in photos])
    return TensorData(images, render_buffers(renderer, params, size))


def write_dataset(photos: list[FittedPhoto], folder) -> None:
    """A stage-1 dataset folder: ``<stem>.png`` (the aligned crop) and ``<stem>.json`` (its
    rig parameters) per photo."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(photos):
        stem = f"{i:06d}_{Path(p.source).stem}"
        Image.fromarray(p.aligned).save(folder / f"{stem}.png")
        (folder / f"{stem}.json").write_text(p.params.to_json())


class FolderData:
    """A stage-1 dataset folder (module notes): images load and buffers render per batch."""

    def __init__(self, folder, face_model: FaceModel, size: int, texture=None):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {folder}")
        self.items = [(png, RigParams.from_json(png.with_suffix(".json").read_text()))
                      for png in sorted(folder.glob("*.png"))
                      if png.with_suffix(".json").is_file()]
        if not self.items:
            raise ValueError(f"{folder} holds no <name>.png with a <name>.json beside it")
        self.size = size
        self.renderer = DecaBufferRenderer(face_model, texture)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images = []
        for i in indices:
            with Image.open(self.items[i][0]) as image:
                images.append(image_tensor(np.asarray(image.convert("RGB")), self.size))
        params = [self.items[i][1] for i in indices]
        return torch.stack(images), render_buffers(self.renderer, params, self.size)
