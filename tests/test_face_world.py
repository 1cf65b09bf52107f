"""The face world (``tests/support/face_world.py``) as DiffusionRig's stage 1 sees it: its
dataset folder trains with the shipped ``stage1 train`` command, and its parameter files
describe its images (the buffers the trainer renders from them cover the world's face)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from portrait_rig.params import RigParams
from server.models.diffusionrig import DiffusionRig
from server.models.diffusionrig_unet import UNetConfig
from server.training.diffusionrig import stage1
from server.training.diffusionrig.album import FolderData
from tests.support.face_world import FaceWorld, read_world

SIZE = 32
TINY = UNetConfig(image_size=SIZE, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_ds=(), num_heads=1, latent_dim=64)

pytestmark = [pytest.mark.training, pytest.mark.usefixtures("single_thread_module")]


@pytest.fixture(scope="module")
def world():
    return FaceWorld(size=SIZE, supersample=2)


@pytest.fixture(scope="module")
def dataset(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    stems = world.write_dataset(folder, 10, seed=3)
    return folder, stems


def test_world_folder_is_a_stage1_dataset_and_resumes(world, dataset, tmp_path):
    folder, stems = dataset
    assert sorted(p.stem for p in folder.glob("*.png")) == stems
    assert sorted(p.stem for p in folder.glob("*.json") if p.name != "world.json") == stems
    looks = read_world(folder)
    for i, stem in enumerate(stems):
        params, look = world.sample(i, seed=3)
        stored = RigParams.from_json((folder / f"{stem}.json").read_text())
        assert stored.to_dict() == params.to_dict()
        assert looks[stem] == look
    # a second run keeps what is written and adds the rest, the same samples as one run
    again = tmp_path / "again"
    world.write_dataset(again, 3, seed=3)
    stamps = {p.name: p.stat().st_mtime_ns for p in again.glob("*.png")}
    assert world.write_dataset(again, 5, seed=3) == stems[:5]
    assert all(again.joinpath(name).stat().st_mtime_ns == t for name, t in stamps.items())
    for stem in stems[:5]:
        a, b = (np.asarray(Image.open(f / f"{stem}.png"), dtype=int) for f in (again, folder))
        assert np.abs(a - b).max() <= 1
    with pytest.raises(ValueError, match="written with"):
        world.write_dataset(again, 5, seed=4)


def test_trainers_buffers_cover_the_worlds_face(world, dataset):
    """The JSON parameters round-trip to the render: the face mask of the buffers the trainer
    renders from each JSON is the world image's face, and inside it the image is the buffers'
    shading times the look's skin tone."""
    folder, stems = dataset
    data = FolderData(folder, world.model, SIZE)
    images, buffers = data.batch(list(range(len(stems))))
    looks = read_world(folder)
    for i, stem in enumerate(stems):
        params, _ = world.sample(i, seed=3)
        _, coverage = world.render([params], [looks[stem]])
        mask = buffers[i, 3:6].abs().sum(0) > 0                # normals are zero outside
        world_mask = torch.from_numpy(coverage[0] > 0.5)
        iou = (mask & world_mask).sum() / (mask | world_mask).sum()
        assert iou > 0.9, (stem, float(iou))
        skin = torch.from_numpy(world.regions([params])["face"][0])
        image = (images[i] + 1) / 2                             # [3, S, S] in [0, 1]
        rendered = buffers[i, :3]
        keep = skin & (image < 0.97).all(0) & (rendered > 0.1).all(0)
        assert keep.sum() > 20, stem
        ratio = (image[:, keep] / rendered[:, keep]).median(dim=1).values
        gain = torch.tensor(looks[stem].skin_gain, dtype=torch.float32)
        assert torch.allclose(ratio, gain, rtol=0.2), (stem, ratio, gain)
    # a parameter file whose framing is off by ~3 pixels no longer covers the world's face
    params, look = world.sample(0, seed=3)
    turned = params.copy()
    turned.camera.tx += 0.03
    (folder / "zz_turned.json").write_text(turned.to_json())
    (folder / "zz_turned.png").write_bytes((folder / f"{stems[0]}.png").read_bytes())
    try:
        wrong = FolderData(folder, world.model, SIZE)
        _, buffers = wrong.batch([len(stems)])
    finally:
        (folder / "zz_turned.json").unlink()
        (folder / "zz_turned.png").unlink()
    _, coverage = world.render([params], [look])
    mask = buffers[0, 3:6].abs().sum(0) > 0
    world_mask = torch.from_numpy(coverage[0] > 0.5)
    assert (mask & world_mask).sum() / (mask | world_mask).sum() < 0.85


def test_shipped_stage1_command_trains_on_the_world(dataset, tmp_path):
    folder, _ = dataset
    torch.manual_seed(0)
    start = stage1.official_initialisation(DiffusionRig(TINY))
    torch.save(start.state_dict(), tmp_path / "init.pt")
    run = tmp_path / "run"
    assert stage1.main(["train", "--data", str(folder), "--out", str(run),
                        "--checkpoint", str(tmp_path / "init.pt"), "--face-model", "demo",
                        "--texture", "none", "--image-size", str(SIZE), "--steps", "3",
                        "--batch", "4", "--lr", "5e-4", "--save-every", "3",
                        "--device", "cpu"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    tuned = torch.load(run / "model.pt", weights_only=True)
    initial = start.state_dict()
    for name in ("encoder.conv1.weight", "denoisingUNet.out.2.weight"):
        assert not torch.equal(tuned[name], initial[name]), name
