"""DiffusionRig training: the album pipeline, stage 2 (personalisation) and stage 1, on a tiny
UNet and an album of three faces rendered by our renderer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dlib")

from PIL import Image  # noqa: E402

from portrait_rig.demo_head import demo_head  # noqa: E402
from portrait_rig.params import Camera, RigParams  # noqa: E402
from server.renderer.face_model import FaceModel  # noqa: E402
from server.photo import FitSettings  # noqa: E402
from server.models.diffusionrig import DiffusionRig  # noqa: E402
from server.checkpoints.diffusionrig import load_diffusionrig  # noqa: E402
from server.models.diffusionrig_unet import UNetConfig  # noqa: E402
from server.renderer import BufferRenderer  # noqa: E402
from portrait_rig.colour import linear_to_srgb  # noqa: E402
from server.training.diffusionrig import trainer as trainer_module  # noqa: E402
from server.training.diffusionrig.album import FolderData, fit_photos, list_photos  # noqa: E402
from server.training.diffusionrig.trainer import LOG_FILE, TrainConfig  # noqa: E402
from server.training.diffusionrig.personalise import make_fitter, personalise  # noqa: E402
from server.training.diffusionrig.stage1 import official_initialisation, prepare, train  # noqa: E402

SIZE = 32                                       # the tiny model's image size
TINY = UNetConfig(image_size=SIZE, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_ds=(2,), num_heads=1, latent_dim=64)
FIT = FitSettings(rigid_steps=40, shape_steps=60, light_steps=30, refine_steps=0)


pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def face_model():
    return FaceModel(demo_head())


@pytest.fixture(scope="module")
def album(tmp_path_factory, face_model):
    """Three 256-pixel portraits of the demo head: different pose, expression and light."""
    folder = tmp_path_factory.mktemp("album")
    renderer = BufferRenderer(face_model.data.triangles)
    albedo = torch.as_tensor(linear_to_srgb(face_model.data.vertex_albedo), dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    for i, yaw in enumerate((-12, 0, 10)):
        pose = torch.zeros(1, 5, 3)
        pose[0, 0, 1] = math.radians(yaw)
        exp = 0.5 * torch.rand(1, face_model.n_expression, generator=g)
        vertices, _ = face_model.pose(torch.zeros(1, face_model.n_shape), exp, pose)
        light = torch.zeros(9, 3)
        light[0], light[1 + i] = 3.4, 0.6
        buffers = renderer.render(vertices, albedo, light, [Camera(type="orthographic",
                                                                   scale=6.5)], 256, 256)
        image = buffers.rendered[0].clamp(0, 1) * buffers.mask[0] + 0.45 * (1 - buffers.mask[0])
        Image.fromarray(np.round(image.numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not a photo")
    return folder


@pytest.fixture(scope="module")
def fitter(face_model):
    return make_fitter(face_model, fit_settings=FIT)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("stage1") / "model.pt"
    torch.save(DiffusionRig(TINY).state_dict(), path)
    return path


def config(**changes) -> TrainConfig:
    base = dict(steps=30, batch_size=2, lr=1e-3, save_every=10, log_every=10)
    return TrainConfig(**{**base, **changes})


def quiet(line):
    pass


@pytest.fixture(scope="module")
def personal(album, stage1, face_model, fitter, tmp_path_factory):
    out = tmp_path_factory.mktemp("personal") / "alice"
    summary = personalise(album, stage1, out, config(), face_model, fitter, image_size=SIZE,
                          log=quiet)
    return out, summary


def test_personalise_fits_the_album_and_trains_the_unet_only(personal, stage1):
    out, summary = personal
    assert summary["photos"] == 3 and summary["fitted"] == 3 and summary["cached"] == 0
    assert summary["loss_after"] < 0.9 * summary["loss_before"], summary
    # the personal model is an official-layout checkpoint the backend loads strictly
    model = load_diffusionrig(out / "model.pt", None, "cpu", SIZE)
    assert model.config == TINY
    base = torch.load(stage1, weights_only=True)
    tuned = torch.load(out / "model.pt", weights_only=True)
    assert base.keys() == tuned.keys()
    for name in base:
        same = torch.equal(base[name], tuned[name])
        if name.startswith("encoder."):          # frozen, BatchNorm statistics included
            assert same, name
        elif name.endswith("weight"):            # every UNet weight moved
            assert not same, name
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in log)
    # every photo of the album shares the mean identity
    assert len(summary["mean_shape"]) == 14 and (out / "album.json").is_file()


def test_a_killed_run_resumes_as_if_never_interrupted(personal, album, stage1, face_model,
                                                      fitter, monkeypatch):
    out, _ = personal
    uninterrupted = (out / "model.pt").read_bytes()
    losses = [r["loss"] for r in read_log(out)]

    # Start over (the album comes from the cache) and die during step 15: the last save was
    # at step 10, so steps 11-14, already logged, are lost with the process.
    real_step = trainer_module.Trainer.train_step

    def dying_step(self):
        record = real_step(self)
        if self.step == 15:
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(trainer_module.Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        personalise(album, stage1, out, config(), face_model, fitter, image_size=SIZE,
                    resume=False, log=quiet)
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 10
    assert [r["step"] for r in read_log(out)][-1] == 14
    # Nothing half-trained where the server looks for a personal model.
    assert not (out / "model.pt").exists() and not (out / "complete.json").exists()
    monkeypatch.setattr(trainer_module.Trainer, "train_step", real_step)

    summary = personalise(album, stage1, out, config(), face_model, fitter, image_size=SIZE,
                          log=quiet)
    assert summary["fitted"] == 0 and summary["cached"] == 3          # no fitting again
    assert (out / "model.pt").read_bytes() == uninterrupted
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert [r["loss"] for r in log] == losses

    with pytest.raises(ValueError, match="trained with lr=0.001"):
        personalise(album, stage1, out, config(lr=1e-4), face_model, fitter,
                    image_size=SIZE, log=quiet)


def test_stage1_trains_unet_and_encoder_from_a_dataset_folder(personal, album, face_model,
                                                              fitter, tmp_path):
    out, _ = personal
    data_dir = tmp_path / "data"
    # the photos were fitted into the personal run's cache: the dataset reuses those fits
    fitted, stats = fit_photos(list_photos(album), fitter, out / "album", quiet)
    assert stats["cached"] == 3
    stats = prepare(album, data_dir, fitter, log=quiet)
    assert stats["photos"] == 3 and len(list(data_dir.glob("*.json"))) == 3
    data = FolderData(data_dir, face_model, SIZE)
    images, buffers = data.batch([0, 2])
    assert images.shape == (2, 3, SIZE, SIZE) and buffers.shape == (2, 9, SIZE, SIZE)
    assert images.min() >= -1 and images.max() <= 1 and buffers.abs().sum() > 0

    start = official_initialisation(DiffusionRig(TINY))
    eps = start(torch.randn(1, 3, SIZE, SIZE), torch.tensor([500]), buffers[:1],
                torch.randn(1, 64))
    assert torch.count_nonzero(eps) == 0                # improved-diffusion's zero init
    torch.save(start.state_dict(), tmp_path / "init.pt")
    trainer = train(data, tmp_path / "run", config(steps=6, save_every=3),
                    checkpoint=tmp_path / "init.pt", model_config=TINY, log=quiet)
    tuned = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert trainer.step == 6 and trainer.config.train_encoder
    initial = start.state_dict()
    for name in ("encoder.conv1.weight", "encoder.bn1.running_mean",    # the encoder learns
                 "denoisingUNet.out.2.weight"):                         # and so does the UNet
        assert not torch.equal(tuned[name], initial[name]), name


def test_p2_weighting_and_the_albums_mean_shape():
    from server.diffusion import NoiseSchedule
    from server.training.diffusionrig.album import FittedPhoto, mean_shape
    from server.training.diffusionrig.trainer import TensorData, Trainer, p2_weights

    schedule = NoiseSchedule.linear()
    weights = p2_weights(schedule)
    # with k = gamma = 1, 1 / (1 + SNR) = 1 - abar: clean steps count little, noisy ones fully
    np.testing.assert_allclose(weights.numpy(), 1 - schedule.alphas_cumprod, rtol=1e-12)
    assert weights[0] == pytest.approx(1e-4) and weights[-1] == pytest.approx(1.0, abs=1e-4)

    model = DiffusionRig(TINY)
    model.denoisingUNet.forward = lambda x_t, t, buffers, z: torch.zeros_like(x_t)
    data = TensorData(torch.zeros(2, 3, SIZE, SIZE), torch.zeros(2, 9, SIZE, SIZE))
    trainer = Trainer(model, data, "unused", config(), log=quiet)
    # stage 2: the encoder is frozen and runs as at inference (no BatchNorm statistics drift)
    assert not model.encoder.training and model.denoisingUNet.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in model.denoisingUNet.parameters()}
    noise = torch.ones(2, 3, SIZE, SIZE)
    z = torch.zeros(2, 64)

    def loss(t):
        return float(trainer.loss(data.images, data.buffers, torch.tensor([t, t]), noise, z))

    assert loss(999) == pytest.approx(float(weights[999]), rel=1e-5)   # w_t * mean(eps^2)
    assert loss(0) == pytest.approx(1e-4, rel=1e-3)

    def photo(shape):
        return FittedPhoto("x", np.zeros((4, 4, 3), np.uint8), RigParams(shape=shape), "", 0.0)

    assert mean_shape([photo([1.0, 2.0]), photo([3.0])]) == [2.0, 1.0]


def read_log(out_dir) -> list[dict]:
    """The records of a run's ``log.jsonl``."""
    path = Path(out_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_one_run_per_folder(tmp_path):
    """A second process training into a folder in use is refused, naming the holder; a killed
    holder leaves no stale lock."""
    import subprocess
    import sys

    from server.training.runs import RunFolderBusy, lock_run_folder

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; "
                               "from server.training.runs import lock_run_folder; "
                               f"lock_run_folder({str(tmp_path)!r}); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid}"):
            lock_run_folder(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    with lock_run_folder(tmp_path):
        pass
