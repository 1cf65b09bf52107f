"""Photo inversion on scikit-image's astronaut: the unaligned-photo transform against
stylegan3-editing's, the transform's meaning on real pixels, optimisation that lowers its
losses reproducibly, the encoder path, and the identity store."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from server.inversion.frame import MAX_SHIFT, photo_frame  # noqa: E402
from server.models.stylegan3 import make_transform  # noqa: E402
from server.photo.align import align_face, crop  # noqa: E402
from server.photo.landmarks import FaceDetector  # noqa: E402
from tests.support.lpips_fixtures import DATA  # noqa: E402

OFFICIAL = json.loads((DATA / "photo_frame_official.json").read_text())


def turned_astronaut(rotation: float, translate=(0, 0)) -> np.ndarray:
    """The photo of the official fixture: the astronaut's head and shoulders, turned."""
    image = Image.fromarray(skimage_data.astronaut()[:300, 60:420])
    return np.asarray(image.rotate(rotation, resample=Image.BICUBIC, translate=tuple(translate)))


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()


@pytest.mark.parametrize("case", OFFICIAL["cases"], ids=lambda c: f"{c['photo_rotation']}deg")
def test_roll_and_shift_match_stylegan3_editing(case, detector):
    photo = turned_astronaut(case["photo_rotation"], case["photo_translate"])
    _, alignment = align_face(photo, 256, detector=detector)
    frame = photo_frame(alignment)                      # their crop: centred on the face
    official = (case["r_degrees"] + 180) % 360 - 180
    assert frame.degrees == pytest.approx(official, abs=0.5)      # they detect twice
    assert frame.shift == pytest.approx(tuple(case["t"]), abs=0.005)
    matrix = make_transform(frame.roll, *frame.shift)
    np.testing.assert_allclose(matrix, case["transform"], atol=0.01)


def sg3_warp(image: np.ndarray, roll: float, shift) -> np.ndarray:
    """``image`` as StyleGAN3 renders content under make_transform(roll, shift): the content
    at p (image coordinates in [-0.5, 0.5], y down) appears at R p + t."""
    size = image.shape[0]
    M = np.linalg.inv(make_transform(roll, *shift))
    u = (np.arange(size) + 0.5) / size - 0.5
    grid = np.stack(np.meshgrid(u, u, indexing="xy"), -1) @ M[:2, :2].T + M[:2, 2]
    source = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    out = F.grid_sample(source, torch.from_numpy(2 * grid[None]).float(), align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def test_the_transform_carries_the_aligned_crop_onto_the_photos_framing(detector):
    photo = turned_astronaut(-12, (40, -25))
    aligned, alignment = align_face(photo, 256, detector=detector)
    frame = photo_frame(alignment, (photo.shape[1], photo.shape[0]))
    assert abs(frame.shift[0]) > 0.05 and abs(frame.shift[1]) > 0.05
    assert max(map(abs, frame.shift)) <= MAX_SHIFT
    unaligned = crop(photo, frame.unaligned).astype(np.float32)
    face = np.s_[64:192, 64:192]                       # where both crops show the photo

    def error(roll, shift):
        return np.abs(sg3_warp(aligned, roll, shift) - unaligned)[face].mean()

    right = error(frame.roll, frame.shift)
    assert right < 12
    assert error(-frame.roll, frame.shift) > 1.5 * right
    assert error(frame.roll, (-frame.shift[0], -frame.shift[1])) > 1.5 * right
    assert error(0.0, (0.0, 0.0)) > 1.5 * right


def test_optimisation_lowers_its_losses_and_repeats_for_a_seed(single_thread):
    from server.checkpoints.stylegan import load_generator
    from server.inversion.invert import PhotoInverter
    from tests.support.stylegan_fixtures import DATA as STYLEGAN_DATA

    inverter = PhotoInverter(load_generator(STYLEGAN_DATA / "stylegan2_tiny.safetensors"))
    photo = skimage_data.astronaut()
    previews = []
    first = inverter.invert(photo, "optimisation", steps=10, space="w+", seed=3,
                            on_progress=lambda *args: previews.append(args[:2]))
    assert first.method == "optimisation" and previews == [(i, 10) for i in range(10)]
    start, end = first.history[0], first.losses["last"]
    for term in ("pixel", "identity", "total"):
        assert end[term] < start[term], (term, start, end)
    assert first.metrics["psnr"] > 8 and first.ws.shape == (8, 16)
    again = inverter.invert(photo, "optimisation", steps=10, space="w+", seed=3)
    np.testing.assert_array_equal(again.ws, first.ws)
    other = inverter.invert(photo, "optimisation", steps=10, space="w+", seed=4)
    assert not np.array_equal(other.ws, first.ws)
    w_only = inverter.invert(photo, "optimisation", steps=3, space="w", seed=3)
    assert np.ptp(w_only.ws, axis=0).max() == 0          # one w on every layer


@pytest.mark.slow
def test_restyle_encoder_inverts_through_the_generator(tmp_path):
    from tests.support.encoder_fixtures import write_encoder_checkpoint
    from server.checkpoints.encoders import load_encoder
    from server.inversion.invert import PhotoInverter
    from server.models import StyleGAN3Config
    from tests.support.stylegan_fixtures import random_generator

    G = random_generator(StyleGAN3Config.preset("r", 16, z_dim=512, w_dim=512, channel_base=512,
                                                channel_max=16, mapping_layers=2), seed=5)
    encoder = load_encoder(write_encoder_checkpoint(tmp_path / "restyle.pt", "restyle_e4e", 16,
                                                    generator="stylegan3"))
    inverter = PhotoInverter(G, encoder, descriptor=None)
    reply = inverter.invert(skimage_data.astronaut(), iterations=2)
    assert (reply.method, reply.iterations, reply.steps) == ("encoder", 2, 0)
    with torch.no_grad():
        photo = torch.from_numpy(reply.aligned).permute(2, 0, 1)[None].float() / 127.5 - 1
        expected = encoder.encode(photo, inverter.render, iterations=2)[0]
    np.testing.assert_allclose(reply.ws, expected.numpy(), atol=1e-5)
    assert reply.framed is not None and reply.sheet().shape == (256, 4 * 256, 3)


def test_identities_are_stored_whole_and_by_name_only(tmp_path):
    from server.inversion.identities import list_identities, read_record, save_identity

    ws = np.random.RandomState(0).randn(8, 16).astype(np.float32)
    folder = save_identity("alice", ws, {"method": "optimisation", "roll": 0.1},
                           np.zeros((4, 8, 3), np.uint8), root=tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["identity.json", "latent.npz",
                                                         "preview.png"]
    np.testing.assert_array_equal(np.load(folder / "latent.npz")["w"], ws)
    record = read_record("alice", tmp_path)
    assert (record["name"], record["num_ws"], record["w_dim"], record["roll"]) == \
        ("alice", 8, 16, 0.1)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "identity.json").write_text("{}")          # no latent: not listed
    assert [r["name"] for r in list_identities(tmp_path)] == ["alice"]
    for bad in ("../alice", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(ValueError, match="a name, not a path"):
            save_identity(bad, ws, {}, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no identity named 'bob'"):
        read_record("bob", tmp_path)
    with pytest.raises(ValueError, match="finite W"):
        save_identity("nan", ws * np.nan, {}, root=tmp_path)
    assert not math.isnan(read_record("alice", tmp_path)["roll"])
