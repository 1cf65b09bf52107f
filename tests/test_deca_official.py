"""Our buffers against the official DiffusionRig pipeline for a pose edit.

tests/data/deca/pose_edit_official.npz holds what the official ``decalib`` of
adobe-research/diffusion-rig@92324f7582ef316b07870e9d9dcbcdd01cc4d77c computed, on CPU, for
the edit ``scripts/inference.py`` makes in its "pose" mode: a source photo's DECA codes with
the global rotation of another photo's, decoded with ``align_ffhq=True`` and the source's
``ffhq_center`` (so the posed mesh is moved to keep the source's FFHQ centre), rendered into
the photo through DECA's crop transform (``render_orig``). Its inputs were made with random
values in the official file layouts:

* FLAME: ``tests.support.flame_fixture.random_flame_arrays(0)`` as a plain pickle
  (``template_checksum`` guards against that helper changing);
* landmarks: DECA's ``landmark_embedding.npy`` layout with 68 points (``landmark_faces``,
  ``landmark_bary``; the static 51 are the full set's 17-67);
* texture: ``FLAME_texture.npz`` at the official 512 x 512 x 3 x 200 layout, built from the
  16 x 16 texels ``texture_mean`` / ``texture_dir`` (50 components, zeros after) by
  nearest-neighbour blow-up, BGR code values; UVs a planar projection of the template
  (u = 0.5 + x / 0.2, v = 0.5 + y / 0.25, per vertex, ft = f);
* codes: ``shape``, ``tex``, ``exp``, ``pose``, ``cam``, ``light`` of the source, the edited
  global rotation ``edit_pose``; the source's camera places its FFHQ centre at the image's
  centre (an FFHQ-aligned photo); DECA's crop: centre ``crop_centre``, side ``crop_size``
  pixels of the ``image_size`` photo;
* rasterisation: a stand-in for pytorch3d's ``rasterize_meshes`` (its documented contract:
  pixel centres, inside test, nearest face, screen barycentrics), since pytorch3d has no CPU
  build here.

Outputs: ``rendered``, ``normal``, ``albedo`` [3, S, S] and ``mask`` [S, S] (DECA's
``rendered_images``, ``normal_images``, ``albedo_images``, ``alpha_images``), ``ffhq_center``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.flame_fixture import write_flame_fixture
from portrait_rig.face_source import load_face_data
from server.backends.framing import HeadFramer
from server.photo.deca import DecaCrop, PhotoCodes, camera_in_image
from server.photo.embedding import LandmarkEmbedding
from server.photo.fit import rig_from_deca
from server.renderer.deca import DecaBufferRenderer
from server.renderer.face_model import FaceModel
from server.renderer.texture import FlameTexture

FIXTURE = Path(__file__).resolve().parent / "data" / "deca" / "pose_edit_official.npz"


@pytest.fixture(scope="module")
def official():
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def ours(official, tmp_path_factory):
    """Our face model, texture space and landmark embedding, from the same inputs."""
    folder = tmp_path_factory.mktemp("official")
    arrays = write_flame_fixture(folder / "generic_model.pkl", seed=0)
    assert float(np.abs(arrays["v_template"]).sum()) == pytest.approx(
        float(official["template_checksum"])), "tests/support/flame_fixture.py changed: regenerate"
    model = FaceModel(load_face_data(str(folder / "generic_model.pkl")))
    v = arrays["v_template"]
    vt = np.stack([0.5 + v[:, 0] / 0.2, 0.5 + v[:, 1] / 0.25], 1)
    vt = np.array([float(f"{x:.9g}") for x in vt.ravel()]).reshape(-1, 2)   # as the .obj
    np.savez(folder / "FLAME_texture.npz", mean=official["texture_mean"],
             tex_dir=official["texture_dir"], vt=vt, ft=arrays["f"])
    embedding = LandmarkEmbedding(official["landmark_faces"].astype(np.int64),
                                  official["landmark_bary"], np.ones(68, bool))
    texture = FlameTexture(folder / "FLAME_texture.npz")
    return DecaBufferRenderer(model, texture), HeadFramer(model, embedding)


def edited_params(official, model):
    """The edit's rig parameters, through our DECA -> rig mapping and camera."""
    pose = official["pose"].astype(np.float64).copy()
    pose[:3] = official["edit_pose"]
    codes = PhotoCodes(shape=official["shape"], tex=official["tex"], exp=official["exp"],
                       pose=pose, cam=official["cam"], light=official["light"])
    size = int(official["image_size"])
    side = float(official["crop_size"])
    crop = DecaCrop(origin=official["crop_centre"] - side / 2, side=side)
    return rig_from_deca(codes, model, camera_in_image(codes.cam, crop, size)), size


def test_pose_edit_buffers_equal_the_official_pipeline(official, ours):
    renderer, framer = ours
    params, size = edited_params(official, renderer.model)
    codes = renderer.codes([params], size, size)
    # The official recipe: the edited head's FFHQ centre put back where the (aligned) source
    # photo had it, the image's centre.
    aligned = framer.reframe(codes, framer.framings(codes, "centre"))
    buffers = renderer.render(aligned, size)
    mask = torch.from_numpy(official["mask"])
    assert 0.2 < float(mask.mean()) < 0.6
    torch.testing.assert_close(buffers.mask[0, ..., 0], mask, atol=0, rtol=0)
    for name in ("rendered", "normal", "albedo"):
        ours_ = getattr(buffers, name)[0].permute(2, 0, 1)
        torch.testing.assert_close(ours_, torch.from_numpy(official[name]), atol=1e-4, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # Without moving the head back, the edit lands elsewhere: the comparison can fail.
    unaligned = renderer.render(codes, size)
    assert (unaligned.normal[0].permute(2, 0, 1) - torch.from_numpy(official["normal"])
            ).abs().max() > 0.5
