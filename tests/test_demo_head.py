"""The demo head: a valid FLAME-layout model whose rig behaves like a face.

Vertices are found from the data itself (skin weights, positions, components), not from the
generator's internals, so these tests describe what every consumer of the model can rely on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from portrait_rig import demo_head as demo
from portrait_rig.face_data import FaceData
from portrait_rig.params import RigParams
from server.renderer.face_model import FaceModel

# sha256 of v_template rounded to 1e-6 m (float64) followed by triangles (int32). A change here
# means the shipped head changed: update it deliberately (and bump demo_head.VERSION), never to
# make an accidental change pass.
TEMPLATE_SHA256 = "93cfe201c469507de40b80e9d122c1d7407a8e937ebb64ad787563102cbed694"

REQUIRED_SHAPES = ("head width", "head length", "jaw width", "chin length", "nose length",
                   "nose width", "brow height", "eye spacing", "lip fullness", "cheek fullness",
                   "ear size")
REQUIRED_EXPRESSIONS = ("smile", "frown", "brow raise", "brow furrow", "blink left",
                        "blink right", "pucker", "cheek puff", "mouth stretch", "sneer",
                        "mouth funnel")
ONE_SIDED = ("blink left", "blink right", "half smile left")


@pytest.fixture(scope="module")
def head() -> FaceData:
    return demo.demo_head()


@pytest.fixture(scope="module")
def model(head) -> FaceModel:
    return FaceModel(head, dtype=torch.float64)


def pose(model, **fields) -> tuple[np.ndarray, np.ndarray]:
    """Posed vertices [V, 3] and joints [5, 3] for shape/expression lists and joint rotations."""
    params = RigParams()
    for key, value in fields.items():
        if key in ("shape", "expression"):
            setattr(params, key, list(value))
        else:
            setattr(params.pose, key, list(value))
    verts, joints = model.pose_params([params])
    return verts[0].numpy(), joints[0].numpy()


def one_hot(names, name, value=1.0):
    return [value if n == name else 0.0 for n in names]


def eyeball(head, side):
    """Vertex ids of the left (side 0) or right (side 1) eyeball: all weight on its eye joint."""
    return np.nonzero(head.weights[:, 3 + side] == 1.0)[0]


def skin_ids(head):
    return np.nonzero(head.weights[:, 3:].sum(1) == 0.0)[0]


def mirror_map(head):
    """Index of each vertex's mirror image across x = 0 (the lip and lid copies, which share
    positions, are told apart by their jaw weight)."""
    v = head.v_template.astype(np.float64)
    key = np.concatenate([v, 0.01 * head.weights[:, 2:3]], axis=1)
    distance, index = cKDTree(key).query(key * [-1.0, 1.0, 1.0, 1.0])
    assert distance.max() < 1e-6, "the template is not mirror-symmetric"
    return index


def lip_centre(head):
    """(upper, lower): the two coincident vertices on the mouth's midline where the lips meet;
    the upper one follows the head, the lower one the jaw."""
    v = head.v_template
    ids = np.nonzero((v[:, 0] == 0.0) & (v[:, 1] > -0.07) & (v[:, 1] < -0.02)
                     & (v[:, 2] > 0.03))[0]
    pairs = [(i, j) for i in ids for j in ids if i < j and np.array_equal(v[i], v[j])]
    assert len(pairs) == 1, f"expected one lip pair on the midline, found {len(pairs)}"
    i, j = pairs[0]
    return (i, j) if head.weights[i, 2] < head.weights[j, 2] else (j, i)


def ray_hits(origin, direction, tri):
    """Distances along a ray to the triangles [F, 3, 3] it crosses (Moller-Trumbore)."""
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    p = np.cross(direction, e2)
    det = (e1 * p).sum(1)
    ok = np.abs(det) > 1e-15
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    s = origin - tri[:, 0]
    u = (s * p).sum(1) * inv
    q = np.cross(s, e1)
    w = (direction * q).sum(1) * inv
    t = (e2 * q).sum(1) * inv
    hit = ok & (u >= 0) & (w >= 0) & (u + w <= 1) & (t > 0)
    return np.nonzero(hit)[0], t[hit]


# ------------------------------------------------------------------------------ the data

def test_valid_face_data_in_flame_layout(head):
    head.validate()
    assert 3000 <= head.n_vertices <= 8000
    assert head.n_joints == 5 and head.parents.tolist() == [-1, 0, 1, 1, 1]
    assert head.posedirs.shape == (head.n_vertices, 3, 36)
    assert 10 <= head.n_shape <= 16 and 10 <= head.n_expression <= 16
    assert (head.name, head.source, head.version) == ("Portrait Rig demo head", "demo",
                                                     demo.VERSION)
    assert head.version and isinstance(head.version, str)
    assert head.uv is not None and head.uv.min() >= 0.0 and head.uv.max() <= 1.0
    assert head.vertex_albedo.min() >= 0.0 and head.vertex_albedo.max() <= 1.0


def test_components_have_distinct_meaningful_names(head):
    for names, required in ((head.shape_names, REQUIRED_SHAPES),
                            (head.expression_names, REQUIRED_EXPRESSIONS)):
        assert all(isinstance(n, str) and n.strip() for n in names)
        assert len(set(names)) == len(names)
        assert set(required) <= set(names)
    assert len(head.shape_names) == head.n_shape
    assert len(head.expression_names) == head.n_expression


def test_build_is_deterministic_and_pinned(head):
    again = demo.build_demo_head()
    for key, value in head.arrays().items():
        assert again.arrays()[key].tobytes() == value.tobytes(), key
    assert again.meta() == head.meta()
    digest = hashlib.sha256(
        (np.round(head.v_template.astype(np.float64), 6) + 0.0).tobytes()
        + head.triangles.astype(np.int32).tobytes()).hexdigest()
    assert digest == TEMPLATE_SHA256


def test_demo_head_is_cached(head):
    assert demo.demo_head() is head


def test_closed_surfaces_with_outward_normals(head):
    triangles = head.triangles.astype(np.int64)
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    forward = edges[:, 0] * head.n_vertices + edges[:, 1]
    backward = edges[:, 1] * head.n_vertices + edges[:, 0]
    assert len(np.unique(forward)) == len(forward), "an edge is used twice in one direction"
    assert np.isin(backward, forward).all(), "the surface has a hole"
    # each closed piece (skin with its bags, each eyeball) encloses a positive volume
    for ids in (skin_ids(head), eyeball(head, 0), eyeball(head, 1)):
        piece = triangles[np.isin(triangles, ids).all(1)]
        tri = head.v_template.astype(np.float64)[piece]
        volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
        assert volume > 0.0
    tri = head.v_template.astype(np.float64)[triangles[np.isin(triangles, skin_ids(head)).all(1)]]
    volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
    assert 2.5e-3 < volume < 6e-3        # litres of a head and neck, in cubic metres


def test_size_and_placement_fit_the_default_cameras(head):
    v = head.v_template.astype(np.float64)
    height = v[:, 1].max() - v[:, 1].min()
    assert 0.22 <= height <= 0.25
    nose_tip = v[np.argmax(v[:, 2])]
    assert abs(nose_tip[0]) < 1e-6 and nose_tip[2] > 0.06           # the face looks down +Z
    assert (np.abs(8.0 * v[:, :2]) <= 1.0).all()                   # DECA ortho, s = 8
    depth = 1.2 - v[:, 2]                                          # camera at (0, 0, 1.2)
    ndc = v[:, :2] / depth[:, None] / math.tan(math.radians(14.0 / 2))
    assert (np.abs(ndc) <= 1.0).all()


def test_mirror_symmetric_template(head):
    mirror = mirror_map(head)
    assert (mirror[mirror] == np.arange(head.n_vertices)).all()
    assert np.array_equal(np.sort(mirror[eyeball(head, 0)]), eyeball(head, 1))
    assert np.abs(head.vertex_albedo[mirror] - head.vertex_albedo).max() < 1e-6


def test_albedo_reads_as_a_face(head):
    v, albedo = head.v_template.astype(np.float64), head.vertex_albedo
    upper, _ = lip_centre(head)
    skin = skin_ids(head)
    tree = cKDTree(v[skin])

    def at(point):
        return albedo[skin[tree.query(point)[1]]]

    lip = at(v[upper] + [0.0, 0.004, 0.0])                   # in the upper lip's red
    cheek = at([0.045, -0.01, 0.045])
    redness = lambda c: c[0] / (c[1] + c[2])
    assert redness(lip) > 1.3 * redness(cheek)
    eye = eyeball(head, 0)
    front = eye[np.argmax(v[eye, 2])]                         # the pupil
    side = eye[np.argmax(v[eye, 0])]                          # the white of the eye
    assert albedo[front].sum() < 0.1 and albedo[side].min() > 0.6


# ------------------------------------------------------------------------------ the rig

def test_skinning_and_joint_regressor_are_convex(head):
    assert np.allclose(head.weights.sum(1), 1.0, atol=1e-6) and head.weights.min() >= 0.0
    assert np.allclose(head.J_regressor.sum(1), 1.0, atol=1e-6)
    assert head.J_regressor.min() >= 0.0
    for side in (0, 1):
        ids = eyeball(head, side)
        assert len(ids) > 100
        others = np.setdiff1d(np.arange(head.n_vertices), ids)
        assert (head.weights[others, 3 + side] == 0.0).all()
        # the eye joint is the eyeball's centre
        centre = head.J_regressor[3 + side] @ head.v_template
        radius = np.linalg.norm(head.v_template[ids] - centre, axis=1)
        assert radius.min() > 0.011 and radius.max() < 0.0135
    assert np.abs(head.posedirs[eyeball(head, 0)]).max() == 0.0


def test_eye_joint_turns_only_its_eyeball_rigidly(head, model):
    rest, joints = pose(model)
    turned, _ = pose(model, eye_left=[0.0, 0.3, 0.0])
    left, right = eyeball(head, 0), eyeball(head, 1)
    c, s = math.cos(0.3), math.sin(0.3)
    rot_y = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    expected = (rest[left] - joints[3]) @ rot_y.T + joints[3]
    assert np.abs(turned[left] - expected).max() < 1e-9
    assert np.abs(turned[right] - rest[right]).max() == 0.0
    # elsewhere only the left lids follow the gaze a little (pose correctives)
    others = np.setdiff1d(np.arange(head.n_vertices), left)
    shift = np.linalg.norm(turned[others] - rest[others], axis=1)
    moved = others[shift > 0.0]
    assert (shift > 1e-4).sum() >= 40 and shift.max() > 4e-4      # the lid rim follows visibly
    assert np.linalg.norm(rest[moved] - joints[3], axis=1).max() < 0.03
    assert np.linalg.norm(turned[moved] - rest[moved], axis=1).max() < 0.003
    # without correctives the eye joint moves nothing but its eyeball
    bare = FaceModel(dataclasses.replace(head, posedirs=np.zeros_like(head.posedirs)),
                     dtype=torch.float64)
    turned, _ = pose(bare, eye_left=[0.0, 0.3, 0.0])
    assert np.abs(turned[others] - rest[others]).max() == 0.0


def test_jaw_opens_the_mouth_and_leaves_the_forehead(head, model):
    upper, lower = lip_centre(head)
    rest, _ = pose(model)
    opened, _ = pose(model, jaw=[0.3, 0.0, 0.0])
    assert np.linalg.norm(rest[upper] - rest[lower]) < 1e-6
    gap = np.linalg.norm(opened[upper] - opened[lower])
    assert 0.015 < gap < 0.035                     # 1.5 to 3.5 cm at 0.3 rad
    assert opened[lower, 1] < rest[lower, 1] - 0.01              # the lower lip drops
    assert abs(opened[upper, 1] - rest[upper, 1]) < 0.002         # the upper one stays
    forehead = np.nonzero(rest[:, 1] > 0.05)[0]
    assert np.abs(opened[forehead] - rest[forehead]).max() == 0.0


def test_open_mouth_shows_a_dark_cavity_not_a_hole(head, model):
    upper, lower = lip_centre(head)
    opened, _ = pose(model, jaw=[0.3, 0.0, 0.0])
    centre = 0.5 * (opened[upper] + opened[lower])
    triangles = head.triangles.astype(np.int64)
    ids, t = ray_hits(centre + [0.0, 0.0, 0.5], np.array([0.0, 0.0, -1.0]), opened[triangles])
    first = triangles[ids[np.argmin(t)]]
    hit_z = 0.5 + centre[2] - t.min()
    assert hit_z > centre[2] - 0.07                 # inside the mouth, not the back of the head
    assert head.vertex_albedo[first].mean() < 0.2


def test_pose_correctives_are_meaningful(head):
    blocks = np.abs(head.posedirs).reshape(head.n_vertices, 3, 4, 9).max(axis=(0, 1, 3))
    neck, jaw, eye_left, eye_right = blocks
    assert neck > 0.002 and jaw > 0.002                 # millimetres per radian at least
    assert 0.0 < eye_left < 0.01 and 0.0 < eye_right < 0.01


def test_joints_follow_identity(head, model):
    _, rest = pose(model)
    _, wide = pose(model, shape=one_hot(head.shape_names, "eye spacing"))
    assert np.linalg.norm(wide[3] - wide[4]) - np.linalg.norm(rest[3] - rest[4]) > 0.004
    _, long_chin = pose(model, shape=one_hot(head.shape_names, "chin length", 3.0))
    assert np.abs(long_chin - rest).max() > 0.0      # the jaw hinge patches move with the jaw


# ------------------------------------------------------------------------------ components

def test_components_are_linear_and_combinable(head, model):
    rng = np.random.default_rng(7)
    a, b = ({"shape": rng.uniform(-2, 2, head.n_shape),
             "expression": rng.uniform(0, 1, head.n_expression)} for _ in range(2))
    rest, _ = pose(model)
    va, _ = pose(model, **a)
    vb, _ = pose(model, **b)
    vab, _ = pose(model, **{key: a[key] + b[key] for key in a})
    assert np.abs((vab - rest) - ((va - rest) + (vb - rest))).max() < 1e-9
    assert np.abs(va - rest).max() > 0.005


@pytest.mark.parametrize("kind", ["shape", "expression"])
def test_every_component_is_visible_but_plausible(head, kind):
    dirs = head.shapedirs if kind == "shape" else head.exprdirs
    names = head.shape_names if kind == "shape" else head.expression_names
    for i, name in enumerate(names):
        largest = np.linalg.norm(dirs[:, :, i], axis=1).max()
        assert 0.0015 < largest < 0.02, f"{name} moves {largest * 1000:.1f} mm at 1"


def test_components_are_mirror_symmetric_except_one_sided_ones(head):
    v = head.v_template.astype(np.float64)
    mirror, flip = mirror_map(head), np.array([-1.0, 1.0, 1.0])
    for dirs, names in ((head.shapedirs, head.shape_names),
                        (head.exprdirs, head.expression_names)):
        for i, name in enumerate(names):
            d = dirs[:, :, i].astype(np.float64)
            asymmetry = np.abs(d[mirror] * flip - d).max()
            if name in ONE_SIDED:
                assert asymmetry > 0.001, name
            else:
                assert asymmetry < 1e-6, name
    left = head.exprdirs[:, :, head.expression_names.index("blink left")]
    right = head.exprdirs[:, :, head.expression_names.index("blink right")]
    assert np.abs(left[mirror] * flip - right).max() < 1e-6
    assert np.abs(left[v[:, 0] < 0]).max() == 0.0


def test_blink_closes_the_lid_over_the_eye(head, model):
    i = head.expression_names.index("blink left")
    rest, _ = pose(model)
    shut, _ = pose(model, expression=one_hot(head.expression_names, "blink left"))
    # the upper lid's middle (the vertex the blink moves most) meets the lower lid
    skin = skin_ids(head)
    rim = skin[np.argmax(np.linalg.norm(head.exprdirs[skin, :, i], axis=1))]
    lower_lid = skin[(rest[skin, 1] < rest[rim, 1] - 0.006)
                     & (np.linalg.norm(rest[skin] - rest[rim], axis=1) < 0.02)]
    assert np.linalg.norm(shut[lower_lid] - shut[rim], axis=1).min() < 0.001
    # and the skin now covers the pupil, which it did not before
    eye = eyeball(head, 0)
    pupil = eye[np.argmax(rest[eye, 2])]
    triangles = head.triangles.astype(np.int64)
    skin_triangles = triangles[np.isin(triangles, skin).all(1)]
    up = np.array([0.0, 0.0, 1.0])
    assert len(ray_hits(rest[pupil], up, rest[skin_triangles])[0]) == 0
    assert len(ray_hits(shut[pupil], up, shut[skin_triangles])[0]) > 0
