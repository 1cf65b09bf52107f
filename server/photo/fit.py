"""``PhotoFitter``: a photo -> detection, FFHQ alignment, then DECA's encoder or optimisation
(see ``server.photo``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from server.renderer.face_model import FaceModel
from server.photo import (FaceAlignment, FaceDetection, FaceDetector, align_face, decode_photo,
                          to_rgb)

from server.checkpoints.deca import load_deca_encoder
from server.models.deca_encoder import DecaEncoder
from server.photo.deca import PhotoCodes, camera_in_image, encode_photo
from server.photo.embedding import LandmarkEmbedding, LandmarkModel, embedding_for
from server.photo.optimise import FitResult, FitSettings, fit_aligned

FLAME_VERTICES = 5023
METHODS = ("auto", "deca", "optimisation")


@dataclass
class PhotoFit:
    """A fitted photo: the fit (``result.params`` frames the ``aligned`` crop), the crop
    (RGB uint8 [S, S, 3]), how it maps to the photo and the detected face."""
    result: FitResult
    aligned: np.ndarray
    alignment: FaceAlignment
    detection: FaceDetection


class PhotoFitter:
    """Fits photos to ``model`` (a ``server.renderer.face_model.FaceModel``).

    ``deca_model``: path of DECA's ``deca_model.tar`` (used for FLAME models); ``embedding``:
    a FLAME landmark embedding file (else one is detected on a render of the model);
    ``method``: "auto" (DECA when it applies, else optimisation), "deca" or "optimisation";
    ``size``: the aligned crop's side; ``detector``: "hog" or "cnn"; ``texture``: the model's
    texture space (a ``FlameTexture``), whose code the optimisation fits (DECA's encoder
    predicts it).
    """

    def __init__(self, model: FaceModel, deca_model=None, embedding=None,
                 method: str = "auto", size: int = 256, detector: str = "hog",
                 settings: FitSettings | None = None, texture=None):
        if method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
        is_flame = model.data.n_vertices == FLAME_VERTICES
        if method == "deca" and (deca_model is None or not is_flame):
            raise ValueError("method 'deca' needs a deca_model.tar and a FLAME face model")
        self.model, self.size, self.settings = model, size, settings or FitSettings()
        self.detector = FaceDetector(detector)
        self.embedding: LandmarkEmbedding = embedding_for(model.data, embedding)
        self.landmark_model = LandmarkModel(model, self.embedding)
        use_deca = method == "deca" or (method == "auto" and deca_model is not None and is_flame)
        self.encoder: DecaEncoder | None = (load_deca_encoder(deca_model, model.device)
                                            if use_deca else None)
        self.method = "deca" if use_deca else "optimisation"
        if texture is not None:
            texture.check_triangles(model.data.n_triangles)
        self.texture = texture

    def fit(self, photo) -> PhotoFit:
        """``photo``: encoded image bytes (PNG, JPEG...), a PIL image or an RGB array.
        Raises ``server.photo.NoFaceFound`` when no face is found."""
        rgb = decode_photo(photo) if isinstance(photo, (bytes, bytearray, memoryview)) \
            else to_rgb(photo)
        detection = self.detector(rgb)
        aligned, alignment = align_face(rgb, self.size, landmarks=detection.landmarks)
        landmarks = alignment.aligned_landmarks
        if self.encoder is not None:
            result = self._fit_deca(aligned, landmarks)
        else:
            result = fit_aligned(aligned, landmarks, self.model, self.embedding, self.settings,
                                 texture=self.texture)
        return PhotoFit(result=result, aligned=aligned, alignment=alignment, detection=detection)

    def _fit_deca(self, aligned: np.ndarray, landmarks: np.ndarray) -> FitResult:
        codes, crop = encode_photo(self.encoder, aligned, landmarks)
        params = rig_from_deca(codes, self.model, camera_in_image(codes.cam, crop, self.size))
        fitted = project_landmarks(self.landmark_model, self.model, params, self.size)
        gain = np.ones(3)
        return FitResult(params=params, albedo_gain=gain,
                         vertex_albedo=self.model.data.vertex_albedo.astype(np.float64),
                         landmarks=fitted, target_landmarks=landmarks,
                         landmark_valid=self.embedding.valid.copy(), method="deca")


def rig_from_deca(codes: PhotoCodes, model: FaceModel, camera: tuple[float, float, float]):
    """Rig parameters from DECA codes for a FLAME ``model`` and an image camera
    (scale, tx, ty) (``server.photo.deca.camera_in_image``); the texture code goes to
    ``appearance.texture``."""
    from portrait_rig.params import Appearance, Camera, Lighting, Pose, RigParams

    def floats(values):
        return [float(v) for v in values]

    return RigParams(shape=floats(codes.shape[: model.n_shape]),
                     expression=floats(codes.exp[: model.n_expression]),
                     pose=Pose(global_=floats(codes.pose[:3]), jaw=floats(codes.pose[3:])),
                     camera=Camera(type="orthographic", scale=camera[0], tx=camera[1],
                                   ty=camera[2]),
                     lighting=Lighting(sh=[floats(row) for row in codes.light]),
                     appearance=Appearance(texture=floats(codes.tex)))


def project_landmarks(landmark_model: LandmarkModel, model: FaceModel, params,
                      size: int) -> np.ndarray:
    """Landmarks [68, 2] of ``params`` (orthographic camera) in pixels of a ``size`` crop
    (dlib convention)."""
    from server.renderer import CameraBatch, project, screen_space

    with torch.no_grad():
        coeffs = model.coefficients([params])
        points = landmark_model.landmarks(coeffs["shape"], coeffs["expression"], coeffs["pose"])
        points = points + coeffs["translation"][:, None]
        cameras = CameraBatch.from_params([params.camera], model.device)
        ndc, depth = project(points, cameras, size, size)
        pixels = screen_space(ndc, depth, cameras, size, size)[0][0]
    return pixels.cpu().double().numpy() - 0.5
