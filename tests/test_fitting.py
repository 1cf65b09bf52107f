"""Photo fitting: landmark embeddings, optimisation through the renderer, DECA's encoder."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from tests.support.flame_fixture import pickle_calling, write_flame_fixture  # noqa: E402
from portrait_rig.demo_head import demo_head  # noqa: E402
from portrait_rig.face_source import load_face_data  # noqa: E402
from portrait_rig.params import Camera  # noqa: E402
from server.renderer.face_model import FaceModel  # noqa: E402
from server.photo import FitSettings, PhotoFitter, fit_aligned  # noqa: E402
from server.checkpoints.deca import DecaModelError, load_deca_encoder  # noqa: E402
from server.models.deca_encoder import CODE_SIZES  # noqa: E402
from server.photo.deca import DecaCrop, camera_in_image  # noqa: E402
from server.photo.embedding import (EmbeddingError, LandmarkModel,  # noqa: E402
                                      detect_embedding, load_flame_embedding)
from server.renderer import BufferRenderer, CameraBatch, project, screen_space  # noqa: E402
from portrait_rig.colour import linear_to_srgb  # noqa: E402

# Fewer steps than the defaults: enough to converge on these inputs, quick on a loaded CPU.
QUICK = FitSettings(rigid_steps=60, shape_steps=120, light_steps=60, refine_steps=50,
                    render_size=96)


pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def demo():
    data = demo_head()
    return FaceModel(data), detect_embedding(data)


def test_landmark_model_poses_exactly_like_the_whole_mesh(demo):
    model, embedding = demo
    g = torch.Generator().manual_seed(0)
    shape, exp = torch.randn(2, model.n_shape, generator=g), torch.randn(2, model.n_expression,
                                                                         generator=g)
    pose = 0.3 * torch.randn(2, 5, 3, generator=g)
    vertices, _ = model.pose(shape, exp, pose)
    subset = LandmarkModel(model, embedding)
    assert subset.n < model.data.n_vertices / 10
    assert torch.allclose(subset.landmarks(shape, exp, pose),
                          embedding.points(vertices, model.triangles), atol=1e-6)


def test_demo_head_embedding_is_where_a_face_has_its_landmarks(demo):
    model, embedding = demo
    p = embedding.points(model.v_template[None], model.triangles)[0].numpy()
    assert embedding.valid.all()
    np.testing.assert_allclose(embedding.barycentric.sum(1), 1, atol=1e-6)
    # the two eyes mirror each other (36-41 image-left = the subject's right, -X)
    right_eye, left_eye = p[36:42].mean(0), p[42:48].mean(0)
    assert right_eye[0] < -0.02 and left_eye[0] > 0.02
    assert np.abs(right_eye * [-1, 1, 1] - left_eye).max() < 0.004
    # nose tip in front on the midline; chin the lowest jaw point; mouth between nose and chin
    assert abs(p[30, 0]) < 0.004 and p[30, 2] == p[27:36, 2].max()
    assert p[8, 1] == p[0:17, 1].min()
    assert p[8, 1] < p[48:68, 1].mean() < p[33, 1] < right_eye[1]


def render_target(model, embedding, size):
    """A face rendered by our renderer with known parameters (DECA's albedo convention: the
    model's albedo sRGB-encoded), and its exact landmarks."""
    g = torch.Generator().manual_seed(1)
    shape = 0.8 * torch.randn(1, model.n_shape, generator=g)
    exp = 0.6 * torch.rand(1, model.n_expression, generator=g)
    pose = torch.zeros(1, 5, 3)
    pose[0, 0] = torch.tensor([math.radians(-8), math.radians(15), math.radians(4)])
    pose[0, 2, 0] = 0.1
    light = torch.zeros(9, 3)
    light[0], light[1], light[2], light[3] = 2.2, 0.4, 0.3, 0.5          # white key light
    camera = Camera(type="orthographic", scale=7.5, tx=0.004, ty=0.01)
    vertices, _ = model.pose(shape, exp, pose)
    albedo = torch.as_tensor(linear_to_srgb(model.data.vertex_albedo), dtype=torch.float32)
    buffers = BufferRenderer(model.data.triangles).render(vertices, albedo, light, [camera],
                                                     size, size)
    image = buffers.rendered[0].clamp(0, 1) * buffers.mask[0] + 0.4 * (1 - buffers.mask[0])
    cameras = CameraBatch.from_params([camera])
    ndc, depth = project(embedding.points(vertices, model.triangles), cameras, size, size)
    landmarks = screen_space(ndc, depth, cameras, size, size)[0][0].numpy() - 0.5
    truth = dict(shape=shape[0].numpy(), exp=exp[0].numpy(), pose=pose[0].numpy(), light=light,
                 camera=camera)
    return np.round(image.numpy() * 255).astype(np.uint8), landmarks, truth


def test_fit_recovers_the_parameters_of_a_rendered_face(demo):
    model, embedding = demo
    size = 96
    image, landmarks, truth = render_target(model, embedding, size)
    result = fit_aligned(image, landmarks, model, embedding, QUICK)
    p = result.params

    rotation = np.degrees(p.pose.global_) - np.degrees(truth["pose"][0])
    assert np.abs(rotation).max() < 2.0, rotation
    assert abs(p.pose.jaw[0] - 0.1) < 0.05
    # identity traits the landmarks miss (ear size, neck width) are left to the prior
    assert np.corrcoef(p.shape, truth["shape"])[0, 1] > 0.8
    assert np.corrcoef(p.expression, truth["exp"])[0, 1] > 0.6
    assert p.camera.type == "orthographic"
    assert abs(p.camera.scale / truth["camera"].scale - 1) < 0.03
    assert result.landmark_error < 0.5
    band0 = np.array(p.lighting.sh[0])
    assert np.abs(band0 / 2.2 - 1).max() < 0.1, band0
    assert np.abs(result.albedo_gain - 1).max() < 0.05
    stages = [h["stage"] for h in result.history]
    assert [stages.count(s) for s in ("rigid", "shape", "light", "refine")] == [60, 120, 60, 50]
    photo = [h["photo"] / QUICK.w_photo for h in result.history if "photo" in h]
    assert photo[-1] < 0.02 and photo[-1] < photo[0]           # mean |rendered - image|


def png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_fit_finds_the_face_in_a_photo(demo):
    model, _ = demo
    fitter = PhotoFitter(model, settings=QUICK)
    fit = fitter.fit(png(skimage_data.astronaut()))
    result = fit.result
    assert fit.aligned.shape == (256, 256, 3) and result.method == "optimisation"
    history = result.history
    for stage in ("rigid", "shape", "light", "refine"):
        totals = [h["total"] for h in history if h["stage"] == stage]
        assert totals[-1] < totals[0], stage
    assert history[-1]["landmarks"] < 0.2 * history[0]["landmarks"]
    assert result.landmark_error < 3.5, result.landmark_error     # pixels of the 256 crop
    p = result.params
    assert max(abs(math.degrees(a)) for a in p.pose.global_) < 15   # she faces the camera
    assert p.lighting.sh[0][0] > 0 and 6 < p.camera.scale < 9
    assert np.isfinite(result.vertex_albedo).all()


# --------------------------------------------------------------------------------------------
# FLAME landmark embedding files

def deca_embedding_file(path, n_triangles, seed=0):
    """A ``landmark_embedding.npy`` laid out like DECA's: a pickled dict of numpy arrays and,
    for the pose-dependent jaw line, torch tensors."""
    rng = np.random.default_rng(seed)
    bary = rng.uniform(0.1, 1, (1, 68, 3))
    content = {
        "static_lmk_faces_idx": rng.integers(0, n_triangles, 51),
        "static_lmk_bary_coords": rng.uniform(0, 1, (51, 3)),
        "dynamic_lmk_faces_idx": torch.from_numpy(rng.integers(0, n_triangles, (79, 17))),
        "dynamic_lmk_bary_coords": torch.rand(79, 17, 3),
        "full_lmk_faces_idx": rng.integers(0, n_triangles, (1, 68)),
        "full_lmk_bary_coords": bary / bary.sum(-1, keepdims=True),
    }
    np.save(path, content, allow_pickle=True)
    return content


def test_flame_embedding_files_load_without_running_code(tmp_path):
    content = deca_embedding_file(tmp_path / "landmark_embedding.npy", 9976)
    deca = load_flame_embedding(tmp_path / "landmark_embedding.npy")
    assert deca.valid.all()
    assert (deca.triangles == content["full_lmk_faces_idx"][0]).all()
    np.testing.assert_allclose(deca.barycentric, content["full_lmk_bary_coords"][0], rtol=1e-6)

    static = {"lmk_face_idx": np.arange(51, dtype=np.uint32) * 7,
              "lmk_b_coords": np.full((51, 3), 1 / 3)}
    (tmp_path / "flame_static_embedding.pkl").write_bytes(pickle.dumps(static, protocol=2))
    smplx = load_flame_embedding(tmp_path / "flame_static_embedding.pkl")
    assert not smplx.valid[:17].any() and smplx.valid[17:].all()
    assert (smplx.triangles[17:] == static["lmk_face_idx"]).all()

    (tmp_path / "evil.pkl").write_bytes(pickle_calling("os", "system", "echo pwned"))
    with pytest.raises(EmbeddingError, match="refused to load os.system"):
        load_flame_embedding(tmp_path / "evil.pkl")
    (tmp_path / "other.pkl").write_bytes(pickle.dumps({"lmk": 1}))
    with pytest.raises(EmbeddingError, match="neither DECA's"):
        load_flame_embedding(tmp_path / "other.pkl")


# --------------------------------------------------------------------------------------------
# DECA's encoder

def official_e_flame_shapes() -> dict[str, tuple]:
    """Names and shapes of DECA's ``E_flame`` state dict, spelled out from its definition
    (decalib/models/encoders.py ``ResnetEncoder``; resnet.py ResNet(Bottleneck, [3, 4, 6, 3])
    without fc)."""
    shapes = {}

    def conv_bn(prefix, bn, out, inp, k):
        shapes[f"{prefix}.weight"] = (out, inp, k, k)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{name}"] = (out,)
        shapes[f"{bn}.num_batches_tracked"] = ()

    conv_bn("encoder.conv1", "encoder.bn1", 64, 3, 7)
    inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        for j in range(blocks):
            p = f"encoder.layer{i}.{j}"
            conv_bn(f"{p}.conv1", f"{p}.bn1", planes, inplanes, 1)
            conv_bn(f"{p}.conv2", f"{p}.bn2", planes, planes, 3)
            conv_bn(f"{p}.conv3", f"{p}.bn3", 4 * planes, planes, 1)
            if j == 0:
                conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", 4 * planes, inplanes, 1)
            inplanes = 4 * planes
    shapes.update({"layers.0.weight": (1024, 2048), "layers.0.bias": (1024,),
                   "layers.2.weight": (236, 1024), "layers.2.bias": (236,)})
    return shapes


def e_flame_state(codes: np.ndarray) -> dict[str, torch.Tensor]:
    """E_flame with random weights whose last layer outputs exactly ``codes`` for any photo."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in official_e_flame_shapes().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) > 1:
            state[name] = torch.randn(shape, generator=g) / math.sqrt(np.prod(shape[1:]))
        else:
            state[name] = 0.1 * torch.randn(shape, generator=g)
    state["layers.2.weight"].zero_()
    state["layers.2.bias"] = torch.as_tensor(codes, dtype=torch.float32)
    return state


DECA_CODES = np.random.default_rng(7).normal(0, 0.2, 236).astype(np.float32)
DECA_CODES[206] = 8.5                                                  # camera scale


@pytest.fixture(scope="module")
def deca_model(tmp_path_factory):
    """A ``deca_model.tar`` as DECA's trainer writes it (E_flame, E_detail, D_detail, opt)."""
    path = tmp_path_factory.mktemp("deca") / "deca_model.tar"
    torch.save({"E_flame": e_flame_state(DECA_CODES), "E_detail": {"layers.0.bias": torch.zeros(3)},
                "D_detail": {}, "opt": {"state": {}, "param_groups": []}}, path)
    return path


def test_deca_encoder_loads_the_official_names_strictly(deca_model, tmp_path):
    encoder = load_deca_encoder(deca_model)
    resnet50_without_fc = 25_557_032 - (2048 * 1000 + 1000)
    assert sum(p.numel() for p in encoder.parameters()) == \
        resnet50_without_fc + 2048 * 1024 + 1024 + 1024 * 236 + 236
    assert not encoder.training
    codes = encoder(torch.rand(1, 3, 224, 224))
    assert torch.allclose(codes[0], torch.as_tensor(DECA_CODES))

    state = e_flame_state(DECA_CODES)
    del state["encoder.layer3.5.bn2.running_var"]
    state["layers.0.weight"] = state["layers.0.weight"][:, :1000]
    state["layers.9.weight"] = torch.zeros(1)
    torch.save({"E_flame": state}, tmp_path / "broken.tar")
    with pytest.raises(DecaModelError) as error:
        load_deca_encoder(tmp_path / "broken.tar")
    for part in ("missing ['encoder.layer3.5.bn2.running_var']", "unexpected ['layers.9.weight']",
                 "layers.0.weight: (1024, 1000) (expected (1024, 2048))"):
        assert part in str(error.value)
    torch.save({"E_detail": {}}, tmp_path / "no_flame.tar")
    with pytest.raises(DecaModelError, match="no 'E_flame'"):
        load_deca_encoder(tmp_path / "no_flame.tar")
    (tmp_path / "evil.tar").write_bytes(pickle_calling("os", "system", "echo pwned"))
    with pytest.raises(DecaModelError, match="not a plain tensor file"):
        load_deca_encoder(tmp_path / "evil.tar")


def test_deca_crop_is_decas_own_warp():
    transform = pytest.importorskip("skimage.transform")
    rgb = skimage_data.astronaut()
    landmarks = np.random.default_rng(3).uniform([150, 60], [290, 200], (68, 2))
    crop = DecaCrop.from_landmarks(landmarks)
    # DECA's TestData, step by step
    left, top = landmarks.min(0)
    right, bottom = landmarks.max(0)
    old_size = (right - left + bottom - top) / 2 * 1.1
    centre = np.array([right - (right - left) / 2.0, bottom - (bottom - top) / 2.0])
    size = int(old_size * 1.25)
    src = np.array([[centre[0] - size / 2, centre[1] - size / 2],
                    [centre[0] - size / 2, centre[1] + size / 2],
                    [centre[0] + size / 2, centre[1] - size / 2]])
    tform = transform.estimate_transform("similarity", src, np.array([[0, 0], [0, 223],
                                                                       [223, 0]]))
    expected = transform.warp(rgb / 255.0, tform.inverse, output_shape=(224, 224))
    ours = crop.sample(rgb).permute(1, 2, 0).numpy()
    assert np.abs(ours - expected).max() < 1e-4


def test_deca_camera_is_carried_into_the_aligned_crop():
    crop = DecaCrop(origin=np.array([30.0, 22.0]), side=190.0)
    cam = np.array([9.0, 0.01, -0.02])
    points = np.random.default_rng(1).normal(0, 0.05, (20, 3))
    # DECA: crop NDC -> crop pixels ((ndc * 0.5 + 0.5) * 224, y down) -> image pixels
    # (inverse crop similarity) -> image NDC (pixels / 256 * 2 - 1), +Y up again at the end.
    ndc = cam[0] * (points[:, :2] + cam[1:])
    crop_px = (ndc * [1, -1] * 0.5 + 0.5) * 224
    image_px = crop_px / crop.k + crop.origin
    expected = (image_px / 256 * 2 - 1) * [1, -1]
    scale, tx, ty = camera_in_image(cam, crop, 256)
    np.testing.assert_allclose(scale * (points[:, :2] + [tx, ty]), expected, atol=1e-12)


def test_photo_fitter_takes_deca_codes_into_the_rig(deca_model, tmp_path):
    flame = tmp_path / "generic_model.pkl"
    write_flame_fixture(flame)
    model = FaceModel(load_face_data(str(flame)))
    deca_embedding_file(tmp_path / "landmark_embedding.npy", model.data.n_triangles)
    codes = DECA_CODES
    fitter = PhotoFitter(model, deca_model=deca_model,
                         embedding=tmp_path / "landmark_embedding.npy")
    assert fitter.method == "deca"
    fit = fitter.fit(skimage_data.astronaut())
    p, result = fit.result.params, fit.result
    at = np.cumsum([0, *CODE_SIZES.values()])
    shape, tex, exp, pose, cam, light = (codes[a:b] for a, b in zip(at[:-1], at[1:]))
    np.testing.assert_allclose(p.shape, shape, rtol=1e-6)
    np.testing.assert_allclose(p.expression, exp, rtol=1e-6)
    np.testing.assert_allclose(p.pose.global_ + p.pose.jaw, pose, rtol=1e-6)
    np.testing.assert_allclose(p.lighting.sh, light.reshape(9, 3), rtol=1e-6)
    np.testing.assert_allclose(p.appearance.texture, tex, rtol=1e-6)
    crop = DecaCrop.from_landmarks(fit.alignment.aligned_landmarks)
    np.testing.assert_allclose([p.camera.scale, p.camera.tx, p.camera.ty],
                               camera_in_image(cam, crop, 256), rtol=1e-6)
    assert result.method == "deca" and np.isfinite(result.landmarks).all()

    with pytest.raises(ValueError, match="method 'deca' needs"):
        PhotoFitter(FaceModel(demo_head()), deca_model=deca_model, method="deca")


def test_command_line_fit_reports_a_photo_without_a_face(tmp_path, capsys):
    from server.photo.cli import main

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((80, 80, 3), 128, np.uint8)).save(blank)
    assert main([str(blank)]) == 1
    assert "no face found in the 80x80 image" in capsys.readouterr().err


def test_command_line_fit_names_what_is_wrong(tmp_path, capsys, monkeypatch):
    from server.photo.cli import main

    monkeypatch.setenv("PORTRAIT_RIG_HOME", str(tmp_path / "home"))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main([str(text)]) == 1
    assert f"{text}: not an image Pillow can read" in capsys.readouterr().err
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    assert main([str(photo), "--embedding", str(tmp_path / "none.npy")]) == 1
    err = capsys.readouterr().err
    assert "landmark embedding not found" in err and "--embedding" in err
    assert "$PORTRAIT_RIG_HOME/flame/landmark_embedding.npy" in err
    assert main([str(photo), "--face-model", "flame"]) == 1
    assert "FLAME face model not found at" in capsys.readouterr().err
