"""The diffusionrig backend: a real server subprocess with a tiny official-layout checkpoint
(tests/support/diffusionrig_fixtures.py) at 32 px, driven through ``portrait_rig.client`` -
fixed noise per seed, appearance sources, streamed previews, cancellation, batching, start-up
errors - plus the loader's configuration inference and the appearance inputs in process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.diffusionrig_fixtures import (BACKEND_TINY, CHECKPOINT_KEYS,
                                                 random_checkpoint_state, write_checkpoint)
from portrait_rig import protocol
from portrait_rig.client import Client, Frame, Preview, ServerError, Superseded
from server.models.diffusionrig import UNetConfig
from server.checkpoints.diffusionrig import infer_config
from tests.support.server_process import ServerProcess

RESOLUTION = 16                    # the tiny UNet is convolutional: it samples at any size
STEPS = 4
W, H = 48, 32                      # not square: the square is resized and centre-cropped


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """$PORTRAIT_RIG_HOME (for the module, in process too) with a stage-1 and a personal
    checkpoint, latents and photos."""
    root = tmp_path_factory.mktemp("portrait_rig_home")
    write_checkpoint(root / "diffusionrig" / "model.safetensors", seed=0)
    write_checkpoint(root / "personal" / "alice" / "model.safetensors", seed=1)
    rng = np.random.default_rng(0)
    latents, photos = root / "latents", root / "photos"
    latents.mkdir()
    photos.mkdir()
    np.save(latents / "latent.npy", rng.normal(size=64).astype(np.float32))
    torch.save(torch.from_numpy(rng.normal(size=(1, 64)).astype(np.float32)),
               latents / "latent.pt")
    np.save(latents / "wrong.npy", np.zeros(32, np.float32))
    pixels = rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photos / "photo.png")
    snapshot = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)        # not an aligned crop
    Image.fromarray(snapshot).save(photos / "snapshot.png")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PORTRAIT_RIG_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def server(home):
    with ServerProcess("--backend", "diffusionrig", "--model", "demo",
                       "--option", f"diffusionrig.resolution={RESOLUTION}",
                       "--option", f"diffusionrig.steps={STEPS}",
                       env={"PORTRAIT_RIG_HOME": str(home)}) as proc:
        yield proc


@pytest.fixture
def client(server):
    with Client(server.host, server.port, timeout=120.0) as c:
        yield c


def rig(home, seed=None, source="latent.npy", **fields) -> dict:
    appearance = {"seed": seed}
    if source is not None:
        key = "reference_photo" if source.endswith(".png") else "latent_file"
        appearance[key] = source                  # a name in latents/ or photos/
    appearance.update(fields.pop("appearance", {}))
    return {"pose": {"jaw": [0.15, 0, 0], "global": [0, 0.2, 0]}, **fields,
            "appearance": appearance}


def pixels(frame: Frame) -> np.ndarray:
    return np.frombuffer(frame.pixels, np.uint8).reshape(frame.height, frame.width, -1)


def render_error(client: Client, params: dict) -> ServerError:
    with pytest.raises(ServerError) as err:
        client.render(params, W, H)
    assert err.value.code == protocol.E_RENDER_FAILED
    return err.value


# ---------------------------------------------------------------------------- frames

def test_frames_are_fixed_per_seed(client, home):
    first = client.render(rig(home, seed=3), W, H, format="rgba8")
    again = pixels(client.render(rig(home, seed=3), W, H, format="rgba8"))
    other = pixels(client.render(rig(home, seed=4), W, H, format="rgba8"))
    image = pixels(first)
    # The aligned square is smaller than this landscape frame: opaque in the middle, and
    # transparent (its own background colour) at the sides.
    assert image.shape == (H, W, 4) and (image[H // 4: -H // 4, W // 3: -W // 3, 3] == 255).all()
    assert (image[:, :3, 3] == 0).all() and (image[:, -3:, 3] == 0).all()
    assert image[..., :3].std() > 5                               # an image, not a constant
    assert np.array_equal(image, again)
    assert np.abs(image.astype(int) - other).mean() > 5
    # A shot's seed names the noise of all its frames, whatever appearance.seed says.
    shot = client.render(rig(home, seed=9), W, H, format="rgba8",
                         shot={"id": "Scene/Camera", "seed": 3, "frame": 12})
    assert np.array_equal(pixels(shot), image)
    assert {"buffers", "latent", "sample", "image"} <= set(first.timings)
    assert first.header["batch_size"] == 1


def test_parameters_change_the_frame(client, home):
    a = pixels(client.render(rig(home, seed=3), W, H))
    b = pixels(client.render(rig(home, seed=3, expression=[2.0],
                                 lighting={"sh": [[1.0] * 3] + [[0.0] * 3] * 8}), W, H))
    assert np.abs(a.astype(int) - b).max() > 0


def test_appearance_sources(client, home):
    latent = pixels(client.render(rig(home, seed=3), W, H))
    latent_pt = pixels(client.render(rig(home, seed=3, source="latent.pt"), W, H))
    photo = pixels(client.render(rig(home, seed=3, source="photo.png"), W, H))
    photo_again = pixels(client.render(rig(home, seed=3, source="photo.png"), W, H))
    personal = pixels(client.render(rig(home, seed=3, appearance={"personal_model": "alice"}),
                                    W, H))
    assert np.array_equal(photo, photo_again)
    for a, b in ((latent, latent_pt), (latent, photo), (latent, personal)):
        assert np.abs(a.astype(int) - b).mean() > 2

    assert "reference_photo" in render_error(client, rig(home, source=None)).message
    assert "no personal model 'bob'" in render_error(
        client, rig(home, appearance={"personal_model": "bob"})).message
    assert "folder name" in render_error(
        client, rig(home, appearance={"personal_model": "../diffusionrig"})).message
    assert "shape [64]" in render_error(client, rig(home, source="wrong.npy")).message
    assert "no file of that name" in render_error(client, rig(home, source="nowhere.png")).message
    # Other photos are aligned first; noise has no face (or the server has no dlib).
    message = render_error(client, rig(home, source="snapshot.png")).message
    assert f"20x30, not a {RESOLUTION}x{RESOLUTION} aligned crop, and aligning it failed" \
        in message


def test_passes_are_the_conditioning_buffers(client, home):
    frame = client.render(rig(home, seed=3), W, H, passes=["mask", "normal", "albedo"])
    mask = np.asarray(frame.passes["mask"][1]).reshape(H, W)
    normal = np.asarray(frame.passes["normal"][1]).reshape(H, W, 3)
    albedo = np.asarray(frame.passes["albedo"][1]).reshape(H, W, 3)
    assert 0.1 < mask.mean() < 0.9
    assert (normal[mask == 0] == 0).all() and (albedo[mask == 0] == 0).all()
    assert (normal[mask > 0][:, 2] > 0).mean() > 0.9
    assert 0 <= albedo.min() and albedo.max() <= 1


@pytest.mark.usefixtures("single_thread")
def test_batched_requests_share_one_network_batch(home, small_face):
    """The scheduler hands a backend several requests at once (tests/test_server.py checks the
    grouping); the backend must run them as one UNet batch, each as it would render alone."""
    from portrait_rig.params import RigParams
    from server.backends import RenderRequest, create_backend

    backend = create_backend("diffusionrig", small_face, steps=str(STEPS),
                             resolution=str(RESOLUTION), framing="rig",
                             checkpoint=str(home / "diffusionrig" / "model.safetensors"))
    requests = [RenderRequest(RigParams.from_dict(rig(home, seed=s)), W, H) for s in (5, 6)]
    alone = [backend.render([r])[0].image.astype(int) for r in requests]
    batch_sizes = []
    hook = backend._model(None).denoisingUNet.register_forward_hook(
        lambda module, args, out: batch_sizes.append(out.shape[0]))
    try:
        together = backend.render(requests)
    finally:
        hook.remove()
    assert batch_sizes == [2] * STEPS
    for result, own in zip(together, alone):
        assert np.abs(result.image.astype(int) - own).max() <= 2   # batched float maths
    assert np.abs(alone[0] - alone[1]).mean() > 5                  # and the frames differ


# ---------------------------------------------------------------------------- previews

def collect(client: Client, rid) -> list:
    """Replies for ``rid`` up to and including its final one."""
    replies = []
    while True:
        reply = client.receive()
        if reply.id == rid:
            replies.append(reply)
            if not isinstance(reply, Preview):
                return replies


def test_previews_stream_before_the_frame(client, home):
    rid = client.send_render(rig(home, seed=3), W, H, mode="live", previews=True)
    replies = collect(client, rid)
    previews, frame = replies[:-1], replies[-1]
    assert isinstance(frame, Frame) and not isinstance(frame, Preview)
    assert [p.step for p in previews] == list(range(1, STEPS))
    assert all(p.steps == STEPS and (p.width, p.height) == (W, H) for p in previews)
    # Early x0 estimates differ from the final frame, which previews do not change.
    assert np.abs(pixels(previews[0]).astype(int) - pixels(frame)).mean() > 1
    assert np.array_equal(pixels(frame), pixels(client.render(rig(home, seed=3), W, H)))


def test_previews_need_live_mode(client, home):
    with pytest.raises(ServerError) as err:
        client.render(rig(home), W, H, previews=True)
    assert err.value.code == protocol.E_BAD_MESSAGE and err.value.field == "previews"


def test_a_newer_live_request_stops_the_sampling_of_the_old_one(server, client, home):
    # Large previews take a while to resize and send: the newer request surely arrives
    # before the older one's last step.
    first = client.send_render(rig(home, seed=3), 512, 512, mode="live", previews=True)
    reply = client.receive()
    assert isinstance(reply, Preview) and reply.id == first and reply.step == 1
    second = client.send_render(rig(home, seed=4), W, H, mode="live", previews=True)
    old = [reply] + collect(client, first)
    new = collect(client, second)
    assert isinstance(old[-1], Superseded) and old[-1].by == second
    assert len(old) - 1 < STEPS - 1, "the superseded request was sampled to the end"
    assert isinstance(new[-1], Frame) and len(new) == STEPS
    assert f"id={first} type=render backend=diffusionrig size=512x512 status=superseded" \
        in server.log()


# ---------------------------------------------------------------------------- start-up

def test_missing_checkpoint_stops_a_server_that_defaults_to_it(tmp_path):
    with pytest.raises(RuntimeError, match="DiffusionRig stage-1 checkpoint not found") as err:
        ServerProcess("--backend", "diffusionrig", "--model", "demo",
                      env={"PORTRAIT_RIG_HOME": str(tmp_path)}).start()
    assert "$PORTRAIT_RIG_HOME/diffusionrig/model.pt" in str(err.value)
    assert "adobe-research/diffusion-rig" in str(err.value)         # where to get it


def test_missing_checkpoint_leaves_other_backends_serving(tmp_path):
    with ServerProcess("--backend", "preview", "--model", "demo",
                       env={"PORTRAIT_RIG_HOME": str(tmp_path)}) as proc:
        assert ("backend diffusionrig: unavailable: DiffusionRig stage-1 checkpoint not found"
                in proc.log())
        with Client(proc.host, proc.port, timeout=60.0) as c:
            state = {b["name"]: b for b in c.hello["backends"]}
            assert state["preview"]["state"] == "ready"
            assert state["diffusionrig"]["state"] == "unavailable"
            assert "checkpoint not found" in state["diffusionrig"]["reason"]
            for _ in range(2):          # answered from the stored state, no rebuild, no trace
                with pytest.raises(ServerError) as err:
                    c.render({}, W, H, backend="diffusionrig")
                assert err.value.code == protocol.E_BACKEND_UNAVAILABLE
                assert "checkpoint not found" in err.value.message
            assert c.render({}, W, H).width == W
        assert "Traceback" not in proc.log()


# ---------------------------------------------------------------------------- in process

def test_loader_infers_the_architecture_from_the_tensors():
    official = json.loads(CHECKPOINT_KEYS.read_text())["tensors"]
    meta = {k: torch.empty(shape, device="meta") for k, shape in official.items()}
    assert infer_config(meta) == UNetConfig()
    assert infer_config(random_checkpoint_state(BACKEND_TINY), 32) == BACKEND_TINY
    deeper = UNetConfig(image_size=32, model_channels=32, channel_mult=(1, 2, 2),
                        num_res_blocks=2, attention_ds=(2, 4), latent_dim=16)
    assert infer_config(random_checkpoint_state(deeper), 32) == deeper


def test_latent_files(home, tmp_path):
    from server.backends.diffusionrig import load_latent

    assert load_latent(home / "latents" / "latent.npy").shape == (64,)
    assert load_latent(home / "latents" / "latent.pt").shape == (64,)
    with pytest.raises(ValueError, match=r"holds \(32,\), expected a tensor of shape \[64\]"):
        load_latent(home / "latents" / "wrong.npy")
    np.save(tmp_path / "nan.npy", np.full(64, np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        load_latent(tmp_path / "nan.npy")
    with pytest.raises(ValueError, match=r"\.npy or \.pt"):
        load_latent(home / "photos" / "photo.png")


def test_photos_that_are_not_aligned_crops_go_through_face_alignment(home, tmp_path,
                                                                       monkeypatch):
    from server.photo import align
    from server.photo.align import encoder_input as load_aligned_photo

    calls = []

    def align_face(image, size=256):                          # server.photo.align's API
        calls.append((image.shape, size))
        return np.full((size, size, 3), 255, np.uint8), None

    monkeypatch.setattr(align, "align_face", align_face)
    aligned = load_aligned_photo(home / "photos" / "photo.png", RESOLUTION)
    assert aligned.shape == (1, 3, RESOLUTION, RESOLUTION) and not calls
    assert -1 <= aligned.min() and aligned.max() <= 1
    Image.new("RGB", (300, 200), (10, 20, 30)).save(tmp_path / "snapshot.jpg")
    photo = load_aligned_photo(tmp_path / "snapshot.jpg", RESOLUTION)
    assert calls == [((200, 300, 3), RESOLUTION)]
    assert photo.shape == (1, 3, RESOLUTION, RESOLUTION)
    torch.testing.assert_close(photo, torch.ones_like(photo))


@pytest.fixture(scope="module")
def small_face():
    from server.renderer.face_model import FaceModel
    from tests.support.synthetic_face import synthetic_face

    return FaceModel(synthetic_face())


def test_backend_options_are_checked(home, small_face):
    from server.backends import create_backend

    checkpoint = str(home / "diffusionrig" / "model.safetensors")
    with pytest.raises(ValueError, match="unknown diffusionrig option.*: seed"):
        create_backend("diffusionrig", small_face, checkpoint=checkpoint, seed=1)
    with pytest.raises(ValueError, match="sampler: expected one of ddim, dpm\\+\\+"):
        create_backend("diffusionrig", small_face, checkpoint=checkpoint, sampler="euler")
    with pytest.raises(ValueError, match="steps: expected an integer"):
        create_backend("diffusionrig", small_face, checkpoint=checkpoint, steps="many")
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        create_backend("diffusionrig", small_face, checkpoint=checkpoint, precision="fp16")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        create_backend("diffusionrig", small_face, checkpoint=str(home / "none.pt"))
    with pytest.raises(ValueError, match="framing: expected one of ffhq, centre, rig"):
        create_backend("diffusionrig", small_face, checkpoint=checkpoint, framing="tight")
    # A sphere has no face to find landmarks on: the error says what to do.
    with pytest.raises(ValueError, match="landmark_embedding.npy.*framing=rig"):
        create_backend("diffusionrig", small_face, checkpoint=checkpoint)


@pytest.mark.usefixtures("single_thread")
def test_fast_sampler_previews_and_cancellation_in_process(home, small_face):
    from portrait_rig.params import RigParams
    from server.backends import RenderCancelled, RenderRequest, create_backend

    backend = create_backend("diffusionrig", small_face, sampler="dpm++", steps="4",
                             resolution=str(RESOLUTION), personal_dir=str(home / "personal"),
                             framing="rig",
                             checkpoint=str(home / "diffusionrig" / "model.safetensors"))
    params = RigParams.from_dict(rig(home, seed=2))
    seen = []
    request = RenderRequest(params, 40, 40, on_preview=lambda *args: seen.append(args))
    final = backend.render([request])[0].image
    assert [(step, steps) for step, steps, _ in seen] == [(1, 4), (2, 4), (3, 4)]
    assert all(result.image.shape == (40, 40, 4) for _, _, result in seen)
    assert np.array_equal(backend.render([RenderRequest(params, 40, 40)])[0].image, final)

    # Cancelled after its first step: the batch stops unless another request still wants it.
    stop = RenderRequest(params, 40, 40, on_preview=lambda *args: None,
                         cancelled=lambda: len(calls) >= 1)
    calls = []
    stop.on_preview = lambda *args: calls.append(args)
    with pytest.raises(RenderCancelled):
        backend.render([stop])
    assert len(calls) == 1
    calls.clear()
    results = backend.render([stop, RenderRequest(params, 40, 40)])
    assert len(calls) == 3
    assert np.abs(results[1].image.astype(int) - final).max() <= 2     # batched float maths
    # Requests for another model run as their own batch; cancelling it spares the others.
    calls.clear()
    stop.params = RigParams.from_dict(rig(home, seed=2, appearance={"personal_model": "alice"}))
    results = backend.render([stop, RenderRequest(params, 40, 40)])
    assert len(calls) == 1 and np.array_equal(results[1].image, final)


def test_a_latent_file_written_from_a_photo_renders_like_the_photo(home, tmp_path):
    """``python -m server.photo.latent`` writes the z the backend computes for the photo."""
    from server.checkpoints.diffusionrig import load_diffusionrig
    from server.photo.align import encoder_input
    from server.photo.latent import main

    checkpoint = home / "diffusionrig" / "model.safetensors"
    assert main([str(home / "photos" / "photo.png"), "--out", str(tmp_path / "z.npy"),
                 "--checkpoint",
                 str(checkpoint), "--resolution", str(RESOLUTION)]) == 0
    model = load_diffusionrig(checkpoint, None, "cpu", RESOLUTION)
    with torch.no_grad():
        expected = model.encode(encoder_input(home / "photos" / "photo.png", RESOLUTION))[0]
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), expected.numpy(), atol=1e-6)
    assert main([str(home / "latent.npy"), "--out", str(tmp_path / "bad.npy"),
                 "--checkpoint", str(checkpoint)]) == 1
