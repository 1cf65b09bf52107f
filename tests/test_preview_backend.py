"""Preview backend and backend registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from portrait_rig.params import RigParams
from portrait_rig.protocol import PASSES
from server.backends import BACKEND_NAMES, create_backend, describe_backends
from server.backends.base import RenderRequest
from server.renderer.face_model import FaceModel
from tests.support.synthetic_face import synthetic_face


@pytest.fixture(scope="module")
def face_model():
    return FaceModel(synthetic_face())


@pytest.fixture(scope="module")
def backend(face_model):
    backend = create_backend("preview", face_model, "cpu")
    backend.warmup()
    return backend


def _params(**changes) -> RigParams:
    params = RigParams()
    for key, value in changes.items():
        target, name = params, key
        if "__" in key:
            head, name = key.split("__")
            target = getattr(params, head)
        setattr(target, name, value)
    return params


def _render(backend, params=None, width=80, height=64, passes=()):
    request = RenderRequest(params or RigParams(), width, height, tuple(passes))
    return backend.render([request])[0]


def test_frame_is_rgba_uint8_of_the_requested_size_with_alpha_from_the_mask(backend):
    result = _render(backend, width=80, height=64, passes=tuple(PASSES))
    assert result.image.dtype == np.uint8 and result.image.shape == (64, 80, 4)
    for name, channels in PASSES.items():
        buffer = result.passes[name]
        assert buffer.dtype == np.float32 and buffer.shape == (64, 80, channels), name
        assert buffer.flags.c_contiguous
    mask = result.passes["mask"][..., 0]
    assert 0.1 < mask.mean() < 0.9
    np.testing.assert_array_equal(result.image[..., 3], (mask * 255).astype(np.uint8))
    # Outside the face: the neutral background.
    assert np.all(result.image[mask == 0][:, :3] == backend.background)


def test_colour_is_the_srgb_encoding_of_the_rendered_pass(backend):
    result = _render(backend, passes=("rendered", "mask"))
    inside = result.passes["mask"][..., 0] > 0
    linear = np.clip(result.passes["rendered"][inside].astype(np.float64), 0, 1)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    difference = np.abs(result.image[inside][:, :3].astype(int) - np.round(srgb * 255))
    assert difference.max() <= 1 and difference.mean() < 0.05


def test_only_requested_passes_are_returned(backend):
    assert _render(backend).passes == {}
    assert set(_render(backend, passes=("normal", "depth")).passes) == {"normal", "depth"}


def test_different_params_give_different_images(backend):
    base = _render(backend).image
    for params in (_params(pose__global_=[0.0, 0.4, 0.0]),
                   _params(lighting__sh=[[1.0] * 3] + [[0.0] * 3] * 8),
                   _params(shape=[2.0]),
                   _params(camera__fov_y=20.0)):
        assert np.any(_render(backend, params).image != base)


def test_jaw_and_expression_change_only_the_face_area(backend):
    base = _render(backend, width=96, height=96, passes=("mask",))
    for params in (_params(pose__jaw=[0.3, 0.0, 0.0]), _params(expression=[0.0, 2.0])):
        moved = _render(backend, params, width=96, height=96, passes=("mask",))
        changed = np.any(moved.image != base.image, axis=-1)
        assert changed.sum() > 20
        # The jaw and mouth lie below the centre row (48): nothing changes near the top of
        # the head, and no change reaches pixels outside the face in both frames.
        assert not changed[:40].any()
        either = (base.passes["mask"][..., 0] > 0) | (moved.passes["mask"][..., 0] > 0)
        assert not changed[~either].any()


def test_fast_and_torch_paths_agree(face_model):
    fast = create_backend("preview", face_model, "cpu", path="fast")
    reference = create_backend("preview", face_model, "cpu", path="torch")
    coloured = (np.array(RigParams().lighting.sh) * [1.0, 0.8, 0.6]).tolist()
    coloured[1] = [0.5, -0.2, 0.1]
    params = _params(pose__global_=[0.1, 0.3, 0.0], expression=[1.0, 0.5], lighting__sh=coloured)
    a = _render(fast, params, passes=tuple(PASSES))
    b = _render(reference, params, passes=tuple(PASSES))
    difference = np.abs(a.image.astype(int) - b.image)
    assert difference.max() <= 1 and (difference == 0).mean() > 0.999
    for name in PASSES:
        np.testing.assert_allclose(a.passes[name], b.passes[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)


def test_a_mixed_batch_returns_results_in_request_order(backend):
    requests = [RenderRequest(_params(pose__global_=[0.0, 0.2 * i, 0.0]), 32 + 16 * (i % 2), 40)
                for i in range(4)]
    results = backend.render(requests)
    for request, result in zip(requests, results):
        assert result.image.shape == (request.height, request.width, 4)
        single = backend.render([request])[0]
        np.testing.assert_array_equal(result.image, single.image)
    assert {"skin", "raster", "shade"} <= set(results[0].timings)


def test_results_do_not_share_memory_with_later_renders(backend):
    first = _render(backend, passes=("normal", "mask"))
    kept = {"image": first.image.copy(), **{k: v.copy() for k, v in first.passes.items()}}
    _render(backend, _params(pose__global_=[0.0, 0.5, 0.0]), passes=("normal", "mask"))
    np.testing.assert_array_equal(first.image, kept["image"])
    for name, buffer in first.passes.items():
        np.testing.assert_array_equal(buffer, kept[name])


def test_bad_requests_name_the_problem(backend):
    with pytest.raises(ValueError, match="passes"):
        _render(backend, passes=("specular",))
    with pytest.raises(ValueError, match="width"):
        _render(backend, width=0)
    with pytest.raises(ValueError, match="background"):
        create_backend("preview", backend.model, "cpu", background=(2, 0, 0))
    with pytest.raises(ValueError, match="unknown preview option.*shininess"):
        create_backend("preview", backend.model, "cpu", shininess=3)


def test_registry_describes_and_builds_backends(face_model):
    assert "preview" in BACKEND_NAMES
    described = {entry["name"]: entry["description"] for entry in describe_backends()}
    assert set(described) == set(BACKEND_NAMES) and described["preview"]
    backend = create_backend("preview", face_model, "cpu")
    assert backend.name == "preview" and "albedo" in described["preview"]
    with pytest.raises(ValueError, match="unknown backend 'nope'.*preview"):
        create_backend("nope", face_model, "cpu")


def test_registry_imports_backends_lazily():
    code = ("import sys, server.backends as b; b.describe_backends(); "
            "print(sorted(m for m in sys.modules if m.startswith('server.backends.')))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.stdout.strip() == "['server.backends.base', 'server.backends.shots']"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_frames_agree(face_model, backend):
    gpu = create_backend("preview", face_model, "cuda")
    a = _render(backend, passes=("mask",))
    b = _render(gpu, passes=("mask",))
    close = np.abs(a.image.astype(int) - b.image).max(axis=-1) <= 1
    assert close.mean() > 0.995           # silhouette pixels may differ (float ties on edges)


def test_a_frame_is_the_same_whatever_it_is_batched_with():
    """The scheduler batches frames as they arrive; a frame's pixels must not depend on it
    (a resumed or distributed render must give the frames of an uninterrupted one)."""
    from portrait_rig.face_source import load_face_data
    from server import paths

    demo = create_backend("preview", FaceModel(load_face_data(paths.face_model_source("demo"))))
    frames = []
    for i in range(40):
        t = i / 39
        frames.append(RigParams.from_dict({
            "pose": {"global": [0.1 * np.sin(9 * t), 0.7 * np.sin(5 * t), 0],
                     "jaw": [0.25 * t, 0, 0]},
            "expression": [2 * t - 1, np.cos(7 * t)]}))
    single = [demo.render([RenderRequest(p, 48, 48)])[0].image for p in frames]
    batched = []
    for start in range(0, len(frames), 7):
        batched += [r.image for r in demo.render([RenderRequest(p, 48, 48)
                                                  for p in frames[start:start + 7]])]
    assert [i for i in range(len(frames)) if not np.array_equal(single[i], batched[i])] == []
