"""A tiny face model in FLAME layout for tests: a UV-sphere "head" with five joints.

``synthetic_face()`` returns a ``FaceData`` whose every array has FLAME's layout and meaning,
small enough for fast tests:

* mesh: a UV sphere of ``radius`` metres centred on the origin, poles on the Y axis, triangles
  counter-clockwise seen from outside;
* identity components (4): width, height, depth, chin forward, in centimetres per unit;
* expression components (3): mouth drop, smile, brow raise, confined to the front of the head
  (the "face area", z > 0.3 * radius), so an expression change moves nothing else;
* joints: root (sphere centre), neck (below the centre), jaw (on the Y axis at chin height),
  eyes (on the front upper-left/right surface); skin weights are hard: the lower front of the
  head follows the jaw, two small patches the eyes, the bottom cap the root, the rest the neck;
* posedirs are zero; albedo is a skin tone with darker eyes and redder lips.
"""

from __future__ import annotations

import numpy as np

from portrait_rig.face_data import FaceData


def uv_sphere(radius: float = 1.0, n_lat: int = 16, n_lon: int = 24,
              centre=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Vertices [V, 3] float64 and CCW-outward triangles [F, 3] int32 of a UV sphere with poles
    on +-Y; V = (n_lat - 1) * n_lon + 2, F = 2 * n_lon * (n_lat - 1)."""
    theta = np.linspace(0.0, np.pi, n_lat + 1)[1:-1]                    # polar angle from +Y
    phi = np.linspace(0.0, 2 * np.pi, n_lon, endpoint=False)
    theta, phi = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)],
                    axis=-1).reshape(-1, 3)
    verts = np.concatenate([[[0.0, 1.0, 0.0]], ring, [[0.0, -1.0, 0.0]]]) * radius
    verts += np.asarray(centre, dtype=np.float64)
    top, bottom = 0, len(verts) - 1

    def idx(lat, lon):
        return 1 + lat * n_lon + lon % n_lon

    triangles = []
    for j in range(n_lon):
        triangles.append((top, idx(0, j), idx(0, j + 1)))
        triangles.append((bottom, idx(n_lat - 2, j + 1), idx(n_lat - 2, j)))
        for i in range(n_lat - 2):
            a, b = idx(i, j), idx(i, j + 1)
            c, d = idx(i + 1, j), idx(i + 1, j + 1)
            triangles += [(a, c, d), (a, d, b)]
    triangles = np.asarray(triangles, dtype=np.int32)
    return verts, triangles


def synthetic_face(radius: float = 0.1, n_lat: int = 24, n_lon: int = 32) -> FaceData:
    """The test head described in the module notes (defaults: 738 vertices, 1472 triangles)."""
    verts, triangles = uv_sphere(radius, n_lat, n_lon)
    n = len(verts)
    unit = verts / radius
    x, y, z = unit[:, 0], unit[:, 1], unit[:, 2]
    front = np.clip((z - 0.3) / 0.4, 0.0, 1.0)            # 0 behind z = 0.3, 1 beyond z = 0.7

    cm = 0.01
    shapedirs = np.zeros((n, 3, 4))
    shapedirs[:, 0, 0] = x * cm                           # width
    shapedirs[:, 1, 1] = y * cm                           # height
    shapedirs[:, 2, 2] = z * cm                           # depth
    shapedirs[:, 2, 3] = np.clip(-y, 0, None) * front * cm  # chin forward

    exprdirs = np.zeros((n, 3, 3))
    lower = np.clip(-y, 0, None) * front
    exprdirs[:, 1, 0] = -lower * cm                       # mouth drop
    exprdirs[:, 1, 1] = np.abs(x) * lower * cm            # smile: corners up
    exprdirs[:, 0, 1] = x * lower * cm * 0.5              # ... and out
    exprdirs[:, 1, 2] = np.clip(y, 0, None) * front * cm  # brow raise

    eye_centres = np.array([[0.35, 0.3, 0.0], [-0.35, 0.3, 0.0]])
    eye_centres[:, 2] = np.sqrt(1 - (eye_centres[:, :2] ** 2).sum(1))
    eye_patch = [np.arccos(np.clip(unit @ c, -1, 1)) < 0.25 for c in eye_centres]
    jaw = (y < -0.2) & (z > 0.3)
    cap = y < -0.7

    weights = np.zeros((n, 5))
    weights[:, 1] = 1.0                                   # neck carries the head
    weights[cap] = [1, 0, 0, 0, 0]
    weights[jaw] = [0, 0, 1, 0, 0]
    weights[eye_patch[0]] = [0, 0, 0, 1, 0]
    weights[eye_patch[1]] = [0, 0, 0, 0, 1]

    def mean_of(selection):
        row = selection.astype(np.float64)
        return row / row.sum()

    ring_y = np.unique(np.round(y, 9))
    jaw_ring = np.isclose(y, ring_y[np.argmin(np.abs(ring_y + 0.15))])
    regressor = np.stack([np.full(n, 1.0 / n), mean_of(cap), mean_of(jaw_ring),
                          mean_of(eye_patch[0]), mean_of(eye_patch[1])])

    albedo = np.tile([0.78, 0.57, 0.46], (n, 1))
    albedo[eye_patch[0] | eye_patch[1]] = [0.25, 0.2, 0.18]
    lips = (np.abs(y + 0.35) < 0.1) & (np.abs(x) < 0.35) & (z > 0.5)
    albedo[lips] = [0.7, 0.32, 0.3]

    return FaceData(
        v_template=verts, triangles=triangles, shapedirs=shapedirs, exprdirs=exprdirs,
        posedirs=np.zeros((n, 3, 36)), J_regressor=regressor, weights=weights,
        parents=np.array([-1, 0, 1, 1, 1]), vertex_albedo=albedo,
        shape_names=["width", "height", "depth", "chin"],
        expression_names=["mouth_drop", "smile", "brow_raise"],
        name="synthetic test head", source="tests/support/synthetic_face.py")
