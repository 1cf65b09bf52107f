"""The torch face model against smplx's FLAME, and FaceData's file and wire round trips."""

import json

import numpy as np
import pytest
import torch

from tests.support import flame_fixture as ff
from portrait_rig.face_data import FaceData, FaceDataError
from portrait_rig.flame_file import load_flame
from server.renderer.face_model import FaceModel

smplx = pytest.importorskip("smplx")

BATCH = 4


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    """The same random model twice: as FLAME ships it (for us) and as smplx reads it."""
    arrays = ff.random_flame_arrays(seed=2)
    root = tmp_path_factory.mktemp("flame")
    ff.write_distributed_pickle(root / "generic_model.pkl", arrays)
    return root / "generic_model.pkl", ff.write_smplx_folder(root / "smplx", arrays)


def random_coefficients(n_shape, n_expression, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"shape": torch.randn(BATCH, n_shape, generator=g, dtype=dtype),
            "expression": torch.randn(BATCH, n_expression, generator=g, dtype=dtype),
            "pose": 0.4 * torch.randn(BATCH, 5, 3, generator=g, dtype=dtype),
            "translation": 0.1 * torch.randn(BATCH, 3, generator=g, dtype=dtype)}


@pytest.mark.parametrize("n_shape, n_expression", [(300, 100), (50, 20)])
def test_pose_matches_smplx_flame(flame_files, n_shape, n_expression):
    pickle_path, smplx_folder = flame_files
    ours = FaceModel(load_flame(pickle_path, n_shape, n_expression))
    theirs = smplx.FLAME(model_path=smplx_folder, num_betas=n_shape,
                         num_expression_coeffs=n_expression, batch_size=BATCH,
                         use_face_contour=False)
    c = random_coefficients(n_shape, n_expression)
    verts, joints = ours.pose(**c)
    with torch.no_grad():
        out = theirs(betas=c["shape"], expression=c["expression"], global_orient=c["pose"][:, 0],
                     neck_pose=c["pose"][:, 1], jaw_pose=c["pose"][:, 2],
                     leye_pose=c["pose"][:, 3], reye_pose=c["pose"][:, 4],
                     transl=c["translation"])
    # Guard against a vacuous match: the coefficients move the mesh by centimetres.
    rest = ours.v_template.expand_as(verts)
    assert (verts - rest).abs().max() > 0.01
    torch.testing.assert_close(verts, out.vertices, rtol=0, atol=1e-5)
    # smplx appends its landmarks after FLAME's five joints.
    torch.testing.assert_close(joints, out.joints[:, :5], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def small_data():
    arrays = ff.random_flame_arrays(seed=5, n_vertices=200, n_triangles=300)
    rng = np.random.default_rng(5)
    return FaceData(v_template=arrays["v_template"], triangles=arrays["f"],
                    shapedirs=arrays["shapedirs"][:, :, :6],
                    exprdirs=arrays["shapedirs"][:, :, 300:304],
                    posedirs=arrays["posedirs"], J_regressor=arrays["J_regressor"],
                    weights=arrays["weights"], parents=ff.PARENTS,
                    vertex_albedo=rng.uniform(0, 1, (200, 3)), uv=rng.uniform(0, 1, (200, 2)),
                    shape_names=["Width", "Height"], expression_names=["Smile"],
                    name="test head", source="synthetic", version="1")


def assert_same_face_data(a: FaceData, b: FaceData):
    assert a.meta() == b.meta()
    assert a.arrays().keys() == b.arrays().keys()
    for key, value in a.arrays().items():
        other = b.arrays()[key]
        assert other.dtype == value.dtype and other.shape == value.shape, key
        assert other.tobytes() == value.tobytes(), key


def test_save_load_round_trip(small_data, tmp_path):
    small_data.save(tmp_path / "face.npz")
    assert_same_face_data(FaceData.load(tmp_path / "face.npz"), small_data)


def test_wire_round_trip(small_data):
    header, buffers = small_data.to_wire()
    header = json.loads(json.dumps(header))   # as it crosses the wire
    payload = b"".join(bytes(b) for b in buffers)
    assert_same_face_data(FaceData.from_wire(header, payload), small_data)


def test_from_wire_rejects_bad_payloads(small_data):
    header, buffers = small_data.to_wire()
    payload = b"".join(bytes(b) for b in buffers)
    with pytest.raises(FaceDataError, match="does not fit the payload"):
        FaceData.from_wire(header, payload[:-1])
    first = header["arrays"][0]
    for change, message in (({"dtype": "float64"}, "has dtype 'float64'"),
                            ({"offset": -4}, "does not fit"),
                            ({"name": "texture"}, "unknown array 'texture'"),
                            ({"shape": None}, "malformed entry")):
        bad = {**header, "arrays": [{**first, **change}] + header["arrays"][1:]}
        with pytest.raises(FaceDataError, match=message):
            FaceData.from_wire(bad, payload)


def test_gradients_are_exact(small_data):
    """Analytic gradients of the posed vertices w.r.t. every coefficient agree with finite
    differences (float64), as fitting and training need."""
    model = FaceModel(small_data, dtype=torch.float64)
    c = random_coefficients(small_data.n_shape, small_data.n_expression, seed=1,
                            dtype=torch.float64)
    inputs = tuple(c[k][:1].clone().requires_grad_() for k in ("shape", "expression", "pose",
                                                                 "translation"))
    # A fixed random projection keeps the Jacobian small and every vertex involved.
    probe = torch.randn(small_data.n_vertices * 3, 8, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))

    def projected(shape, expression, pose, translation):
        verts, joints = model.pose(shape, expression, pose, translation)
        return verts.reshape(1, -1) @ probe, joints

    assert torch.autograd.gradcheck(projected, inputs, eps=1e-6, atol=1e-7)
    verts, _ = model.pose(*inputs)
    grads = torch.autograd.grad(verts.square().sum(), inputs)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(flame_files):
    data = load_flame(flame_files[0], 100, 50)
    c = random_coefficients(100, 50, seed=3)
    cpu = FaceModel(data).pose(**c)
    gpu = FaceModel(data, device="cuda").pose(**{k: v.cuda() for k, v in c.items()})
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=1e-5)
