"""The networks behind the inversion losses: dlib's face descriptor rebuilt in torch (against
dlib itself) and LPIPS (against the lpips package on the weights of ``lpips_fixtures``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.support.lpips_fixtures import DATA, write_lpips_files
from server.models.lpips import load_lpips

dlib = pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def astronaut_face():
    from server.photo.landmarks import FaceDetector

    photo = skimage_data.astronaut()
    return photo, FaceDetector()(photo)


def test_face_descriptor_equals_dlibs_and_its_chip_equals_dlibs(astronaut_face):
    from server.models.face_descriptor import CHIP_PADDING, CHIP_SIZE, chip_grid, \
        load_face_descriptor
    from server.photo.landmarks import _load_predictor, model_file

    photo, face = astronaut_face
    shape = _load_predictor()(photo, dlib.rectangle(*[int(v) for v in face.box]))
    chip = dlib.get_face_chip(photo, shape, CHIP_SIZE, CHIP_PADDING)
    recognizer = dlib.face_recognition_model_v1(
        str(model_file("dlib_face_recognition_resnet_model_v1.dat")))
    expected = np.array(recognizer.compute_face_descriptor(chip))
    net = load_face_descriptor()
    with torch.no_grad():
        ours = net(torch.from_numpy(chip).permute(2, 0, 1)[None].float())[0].numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)

    details = dlib.get_face_chip_details(shape, CHIP_SIZE, CHIP_PADDING)
    r = details.rect
    grid = chip_grid((r.left(), r.top(), r.right(), r.bottom()), details.angle, photo.shape[0])
    image = torch.from_numpy(photo).permute(2, 0, 1)[None].float()
    sampled = F.grid_sample(image, grid, align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(sampled - chip).max() <= 1.01          # dlib rounds its chip to uint8


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_the_lpips_package(tmp_path, net):
    reference = np.load(DATA / "lpips.npz")
    backbone, calibration = write_lpips_files(tmp_path, net, seed=int(reference["seed"]))
    model = load_lpips(backbone, calibration)
    assert model.net == net
    with torch.no_grad():
        d = model(torch.from_numpy(reference[f"{net}_x"]), torch.from_numpy(reference[f"{net}_y"]))
    np.testing.assert_allclose(d.numpy(), reference[f"{net}_d"], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="no lin0.model.1.weight"):
        load_lpips(backbone, backbone)
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="do not fit LPIPS"):
        load_lpips(tmp_path / "wrong.pth", calibration, net=net)
