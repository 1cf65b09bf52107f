"""The StyleRig pipeline at tiny scale: corpus shards, landmarks, F (DFR), RigNet, evaluation.

A random 32 px StyleGAN2 paints noise, so the training tests use the explicit synthetic
landmarks and the small sphere head of ``tests/support/stylerig_fixtures.py``; the dlib stage is
tested on renders of the demo head.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from PIL import Image

from portrait_rig.demo_head import demo_head
from portrait_rig.params import default_sh
from server.checkpoints.stylegan import load_generator
from server.checkpoints.stylerig import load_dfr, save_dfr
from server.models.dfr import FaceParamLayout, FaceParams, FaceReconstructionNet
from server.models.rignet import RigNet, mix_controls
from server.checkpoints.stylerig import load_rignet, read_rignet_metadata, save_rignet
from server.renderer import BufferRenderer
from portrait_rig.colour import linear_to_srgb
from server.training.stylerig.corpus import (Corpus, CorpusSettings, build_corpus,
                                             sample_latents, sample_z, to_pipeline_images)
from server.training.stylerig.data import TrainingData, load_face
from server.training.stylerig.evaluate import EvalSettings, evaluate, rotation_angle_deg
from server.training.stylerig.face_render import FaceRenderer
from server.training.stylerig.landmarks import detect_corpus_landmarks, framing_camera
from server.training.stylerig.losses import RenderLoss, RenderLossWeights, Targets
from server.training.stylerig.run import RunDir, scheduled_lr
from server.training.stylerig.train_dfr import DFRSettings, step_terms, train_dfr
from server.training.stylerig.train_rignet import RigNetObjective, RigNetSettings, train_rignet
from tests.support.stylerig_fixtures import write_corpus

CRASH_STEP = 13             # a simulated kill after this many steps (checkpoints every 8)


pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Generator, sphere head, a 12-sample corpus (2 shards) with synthetic landmarks, and one
    uninterrupted DFR run and RigNet run."""
    root = tmp_path_factory.mktemp("stylerig")
    generator, face, embedding = write_corpus(root)
    dfr = DFRSettings(face_model=str(face), embedding=str(embedding), steps=24, batch_size=4,
                      landmark_batch=8, hidden=32, lr=1e-3, log_every=1, checkpoint_every=8,
                      preview_every=0)
    train_dfr(root / "corpus", root / "dfr", dfr, progress=False)
    rig = RigNetSettings(dfr=str(root / "dfr" / "dfr.safetensors"), face_model=str(face),
                         embedding=str(embedding), steps=24, batch_size=4, log_every=1,
                         checkpoint_every=8, preview_every=0)
    train_rignet(root / "corpus", root / "rignet", rig, progress=False)
    return {"root": root, "generator": generator, "face": face, "embedding": embedding,
            "dfr": dfr, "rignet": rig}


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# corpus

def test_corpus_holds_the_generators_samples(setup):
    corpus = Corpus(setup["root"] / "corpus")
    assert [f.name for f in corpus.shards] == ["shard_00000", "shard_00001"] and corpus.n == 12
    G = load_generator(setup["generator"])
    indices = [0, 9, 11]                       # both shards, the short last one included
    z = torch.from_numpy(np.stack([sample_z(0, i, G.z_dim) for i in indices]))
    with torch.no_grad():
        ws = G.mapping(z, truncation_psi=0.7)
        expected = to_pipeline_images(G.synthesis(ws), 32)
    torch.testing.assert_close(corpus.w(indices), ws)
    assert np.abs(corpus.images(indices).astype(int) - expected).max() <= 1
    assert corpus.images([0]).shape == (1, 32, 32, 3)
    preview = np.asarray(Image.open(setup["root"] / "corpus" / "preview.png"))
    tile = preview.shape[0] // 2                                # two rows of corpus images
    assert preview.shape[1] >= 4 * tile and tile >= 32
    first = np.asarray(Image.fromarray(corpus.images([0])[0]).resize((tile, tile),
                                                                      Image.NEAREST))
    np.testing.assert_array_equal(preview[:tile, :tile], first)     # the corpus' own sample


def test_corpus_resumes_and_extends_without_redoing_shards(setup, tmp_path):
    folder = tmp_path / "corpus"
    settings = CorpusSettings(str(setup["generator"]), count=6, shard_size=4, image_size=32)
    build_corpus(folder, settings, progress=False)
    first = (folder / "shard_00000" / "w.npy").stat().st_mtime_ns
    reference = np.load(folder / "shard_00001" / "images.npy")

    # A kill while writing shard 1: the finished shard stays, the partial one is redone.
    shutil.rmtree(folder / "shard_00001")
    (folder / "shard_00001.partial").mkdir()
    (folder / "shard_00001.partial" / "w.npy").write_bytes(b"truncated")
    build_corpus(folder, settings, progress=False)
    assert (folder / "shard_00000" / "w.npy").stat().st_mtime_ns == first
    assert not (folder / "shard_00001.partial").exists()
    assert np.array_equal(np.load(folder / "shard_00001" / "images.npy"), reference)

    # More samples: the short last shard is completed, a new one added, shard 0 untouched.
    build_corpus(folder, CorpusSettings(**{**settings.__dict__, "count": 10}), progress=False)
    corpus = Corpus(folder)
    assert corpus.n == 10 and (folder / "shard_00000" / "w.npy").stat().st_mtime_ns == first
    assert np.array_equal(corpus.images([4, 5]), reference)
    with pytest.raises(ValueError, match="truncation"):
        build_corpus(folder, CorpusSettings(**{**settings.__dict__, "truncation": 0.5}),
                     progress=False)
    shutil.rmtree(folder / "shard_00002")
    with pytest.raises(ValueError, match="shard_00002 is missing"):
        Corpus(folder)


def test_style_mixed_samples_take_their_later_layers_from_a_second_latent(setup, tmp_path):
    G = load_generator(setup["generator"])
    build_corpus(tmp_path / "mixed", CorpusSettings(str(setup["generator"]), count=5,
                                                    image_size=32, style_mixing=1.0),
                 progress=False)
    corpus = Corpus(tmp_path / "mixed")
    for i in range(5):
        z, z2, cutoff = sample_latents(0, i, G.z_dim, G.num_ws, 1.0)
        assert 1 <= cutoff < G.num_ws
        with torch.no_grad():
            w1, w2 = G.mapping(torch.from_numpy(np.stack([z, z2])), truncation_psi=0.7)
            expected = torch.cat([w1[:cutoff], w2[cutoff:]])
            image = to_pipeline_images(G.synthesis(expected[None]), 32)
        torch.testing.assert_close(corpus.w([i])[0], expected)
        assert np.abs(corpus.images([i]).astype(int) - image).max() <= 1
    # Without mixing a sample is the plain z of sample_z, as corpora sampled before mixing.
    z, _, cutoff = sample_latents(0, 3, G.z_dim, G.num_ws, 0.0)
    assert cutoff == G.num_ws and np.array_equal(z, sample_z(0, 3, G.z_dim))


def test_an_edit_corpus_holds_rignets_edits_and_f_refines_on_it(setup, tmp_path):
    """corpus --rignet/--dfr: sample i is RigNet's edit of sample i towards its partner (stream
    1) in mode i mod 3, as F reads both, with the generator's image of the edit; dfr --also
    reads it after the corpus, and --init starts from the given F."""
    root = setup["root"]
    rignet_file, dfr_file = root / "rignet" / "rignet.safetensors", root / "dfr" / "dfr.safetensors"
    settings = CorpusSettings(str(setup["generator"]), count=6, shard_size=4, image_size=32,
                              rignet=str(rignet_file), dfr=str(dfr_file))
    build_corpus(tmp_path / "edits", settings, progress=False)
    edits = Corpus(tmp_path / "edits")
    G, rignet, (dfr, _) = load_generator(setup["generator"]), load_rignet(rignet_file), \
        load_dfr(dfr_file)
    layout = rignet.layout
    with torch.no_grad():
        w = G.mapping(torch.from_numpy(np.stack([sample_z(0, i, G.z_dim) for i in range(6)])),
                      truncation_psi=0.7)
        v = G.mapping(torch.from_numpy(np.stack([sample_latents(0, i, G.z_dim, G.num_ws, 0.0,
                                                                stream=1)[0]
                                                 for i in range(6)])), truncation_psi=0.7)
        modes = ["pose", "expression", "lighting"] * 2
        expected = rignet(w, mix_controls(dfr(w).controls(layout), dfr(v).controls(layout),
                                          modes, layout))
        images = to_pipeline_images(G.synthesis(expected), 32)
    assert float((expected - w).abs().max()) > 1e-3                      # a real edit
    torch.testing.assert_close(edits.w(range(6)), expected)
    assert np.abs(edits.images(range(6)).astype(int) - images).max() <= 1
    with pytest.raises(ValueError, match="needs both rignet and dfr"):
        CorpusSettings(str(setup["generator"]), count=6, rignet=str(rignet_file))
    changed = tmp_path / "rignet.safetensors"                  # another RigNet, same name
    save_rignet(rignet.requires_grad_(False), changed, {"note": "retrained"})
    with pytest.raises(ValueError, match="rignet_fingerprint"):
        build_corpus(tmp_path / "edits", CorpusSettings(**{**settings.__dict__, "count": 8,
                                                            "rignet": str(changed)}),
                     progress=False)

    detect_corpus_landmarks(tmp_path / "edits", source="synthetic",
                            face_model=str(setup["face"]), embedding=str(setup["embedding"]),
                            progress=False)
    data = TrainingData(root / "corpus", also=[tmp_path / "edits"])
    plain = TrainingData(root / "corpus")
    assert len(data.landmarks) == 18 and set(data.usable) == set(range(18))
    order = [13, 2, 17, 0, 12]
    torch.testing.assert_close(data.w(order, "cpu"), torch.cat([
        edits.w([1]), plain.w([2], "cpu"), edits.w([5]), plain.w([0], "cpu"), edits.w([0])]))
    np.testing.assert_array_equal(data.images(order)[0], edits.images([1])[0])
    np.testing.assert_array_equal(data.landmarks[12:], Corpus(tmp_path / "edits").landmarks()[0])

    # Refining: --init starts from that F (lr 0 keeps it), batches draw from both corpora.
    refine = DFRSettings(**{**setup["dfr"].__dict__, "steps": 2, "lr": 0.0,
                            "also": (str(tmp_path / "edits"),), "init": str(dfr_file)})
    train_dfr(root / "corpus", tmp_path / "refined", refine, progress=False)
    refined, _ = load_dfr(tmp_path / "refined" / "dfr.safetensors")
    for name, tensor in dfr.state_dict().items():
        assert torch.equal(refined.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="init: .* an F with"):
        train_dfr(root / "corpus", tmp_path / "other",
                  DFRSettings(**{**refine.__dict__, "hidden": 16}), progress=False)


def test_settings_added_later_take_their_defaults_on_resume(setup, tmp_path):
    folder = tmp_path / "corpus"
    settings = CorpusSettings(str(setup["generator"]), count=2, image_size=32)
    build_corpus(folder, settings, progress=False)
    manifest = json.loads((folder / "corpus.json").read_text())
    del manifest["style_mixing"]                     # a corpus sampled before the option
    (folder / "corpus.json").write_text(json.dumps(manifest))
    build_corpus(folder, CorpusSettings(**{**settings.__dict__, "count": 3}), progress=False)
    with pytest.raises(ValueError, match="style_mixing"):
        build_corpus(folder, CorpusSettings(**{**settings.__dict__, "style_mixing": 0.5}),
                     progress=False)

    run = tmp_path / "run"
    RunDir(run, DFRSettings())
    stored = json.loads((run / "settings.json").read_text())
    del stored["lr_decay"]                           # a run started before the option
    (run / "settings.json").write_text(json.dumps(stored))
    RunDir(run, DFRSettings())
    with pytest.raises(ValueError, match="lr_decay"):
        RunDir(run, DFRSettings(lr_decay=0.5))

    # A DFR run from before the landmark batch, the heads and supersampling: one batch, one
    # shared MLP, pixel centres.
    run = tmp_path / "dfr-old"
    old = DFRSettings(landmark_batch=0, heads=False, supersample=1)
    RunDir(run, old)
    stored = json.loads((run / "settings.json").read_text())
    del stored["landmark_batch"], stored["heads"], stored["supersample"]
    (run / "settings.json").write_text(json.dumps(stored))
    RunDir(run, old)
    with pytest.raises(ValueError, match="landmark_batch=0, now landmark_batch=64"):
        RunDir(run, DFRSettings(heads=False, supersample=1))
    with pytest.raises(ValueError, match="supersample=1, now supersample=2"):
        RunDir(run, DFRSettings(heads=False, landmark_batch=0))

    # A RigNet run from before L_control and supersampling was trained without them and must
    # not resume with them.
    run = tmp_path / "rignet"
    old = RigNetSettings(w_control=0.0, supersample=1)
    RunDir(run, old)
    stored = json.loads((run / "settings.json").read_text())
    del stored["w_control"], stored["supersample"]
    (run / "settings.json").write_text(json.dumps(stored))
    RunDir(run, old)
    with pytest.raises(ValueError, match="w_control=0.0, now w_control=1.0"):
        RunDir(run, RigNetSettings(supersample=1))
    with pytest.raises(ValueError, match="supersample=1, now supersample=2"):
        RunDir(run, RigNetSettings(w_control=0.0))


def test_learning_rate_schedule_is_constant_then_a_cosine_to_zero():
    assert [scheduled_lr(1.0, s, 100, 0.0) for s in (0, 99)] == [1.0, 1.0]
    assert scheduled_lr(1.0, 49, 100, 0.5) == 1.0
    assert scheduled_lr(1.0, 75, 100, 0.5) == pytest.approx(0.5)
    assert scheduled_lr(1.0, 99, 100, 0.5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.98)))
    with pytest.raises(ValueError, match="lr_decay"):
        DFRSettings(lr_decay=1.5)
    with pytest.raises(ValueError, match="lr_decay"):
        RigNetSettings(lr_decay=-0.1)


# --------------------------------------------------------------------------------------------
# landmarks

def demo_render(size: int, turn: float) -> np.ndarray:
    """The demo head, turned by ``turn`` radians about Y, on grey: a face dlib finds."""
    data = demo_head()
    c, s = math.cos(turn), math.sin(turn)
    rotation = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    vertices = torch.as_tensor(data.v_template) @ rotation.T
    buffers = BufferRenderer(data.triangles).render(
        vertices[None], torch.as_tensor(data.vertex_albedo), torch.tensor(default_sh()) * 0.3,
        [framing_camera(data)], size, size)
    mask = buffers.mask[0, ..., 0].numpy() > 0
    rgb = np.where(mask[..., None], linear_to_srgb(buffers.rendered[0].numpy()), 0.5)
    return np.round(rgb * 255).astype(np.uint8)


def test_dlib_stage_flags_faceless_images_and_training_skips_them(setup, tmp_path):
    folder = tmp_path / "corpus"
    build_corpus(folder, CorpusSettings(str(setup["generator"]), count=3, shard_size=3,
                                        image_size=128), progress=False)
    images = np.load(folder / "shard_00000" / "images.npy")
    images[0], images[2] = demo_render(128, 0.0), demo_render(128, 0.15)  # 1 stays noise
    np.save(folder / "shard_00000" / "images.npy", images)

    from server.training.stylerig.cli import main       # the stage as users run it

    assert main(["--quiet", "landmarks", "--corpus", str(folder)]) == 0
    summary = json.loads((folder / "landmarks.json").read_text())
    assert summary["found"] == 2 and summary["flagged_indices"] == [1]
    landmarks, found, source = Corpus(folder).landmarks()
    assert found.tolist() == [True, False, True] and source == "dlib-hog"
    assert np.all(landmarks[0] > 0) and np.all(landmarks[0] < 128)
    assert not landmarks[1].any()
    data = TrainingData(folder)
    assert data.usable.tolist() == [0, 2]
    assert all(1 not in data.batch(0, step, 4) for step in range(50))
    with pytest.raises(ValueError, match="holds dlib-hog landmarks"):
        detect_corpus_landmarks(folder, source="synthetic", progress=False)


def test_synthetic_landmarks_are_an_explicit_test_source(setup):
    summary = json.loads((setup["root"] / "corpus" / "landmarks.json").read_text())
    assert summary["source"] == "synthetic" and summary["flagged"] == 0
    landmarks, _, _ = Corpus(setup["root"] / "corpus").landmarks()
    assert landmarks.min() > 0 and landmarks.max() < 32          # the framed head
    assert np.abs(landmarks[0] - landmarks[1]).max() > 0.5        # posed per sample


# --------------------------------------------------------------------------------------------
# DFR

def test_dfr_training_lowers_its_loss_and_writes_its_outputs(setup):
    run = setup["root"] / "dfr"
    log = records(run)
    assert [r["step"] for r in log] == list(range(1, 25))
    assert {"loss", "photo", "landmarks", "prior_shape", "prior_expression",
            "prior_albedo"} <= set(log[0])
    first = np.mean([r["loss"] for r in log[:4]])
    last = np.mean([r["loss"] for r in log[-4:]])
    assert last < 0.7 * first
    assert np.mean([r["landmarks"] for r in log[-4:]]) < np.mean([r["landmarks"]
                                                                  for r in log[:4]])
    assert len((run / "log.csv").read_text().splitlines()) == 25
    assert Image.open(run / "previews" / "step_0000024.png").size[0] >= 3 * 128
    net, meta = load_dfr(run / "dfr.safetensors")
    assert meta["step"] == "24" and meta["landmarks"] == "synthetic"


def crash_at(monkeypatch, step: int):
    """Make training die (like a kill: no checkpoint on the way out) when it starts the batch
    of step index ``step``."""
    original = TrainingData.batch

    def batch(self, seed, step_index, size, stream=0):
        if step_index == step:
            raise RuntimeError("simulated kill")
        return original(self, seed, step_index, size, stream)

    monkeypatch.setattr(TrainingData, "batch", batch)


def assert_same_run(resumed, reference):
    a = torch.load(resumed / "checkpoint.pt", weights_only=True)
    b = torch.load(reference / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 24
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in b["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(a["optimizer"]["state"][index][name]),
                               torch.as_tensor(value)), (index, name)
    strip = [{k: v for k, v in r.items() if k != "time"} for r in records(reference)]
    assert [{k: v for k, v in r.items() if k != "time"} for r in records(resumed)] == strip


def test_dfr_resumes_after_a_kill_exactly(setup, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        crash_at(patch, CRASH_STEP)
        with pytest.raises(RuntimeError, match="simulated kill"):
            train_dfr(setup["root"] / "corpus", tmp_path / "dfr", setup["dfr"], progress=False)
    assert torch.load(tmp_path / "dfr" / "checkpoint.pt", weights_only=True)["step"] == 8
    assert len(records(tmp_path / "dfr")) == CRASH_STEP
    train_dfr(setup["root"] / "corpus", tmp_path / "dfr", setup["dfr"], progress=False)
    assert_same_run(tmp_path / "dfr", setup["root"] / "dfr")
    with pytest.raises(ValueError, match="hidden"):
        train_dfr(setup["root"] / "corpus", tmp_path / "dfr",
                  DFRSettings(**{**setup["dfr"].__dict__, "hidden": 16}), progress=False)


def test_dfr_estimates_the_landmark_term_on_the_larger_batch(setup):
    """L_photo on the first images, L_land and the priors on all of them: the same terms as
    rendering every image, without rasterising the extra ones."""
    data = TrainingData(setup["root"] / "corpus")
    face, embedding = load_face(str(setup["face"]), str(setup["embedding"]))
    net = FaceReconstructionNet(data.corpus.num_ws, data.corpus.w_dim,
                                FaceParamLayout.for_model(face), hidden=16)
    with torch.no_grad():
        net.heads["global_pose"][4].bias.uniform_(-0.3, 0.3)   # landmarks off their targets
    loss = RenderLoss(FaceRenderer(face, embedding, net.layout), 32, RenderLossWeights())
    indices = data.usable[:8]
    with torch.no_grad():
        p = net(data.w(indices, "cpu"))
        terms = step_terms(p, data, indices[:3], indices[3:], loss, setup["dfr"], "cpu")
        every = loss.terms(p, data.targets(indices, 32, "cpu"))
    assert float(terms["landmarks"]) == pytest.approx(float(every["landmarks"].mean()), rel=1e-5)
    assert float(terms["photo"]) == pytest.approx(float(every["photo"][:3].mean()), rel=1e-5)
    assert float(every["landmarks"][3:].mean()) != pytest.approx(
        float(every["landmarks"][:3].mean()), rel=1e-2)        # the extra images count
    assert float(terms["prior_shape"]) == pytest.approx(
        setup["dfr"].w_shape * float(p.shape.pow(2).sum(1).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="landmark_batch: expected 0 or at least"):
        DFRSettings(batch_size=16, landmark_batch=8)


def test_supersampled_loss_models_an_image_box_filtered_from_finer_pixels():
    """A corpus image is box-filtered from the generator's larger one, as a camera's pixel
    integrates its area. Rendered at twice the size and averaged, a face's own parameters
    reproduce such an image; sampled at pixel centres they miss it wherever the albedo changes
    within a pixel, by far more than the rounding of an 8-bit image."""
    face, embedding = load_face("demo")
    layout = FaceParamLayout.for_model(face)
    renderer = FaceRenderer(face, embedding, layout)
    camera = framing_camera(face)
    p = FaceParams.from_vector(torch.zeros(2, layout.dim), layout)
    p.camera[:] = torch.tensor([camera.scale, camera.tx, camera.ty])
    p.global_pose[1, 1] = 0.4
    p.sh[:] = torch.tensor(default_sh()) * 0.3
    with torch.no_grad():
        fine, points = renderer.render(p, 64)
        photo = torch.nn.functional.avg_pool2d(fine.rendered.permute(0, 3, 1, 2), 2)
        target = Targets(photo.permute(0, 2, 3, 1), points / 2,
                         torch.ones(2, 32, 32, dtype=torch.bool))
        terms = {s: RenderLoss(renderer, 32, RenderLossWeights(), supersample=s).terms(p, target)
                 for s in (1, 2)}
    assert float(terms[2]["photo"].max()) < 1e-10
    assert float(terms[1]["photo"].min()) > 1e-4          # RMS > 0.01: 2.5 code values
    assert float(terms[1]["landmarks"].max()) < 1e-10 and float(terms[2]["landmarks"].max()) < 1e-10
    with pytest.raises(ValueError, match="supersample"):
        RenderLoss(renderer, 32, RenderLossWeights(), supersample=0)


def test_dfr_heads_are_separate_and_shared_mlp_files_still_load(setup, tmp_path):
    layout = FaceParamLayout(n_shape=4, n_expression=3)
    net = FaceReconstructionNet(2, 8, layout, hidden=16)
    w = torch.randn(5, 2, 8, requires_grad=True)
    pose = torch.autograd.grad(net(w).global_pose.sum(), list(net.parameters()),
                               allow_unused=True)
    touched = {name.split(".")[1] for (name, _), g in zip(net.named_parameters(), pose)
               if g is not None and bool(g.abs().sum() > 0)}
    assert touched == {"global_pose"}                 # a group's output has its own MLP

    # A file written with one shared MLP (config without "heads") loads as it was written.
    shared = FaceReconstructionNet(2, 8, layout, hidden=16, heads=False)
    assert {n.split(".")[0] for n, _ in shared.named_parameters()} == {"fc0", "fc1", "fc2"}
    path = tmp_path / "dfr.safetensors"
    save_dfr(shared, path)
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    del config["heads"]
    save_file(tensors, str(path), metadata={**meta, "config": json.dumps(config)})
    loaded, _ = load_dfr(path)
    assert not loaded.has_heads
    assert torch.equal(loaded.raw(w.detach()), shared.raw(w.detach()))


# --------------------------------------------------------------------------------------------
# RigNet

def objective_on_fixed_pairs(setup, rignet: RigNet) -> dict[str, float]:
    """The training objective on fixed pairs: every usable sample edited towards another in
    every mode."""
    data = TrainingData(setup["root"] / "corpus")
    dfr, _ = load_dfr(setup["root"] / "dfr" / "dfr.safetensors")
    face, embedding = load_face(str(setup["face"]), str(setup["embedding"]))
    loss = RenderLoss(FaceRenderer(face, embedding, dfr.layout), 32, RenderLossWeights())
    objective = RigNetObjective(rignet, dfr, loss, setup["rignet"])
    w_index = np.repeat(data.usable[:6], 3)
    v_index = np.roll(w_index, 3)
    modes = ["pose", "expression", "lighting"] * 6
    with torch.no_grad():
        terms = objective(data.w(w_index, "cpu"), data.w(v_index, "cpu"),
                          data.targets(w_index, 32, "cpu"), data.targets(v_index, 32, "cpu"),
                          modes)
    return {k: float(v) for k, v in terms.items()}


def row(batch, i: int):
    """Row i of FaceParams or Targets, as a batch of one."""
    if isinstance(batch, Targets):
        return Targets(batch.photo[i:i + 1], batch.landmarks[i:i + 1], batch.region[i:i + 1])
    return batch.map(lambda t: t[i:i + 1])


def test_rignet_objective_follows_the_paper(setup):
    """L_rec, L_edit, L_consist and L_control of a random RigNet, written out from their
    definitions."""
    data = TrainingData(setup["root"] / "corpus")
    dfr, _ = load_dfr(setup["root"] / "dfr" / "dfr.safetensors")
    face, embedding = load_face(str(setup["face"]), str(setup["embedding"]))
    loss = RenderLoss(FaceRenderer(face, embedding, dfr.layout), 32, RenderLossWeights(50.0))
    rignet = RigNet(8, 16, 4, layout=dfr.layout.control_layout())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        rignet.decoder.weight.copy_(torch.randn(rignet.decoder.weight.shape, generator=g) * 0.3)
    with torch.no_grad():
        rignet.set_control_statistics(dfr(data.w(data.usable, "cpu")).controls(rignet.layout))
    settings = RigNetSettings(dfr="unused", w_rec=2.0, w_edit=3.0, w_consist=5.0, w_control=0.5)
    wi, vi, modes = data.usable[[0, 1, 2]], data.usable[[3, 4, 5]], ["pose", "expression",
                                                                      "lighting"]
    w, v = data.w(wi, "cpu"), data.w(vi, "cpu")
    t_w, t_v = data.targets(wi, 32, "cpu"), data.targets(vi, 32, "cpu")
    with torch.no_grad():
        terms = RigNetObjective(rignet, dfr, loss, settings)(w, v, t_w, t_v, modes)
        layout = rignet.layout
        p_w, p_v = dfr(w), dfr(v)
        c_w, c_v = p_w.controls(layout), p_v.controls(layout)
        rec = (((rignet(w, c_w) - w) ** 2).mean() + ((rignet(v, c_v) - v) ** 2).mean()) / 2
        edit, consist, control_edit, control_consist = [], [], [], []
        for i, mode in enumerate(modes):
            for a, b, p_a, p_b, c_a, c_b, t_a, t_b in ((w, v, p_w, p_v, c_w, c_v, t_w, t_v),
                                                       (v, w, p_v, p_w, c_v, c_w, t_v, t_w)):
                request = c_a[i:i + 1].clone()
                edited = torch.zeros(layout.dim, dtype=torch.bool)
                for name in {"pose": ["global_pose"], "expression": ["jaw", "expression"],
                             "lighting": ["sh"]}[mode]:
                    request[:, layout.slices[name]] = c_b[i:i + 1, layout.slices[name]]
                    edited[layout.slices[name]] = True
                p_hat = dfr(rignet(a[i:i + 1], request))
                d2 = ((p_hat.controls(layout) - request) / rignet.control_scale)[0] ** 2
                control_edit.append(d2[edited].mean())
                control_consist.append(d2[~edited].mean())
                p_edit = row(p_b, i).take(p_hat, [mode])       # b's face, the mode from p_hat
                p_consist = p_hat.take(row(p_a, i), [mode])    # p_hat, the mode back from a
                edit.append(loss.terms(p_edit, row(t_b, i))["render"])
                consist.append(loss.terms(p_consist, row(t_a, i))["render"])
        edit, consist = torch.cat(edit).mean(), torch.cat(consist).mean()
        control_edit = torch.stack(control_edit).mean()          # per edit, then over edits
        control_consist = torch.stack(control_consist).mean()
    torch.testing.assert_close(terms["rec"], rec)
    torch.testing.assert_close(terms["edit"], edit, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["consist"], consist, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["control_edit"], control_edit, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["control_consist"], control_consist, rtol=1e-4, atol=1e-6)
    control = 0.5 * (3 * control_edit + 5 * control_consist)
    torch.testing.assert_close(terms["loss"], 2 * rec + 3 * edit + 5 * consist + control,
                               rtol=1e-4, atol=1e-6)
    assert rec > 0 and edit > 0 and consist > 0 and control_edit > 0 and control_consist > 0


def test_rignet_training_lowers_its_losses(setup):
    trained = load_rignet(setup["root"] / "rignet" / "rignet.safetensors")
    untrained = load_rignet(setup["root"] / "rignet" / "rignet.safetensors")
    with torch.no_grad():                       # step 0: the decoder starts at zero
        untrained.decoder.weight.zero_()
        untrained.decoder.bias.zero_()
    before, after = objective_on_fixed_pairs(setup, untrained), \
        objective_on_fixed_pairs(setup, trained)
    assert before["rec"] == 0.0 < after["rec"]
    assert after["edit"] < before["edit"]
    assert after["loss"] < before["loss"]
    log = records(setup["root"] / "rignet")
    assert {"rec", "edit", "consist", "edit_photo", "edit_landmarks"} <= set(log[0])


def test_rignet_resumes_after_a_kill_exactly(setup, tmp_path, monkeypatch):
    corpus, run, reference_run = setup["root"] / "corpus", tmp_path / "rignet", \
        setup["root"] / "rignet"
    with monkeypatch.context() as patch:
        crash_at(patch, CRASH_STEP)
        with pytest.raises(RuntimeError, match="simulated kill"):
            train_rignet(corpus, run, setup["rignet"], progress=False)
    # A run saved before RigNet held a light map: resuming computes it, and a finished
    # run's file is written again with it.
    checkpoint, exported = run / "checkpoint.pt", run / "rignet.safetensors"

    def forget_light_map():
        state = torch.load(checkpoint, weights_only=True)
        del state["model"]["light_mean"], state["model"]["light_map"]
        torch.save(state, checkpoint)
        tensors = load_file(str(exported))
        del tensors["light_mean"], tensors["light_map"]
        save_file(tensors, str(exported), metadata=read_rignet_metadata(exported))

    reference = load_rignet(reference_run / "rignet.safetensors").light_map
    assert not torch.equal(reference, torch.eye(27))
    forget_light_map()
    train_rignet(corpus, run, setup["rignet"], progress=False)
    assert_same_run(run, reference_run)
    assert torch.equal(load_rignet(exported).light_map, reference)
    forget_light_map()
    train_rignet(corpus, run, setup["rignet"], progress=False)
    assert torch.equal(load_rignet(exported).light_map, reference)
    # The preview shows the generator's edits: 2 images + (edit, render) per mode per row.
    preview = Image.open(run / "previews" / "step_0000024.png")
    assert preview.size[0] == (2 + 2 * 3) * 128


# --------------------------------------------------------------------------------------------
# evaluation

def test_evaluation_measures_the_distance_to_the_request(setup, tmp_path):
    root = setup["root"]
    dfr, _ = load_dfr(root / "dfr" / "dfr.safetensors")
    identity = RigNet(8, 16, 4, layout=dfr.layout.control_layout())
    save_rignet(identity, tmp_path / "identity.safetensors")
    settings = EvalSettings(dfr=str(root / "dfr" / "dfr.safetensors"),
                            rignet=str(tmp_path / "identity.safetensors"), edits=12)
    summary = evaluate(root / "corpus", settings, out_dir=tmp_path / "eval", progress=False)

    # An identity RigNet leaves every face as it was: each pose edit misses by the angle
    # between the two faces' poses, and nothing else moves.
    data = TrainingData(root / "corpus")
    edits = [json.loads(line) for line in (tmp_path / "eval" / "edits.jsonl").read_text()
             .splitlines()]
    pose_edits = [e for e in edits if e["mode"] == "pose"]
    with torch.no_grad():
        pose_w = dfr(data.w([e["w"] for e in pose_edits], "cpu")).global_pose
        pose_v = dfr(data.w([e["v"] for e in pose_edits], "cpu")).global_pose
    expected = rotation_angle_deg(pose_w, pose_v)
    assert expected.min() > 0.1
    np.testing.assert_allclose([e["pose_deg"] for e in pose_edits], expected.numpy(), rtol=1e-4)
    assert summary["modes"]["pose"]["expression_l2"]["mean"] < 1e-5
    assert summary["modes"]["lighting"]["sh_l2"]["mean"] == pytest.approx(
        summary["modes"]["lighting"]["sh_l2"]["before_mean"], rel=1e-5)

    trained = evaluate(root / "corpus", EvalSettings(**{
        **settings.__dict__, "rignet": str(root / "rignet" / "rignet.safetensors")}),
        progress=False)
    for entry in trained["modes"].values():
        assert entry["edits"] == 4 and entry["failures"] == 0
        assert all(math.isfinite(entry[k]["mean"]) for k in ("pose_deg", "sh_l2"))


def test_rotation_angle_is_the_geodesic_distance():
    a = torch.tensor([[0.0, 0.3, 0.0], [0.1, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.1, 0.0], [0.1, 0.0, 0.0]])
    torch.testing.assert_close(rotation_angle_deg(a, b), torch.tensor([math.degrees(0.2), 0.0]),
                               atol=1e-4, rtol=0)


def test_cli_runs_a_stage_and_reports_bad_input(setup, tmp_path, capsys):
    from server.training.stylerig.cli import main

    root = setup["root"]
    common = ["--quiet", "evaluate", "--corpus", str(root / "corpus"),
              "--dfr", str(root / "dfr" / "dfr.safetensors"), "--edits", "6"]
    assert main(common + ["--rignet", str(root / "rignet" / "rignet.safetensors"),
                          "--out", str(tmp_path / "eval")]) == 0
    table = capsys.readouterr().out
    assert all(mode in table for mode in ("pose", "expression", "lighting"))
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["edits"] == 6
    assert main(common + ["--rignet", str(root / "dfr" / "dfr.safetensors")]) == 2
    assert "not a RigNet" in capsys.readouterr().err


def test_failed_edits_are_explained_and_stay_valid_json(monkeypatch, capsys, tmp_path):
    """An edit whose image has no detectable face is a recorded failure with its reason
    (None, not NaN, in the JSON); a run where every edit fails exits non-zero."""
    from server.training.stylerig import evaluate as evaluation
    from server.training.stylerig.cli import main

    settings = EvalSettings(dfr="dfr.safetensors", rignet="rignet.safetensors", modes=("pose",),
                            edits=2, estimator="image")
    metrics = {key: 1.0 for key in evaluation.METRICS}
    records = [{"w": 0, "v": 1, "mode": "pose", **metrics,
                **{f"before_{k}": 1.0 for k in metrics}},
               {"w": 1, "v": 0, "mode": "pose", **{k: None for k in metrics},
                **{f"before_{k}": 1.0 for k in metrics}, "failure": evaluation.FAILURE_AFTER}]
    summary = evaluation.summarise(records, settings)
    assert summary["failures"] == 1 and summary["modes"]["pose"]["failures"] == 1
    assert summary["failure_reasons"] == {evaluation.FAILURE_AFTER: 1}
    json.loads(json.dumps(summary), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    text = evaluation.format_summary(summary)
    assert f"1 of 2 edits failed: {evaluation.FAILURE_AFTER}" in text
    assert evaluation._finite(float("nan")) is None

    failed = evaluation.summarise(records[1:], settings)
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kwargs: failed)
    code = main(["--quiet", "evaluate", "--corpus", str(tmp_path), "--dfr", "x", "--rignet", "y"])
    assert code == 1 and "every edit failed" in capsys.readouterr().err


def test_rignet_objective_without_renders_reads_no_image(setup):
    """``w_render`` 0: L_rec and L_control alone, the same values as in the rendered
    objective, with no targets at all (a training step reads no image)."""
    data = TrainingData(setup["root"] / "corpus")
    dfr, _ = load_dfr(setup["root"] / "dfr" / "dfr.safetensors")
    face, embedding = load_face(str(setup["face"]), str(setup["embedding"]))
    loss = RenderLoss(FaceRenderer(face, embedding, dfr.layout), 32, RenderLossWeights(50.0))
    rignet = RigNet(8, 16, 4, layout=dfr.layout.control_layout())
    with torch.no_grad():
        rignet.decoder.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
        rignet.set_control_statistics(dfr(data.w(data.usable, "cpu")).controls(rignet.layout))
    wi, vi, modes = data.usable[[0, 1]], data.usable[[2, 3]], ["pose", "lighting"]
    w, v = data.w(wi, "cpu"), data.w(vi, "cpu")
    weights = dict(dfr="unused", w_rec=2.0, w_edit=3.0, w_consist=5.0, w_control=0.5)
    with torch.no_grad():
        rendered = RigNetObjective(rignet, dfr, loss, RigNetSettings(**weights))(
            w, v, data.targets(wi, 32, "cpu"), data.targets(vi, 32, "cpu"), modes)
        alone = RigNetObjective(rignet, dfr, loss, RigNetSettings(**weights, w_render=0.0))(
            w, v, None, None, modes)
    assert "edit" not in alone and "consist" not in alone
    for name in ("rec", "control_edit", "control_consist"):
        torch.testing.assert_close(alone[name], rendered[name])
    control = 0.5 * (3 * alone["control_edit"] + 5 * alone["control_consist"])
    torch.testing.assert_close(alone["loss"], 2 * alone["rec"] + control)
    assert rendered["loss"] > alone["loss"] > 0
