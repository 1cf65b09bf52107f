"""Faces in photos: dlib detection and landmarks, FFHQ alignment (server/photo)."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from server.photo import (FaceAlignment, FaceDetector, NoFaceFound, align_face,  # noqa: E402
                          decode_photo, ffhq_square, to_rgb)
from server.photo.landmarks import EYE_LEFT, EYE_RIGHT  # noqa: E402

SIZE = 256


@pytest.fixture(scope="module")
def astronaut():
    return skimage_data.astronaut()                      # 512x512 RGB portrait


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()


@pytest.fixture(scope="module")
def face(astronaut, detector):
    return detector(astronaut)


def eye_centres(landmarks):
    return landmarks[EYE_LEFT].mean(0), landmarks[EYE_RIGHT].mean(0)


def test_landmarks_lie_on_the_face(face):
    left, top, right, bottom = face.box
    width = right - left
    assert 60 < width < 140 and face.score > 0.5            # her face, not the suit's emblem
    lm = face.landmarks
    assert lm.shape == (68, 2)
    # dlib's box runs from the brows to the lower lip: the chin hangs a little below it
    inside = ((lm[:, 0] > left - 0.1 * width) & (lm[:, 0] < right + 0.1 * width)
              & (lm[:, 1] > top - 0.1 * width) & (lm[:, 1] < bottom + 0.2 * width))
    assert inside.all(), lm[~inside]
    eye_l, eye_r = eye_centres(lm)
    nose, mouth, chin = lm[30], lm[48:60].mean(0), lm[8]
    assert eye_l[0] < nose[0] < eye_r[0]
    assert max(eye_l[1], eye_r[1]) < nose[1] < mouth[1] < chin[1]


def test_aligned_crop_puts_the_eyes_where_ffhq_does(astronaut, detector, face):
    aligned, alignment = align_face(astronaut, SIZE, landmarks=face.landmarks)
    assert aligned.shape == (SIZE, SIZE, 3) and aligned.dtype == np.uint8
    found = detector(aligned).landmarks
    # The crop holds what the recorded transform says it holds ...
    assert np.abs(found - alignment.aligned_landmarks).mean() < 1.5
    # ... and FFHQ's layout: eyes level, centred, a quarter of the crop apart (this face's
    # eye distance dominates its eye-to-mouth distance), and the crop centre a tenth of the
    # way from the eyes to the mouth.
    eye_l, eye_r = eye_centres(found)
    eyes, mouth = (eye_l + eye_r) / 2, (found[48] + found[54]) / 2
    assert abs(eye_l[1] - eye_r[1]) < 1.5
    assert abs((eye_r[0] - eye_l[0]) - SIZE / 4) < 2.5
    centre = eyes + 0.1 * (mouth - eyes)
    assert np.abs(centre - (SIZE - 1) / 2).max() < 1.5, centre


def test_alignment_undoes_in_plane_rotation(astronaut, detector):
    straight, _ = align_face(astronaut, 128, detector=detector)
    tilted = np.asarray(Image.fromarray(astronaut).rotate(25, resample=Image.BICUBIC,
                                                          expand=True))
    level, alignment = align_face(tilted, 128, detector=detector)
    # the eye axis of the tilted photo is turned back by about 25 degrees
    angle = np.degrees(np.arctan2(alignment.A[1, 0], alignment.A[0, 0]))
    assert abs(angle + 25) < 3
    centre = slice(24, 104)                                  # away from padded borders
    diff = np.abs(level[centre, centre].astype(float) - straight[centre, centre])
    assert diff.mean() < 12, diff.mean()


def test_transform_maps_both_ways_and_matches_the_square(face):
    alignment = FaceAlignment.from_landmarks(face.landmarks, SIZE)
    points = np.random.default_rng(0).uniform(0, 500, (10, 2))
    assert np.allclose(alignment.to_photo(alignment.to_aligned(points)), points)
    c, x, y = ffhq_square(face.landmarks)
    corners = alignment.corners() - 0.5                     # pixel-centre coordinates
    assert np.allclose(corners, [c - x - y, c - x + y, c + x + y, c + x - y])
    assert np.isclose(alignment.scale, 2 * np.hypot(*x) / SIZE)


def test_face_at_the_edge_gets_blurred_padding(astronaut, face):
    # Cut the photo right through the face: the crop square leaves the image.
    corner = astronaut[100:, 215:]
    landmarks = face.landmarks - [215, 100]
    padded, _ = align_face(corner, 128, landmarks=landmarks)
    bare, _ = align_face(corner, 128, landmarks=landmarks, padding=False)
    top_left = (slice(0, 20), slice(0, 20))
    assert bare[top_left].max() == 0                          # outside the photo: nothing
    assert padded[top_left].mean() > 60                       # mirrored, blurred, faded
    assert np.abs(padded[64:, 64:].astype(int) - bare[64:, 64:]).mean() < 3   # the face


def test_no_face_is_a_clear_error(detector):
    with pytest.raises(NoFaceFound, match="no face found in the 200x100 image"):
        detector(np.full((100, 200, 3), 128, np.uint8))
    with pytest.raises(NoFaceFound):
        align_face(np.zeros((64, 64, 3), np.uint8), 64, detector=detector)


def test_cnn_detector_finds_the_same_face(astronaut, detector, face):
    # the MMOD detector finds faces from ~80 pixels without upsampling: use the aligned crop
    aligned, _ = align_face(astronaut, SIZE, landmarks=face.landmarks)
    hog, cnn = detector(aligned), FaceDetector("cnn", upsample=0)(aligned)
    overlap = ((min(hog.box[2], cnn.box[2]) - max(hog.box[0], cnn.box[0]))
               / (hog.box[2] - hog.box[0]))
    assert overlap > 0.7
    assert np.abs(cnn.landmarks - hog.landmarks).mean() < 4


def test_images_and_photos_are_checked_and_decoded():
    with pytest.raises(ValueError, match=r"image: expected .* got shape \(4, 4, 2\)"):
        to_rgb(np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="uint8 or float"):
        to_rgb(np.zeros((4, 4, 3), np.int32))
    assert to_rgb(np.full((2, 3), 0.5)).tolist() == [[[128] * 3] * 3] * 2
    with pytest.raises(ValueError, match="photo: not a readable image"):
        decode_photo(b"certainly not a JPEG")
    with pytest.raises(ValueError, match="detector"):
        FaceDetector("mtcnn")

    # A sideways JPEG that says so in EXIF (orientation 6: rotate 90 degrees clockwise).
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :10] = 255                                    # white band on the stored left
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", exif=exif, quality=95)
    upright = decode_photo(buffer.getvalue())
    assert upright.shape == (60, 40, 3)
    assert upright[:10].mean() > 200 and upright[-20:].mean() < 50     # band now on top
