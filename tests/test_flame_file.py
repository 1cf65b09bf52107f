"""Reading FLAME files without chumpy and without running code from them; face model sources."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from tests.support import flame_fixture as ff
from portrait_rig import flame_file
from portrait_rig.face_data import FaceData
from portrait_rig.face_source import load_face_data
from portrait_rig.flame_file import FlameFileError, load_flame, read_flame_pickle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def arrays():
    return ff.random_flame_arrays(seed=1)


@pytest.fixture(scope="module")
def distributed(arrays, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "FLAME2020"   # the official archive's folder
    folder.mkdir()
    path = folder / "generic_model.pkl"
    ff.write_distributed_pickle(path, arrays)
    return path


@pytest.fixture(scope="module")
def small():
    return ff.random_flame_arrays(seed=3, n_vertices=200, n_triangles=300)


def assert_same_arrays(read: dict, written: dict):
    for key, value in written.items():
        if key == "J":
            continue
        if isinstance(value, np.ndarray):
            assert read[key].dtype == value.dtype, key
            np.testing.assert_array_equal(read[key], value, err_msg=key)
        else:
            assert read[key] == value


# ------------------------------------------------------------------ the distributed file

def test_distributed_pickle_names_chumpy_and_scipy_like_the_original(distributed):
    import pickletools
    with open(distributed, "rb") as fh:
        stream = fh.read()
    globals_ = {arg for op, arg, _ in pickletools.genops(stream) if op.name == "GLOBAL"}
    assert stream[:2] == b"\x80\x02"
    assert {"chumpy.ch Ch", "scipy.sparse.csc csc_matrix",
            "numpy.core.multiarray _reconstruct"} <= globals_
    assert "chumpy" not in sys.modules and "chumpy.ch" not in sys.modules


def test_reads_arrays_bit_exact(distributed, arrays):
    read = read_flame_pickle(distributed)
    assert_same_arrays(read, arrays)
    assert isinstance(read["J"], flame_file._Unresolved)   # chumpy expression, not needed
    assert read["J"].qualified_name == "chumpy.ch_ops.add"


def test_load_flame_splits_identity_and_expression(distributed, arrays):
    data = load_flame(distributed)
    dirs = arrays["shapedirs"].astype(np.float32)
    np.testing.assert_array_equal(data.shapedirs, dirs[:, :, :300])
    np.testing.assert_array_equal(data.exprdirs, dirs[:, :, 300:])
    for ours, theirs in (("v_template", "v_template"), ("triangles", "f"), ("posedirs", "posedirs"),
                         ("J_regressor", "J_regressor"), ("weights", "weights")):
        np.testing.assert_array_equal(getattr(data, ours),
                                      arrays[theirs].astype(getattr(data, ours).dtype))
    assert data.parents.tolist() == [-1, 0, 1, 1, 1]
    assert (data.name, data.source, data.version) == ("FLAME", str(distributed), "2020")
    assert data.uv is None
    np.testing.assert_array_equal(data.vertex_albedo,
                                  np.tile(np.float32(flame_file.DEFAULT_SKIN_ALBEDO), (5023, 1)))


def test_custom_component_counts(distributed, arrays):
    data = load_flame(distributed, n_shape=20, n_expression=7)
    assert (data.n_shape, data.n_expression) == (20, 7)
    np.testing.assert_array_equal(data.exprdirs,
                                  arrays["shapedirs"][:, :, 300:307].astype(np.float32))
    assert load_flame(distributed, 0, 0).n_shape == 0


@pytest.mark.parametrize("counts, message", [((301, 100), "n_shape=301 outside 0..300"),
                                             ((300, 101), "n_expression=101 outside 0..100"),
                                             ((-1, 10), "n_shape=-1"),
                                             ((10.0, 10), "must be an integer")])
def test_component_counts_beyond_the_file_are_refused(distributed, counts, message):
    with pytest.raises(FlameFileError, match=message):
        load_flame(distributed, *counts)


def test_reading_needs_neither_scipy_nor_chumpy(distributed):
    code = ("import sys; from portrait_rig.flame_file import load_flame; "
            f"d = load_flame({str(distributed)!r}); "
            "bad = [m for m in ('scipy', 'chumpy', 'torch') if m in sys.modules]; "
            "assert not bad, bad; print(d.n_vertices)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5023"


# ------------------------------------------------------------------ other spellings and variants

@pytest.mark.parametrize("protocol", [0, 1, 2])
@pytest.mark.parametrize("numpy_core", ["numpy.core", "numpy._core"])
def test_protocols_and_numpy2_spelling(small, tmp_path, protocol, numpy_core):
    path = tmp_path / "generic_model.pkl"
    ff.write_distributed_pickle(path, small, protocol=protocol, numpy_core=numpy_core)
    assert numpy_core.encode() + b".multiarray" in path.read_bytes()
    assert_same_arrays(read_flame_pickle(path), small)


@pytest.mark.parametrize("dtype, root", [(np.uint32, 0xFFFFFFFF), (np.int64, -1),
                                         (np.int64, 0xFFFFFFFF), (np.uint64, 2 ** 64 - 1),
                                         (np.float64, 4294967295.0)])
def test_kintree_root_becomes_minus_one(small, tmp_path, dtype, root):
    kintree = np.array([[root, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=dtype)
    ff.write_distributed_pickle(tmp_path / "m.pkl", {**small, "kintree_table": kintree})
    assert load_flame(tmp_path / "m.pkl").parents.tolist() == [-1, 0, 1, 1, 1]


@pytest.mark.parametrize("kintree, message", [
    ([[7, 0, 1, 1, 1], [0, 1, 2, 3, 4]], "root parent is 7"),
    ([[-1, 0, 1, 1, 1], [0, 2, 1, 3, 4]], "joint ids"),
    ([[-1, 0, 3, 1, 1], [0, 1, 2, 3, 4]], "not a tree"),
    ([[-1, 0, 1, 1, 1]], "expected \\(2, J\\)")])
def test_bad_kintree_is_refused(small, tmp_path, kintree, message):
    path = tmp_path / "m.pkl"
    ff.write_distributed_pickle(path, {**small, "kintree_table": np.array(kintree, np.int64)})
    with pytest.raises(FlameFileError, match=message):
        load_flame(path)


@pytest.mark.parametrize("sparse_class", ["csc_matrix", "csr_matrix", "csc_array", "csr_array"])
def test_flame2023_style_file(tmp_path, sparse_class):
    """Same arrays, other dtypes (float32, int64 triangles, int64 kintree with -1), shapedirs as a
    plain array and the regressor pickled by today's scipy (``scipy.sparse._csc`` etc.)."""
    sparse = pytest.importorskip("scipy.sparse")
    arrays = ff.random_flame_arrays(seed=4, n_vertices=200, n_triangles=300, float_dtype=np.float32,
                                    face_dtype=np.int64, kintree_dtype=np.int64)
    content = {**arrays, "J_regressor": getattr(sparse, sparse_class)(arrays["J_regressor"])}
    path = tmp_path / "flame2023.pkl"
    with open(path, "wb") as fh:
        pickle.dump(content, fh, protocol=4)
    assert_same_arrays(read_flame_pickle(path), arrays)
    data = load_flame(path)
    assert data.version == "2023" and data.parents.tolist() == [-1, 0, 1, 1, 1]
    np.testing.assert_array_equal(data.J_regressor, arrays["J_regressor"])


def test_protocol5_plain_numpy_file(small, tmp_path):
    path = tmp_path / "FLAME_NEUTRAL.pkl"
    with open(path, "wb") as fh:
        pickle.dump(small, fh, protocol=5)
    assert_same_arrays(read_flame_pickle(path), small)


@pytest.mark.parametrize("path, version", [("FLAME2020/generic_model.pkl", "2020"),
                                           ("models/flame2023.pkl", "2023"),
                                           ("flame2023_no_jaw.pkl", "2023 (no jaw)"),
                                           ("FLAME2019/male_model.pkl", "2019"),
                                           ("data/generic_model.pkl", "unknown")])
def test_version_from_the_path(path, version):
    assert flame_file.guess_flame_version(path) == version


# ------------------------------------------------------------------ refusing hostile files

def side_effect_calls(target):
    """(module, name, args) that would create ``target`` if they were ever called."""
    return [("os", "system", (f"touch {target}",)),
            ("posix", "system", (f"touch {target}",)),
            ("subprocess", "Popen", (["touch", str(target)],)),
            ("subprocess", "check_call", (["touch", str(target)],)),
            ("builtins", "eval", (f"open({str(target)!r}, 'w')",)),
            ("__builtin__", "eval", (f"open({str(target)!r}, 'w')",)),   # Python 2 spelling
            ("builtins", "exec", (f"open({str(target)!r}, 'w')",)),
            ("builtins", "open", (str(target), "w")),
            ("numpy.testing._private.utils", "runstring",
             (f"open({str(target)!r}, 'w')", {})),
            ("numpy", "save", (str(target), 1))]


@pytest.mark.parametrize("index", range(10))
def test_refuses_calls_and_runs_nothing(tmp_path, index):
    target = tmp_path / "created"
    module, name, args = side_effect_calls(target)[index]
    path = tmp_path / "evil.pkl"
    path.write_bytes(ff.pickle_calling(module, name, *args))
    normalised = {"__builtin__": "builtins"}.get(module, module)
    with pytest.raises(FlameFileError, match=f"refused to load {normalised}.{name}"):
        load_flame(path)
    assert not target.exists()


class _Hostile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_refuses_a_hostile_value_among_genuine_arrays(small, tmp_path):
    target = tmp_path / "created"
    path = tmp_path / "generic_model.pkl"
    ff.write_distributed_pickle(path, {**small, "bs_type": _Hostile(target)})
    with pytest.raises(FlameFileError, match=r"refused to load (posix|os|nt)\.system"):
        read_flame_pickle(path)
    assert not target.exists()


@pytest.mark.parametrize("module, name, args, message", [
    ("builtins", "getattr", (1, "real"), "builtins.getattr"),
    ("builtins", "__import__", ("os",), "builtins.__import__"),
    ("collections", "OrderedDict", (), "collections.OrderedDict"),
    ("numpy", "load", ("x.npy",), "numpy.load"),
    ("scipy.sparse", "load_npz", ("x.npz",), "scipy.sparse.load_npz"),
    # Allowed helpers used outside their narrow purpose:
    ("copy_reg", "_reconstructor", (np.ndarray, np.ndarray, None), "copyreg._reconstructor"),
    ("_codecs", "encode", ("x", "rot13"), "_codecs.encode"),
])
def test_refuses_other_globals(tmp_path, module, name, args, message):
    path = tmp_path / "m.pkl"
    path.write_bytes(ff.pickle_calling(module, name, *args))
    with pytest.raises(FlameFileError, match=message.replace(".", r"\.")):
        read_flame_pickle(path)


# ------------------------------------------------------------------ malformed files

def test_truncated_garbage_and_wrong_content(distributed, tmp_path):
    stream = distributed.read_bytes()
    cases = {"truncated": stream[: len(stream) // 2], "cut_header": stream[:40], "empty": b"",
             "garbage": np.random.default_rng(0).bytes(4096),
             "text": b"v 0 0 0\nf 1 2 3\n"}
    for label, content in cases.items():
        path = tmp_path / f"{label}.pkl"
        path.write_bytes(content)
        with pytest.raises(FlameFileError, match="not a readable FLAME pickle"):
            load_flame(path)
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(FlameFileError, match="holds a list"):
        load_flame(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_flame(tmp_path / "missing.pkl")


def test_missing_or_unusable_arrays(small, tmp_path):
    path = tmp_path / "m.pkl"
    ff.write_distributed_pickle(path, {k: v for k, v in small.items() if k != "weights"})
    with pytest.raises(FlameFileError, match="has no 'weights'"):
        load_flame(path)
    # shapedirs stored as a chumpy expression has no value to read without chumpy.
    ff.write_distributed_pickle(path, small, chumpy_keys=(), derived_keys=("shapedirs",))
    with pytest.raises(FlameFileError, match="'shapedirs' is a chumpy.ch_ops.add expression"):
        load_flame(path)
    ff.write_distributed_pickle(path, {**small, "weights": "lbs"})
    with pytest.raises(FlameFileError, match="'weights' is str"):
        load_flame(path)
    ff.write_distributed_pickle(path, {**small, "weights": small["weights"][:, :4]})
    with pytest.raises(FlameFileError, match="weights has shape"):
        load_flame(path)
    triangles = small["f"].astype(np.int64)
    triangles[7, 1] = 2 ** 32 + 5   # would wrap to vertex 5 in int32
    ff.write_distributed_pickle(path, {**small, "f": triangles})
    with pytest.raises(FlameFileError, match="f indexes vertices outside 0..199"):
        load_flame(path)


def test_inconsistent_sparse_regressor(small, tmp_path):
    state = ff.csc_state(small["J_regressor"])
    state["indices"] = state["indices"] + 1000   # rows out of range
    with ff._stand_in_classes("scipy.sparse.csc.csc_matrix") as classes:
        content = {**small, "J_regressor": classes["scipy.sparse.csc.csc_matrix"](state)}
        stream = pickle.dumps(content, protocol=2)
    path = tmp_path / "m.pkl"
    path.write_bytes(stream)
    with pytest.raises(FlameFileError, match="inconsistent index arrays"):
        read_flame_pickle(path)


# ------------------------------------------------------------------ face model sources

def test_sources(distributed, tmp_path):
    flame = load_face_data(str(distributed), n_shape=12, n_expression=4)
    assert (flame.name, flame.n_shape, flame.n_expression) == ("FLAME", 12, 4)

    npz = tmp_path / "face.npz"
    flame.save(npz)
    again = load_face_data(npz)
    for key, value in flame.arrays().items():
        np.testing.assert_array_equal(again.arrays()[key], value)
    fewer = load_face_data(str(npz), n_shape=5, n_expression=0)
    np.testing.assert_array_equal(fewer.shapedirs, flame.shapedirs[:, :, :5])
    assert fewer.n_expression == 0
    with pytest.raises(ValueError, match="n_shape=13 outside 0..12"):
        load_face_data(str(npz), n_shape=13)

    with pytest.raises(ValueError, match="unknown face model source .*'model.obj'"):
        load_face_data("model.obj")
    with pytest.raises(FileNotFoundError, match="face model file not found"):
        load_face_data(str(tmp_path / "absent.npz"))
    with pytest.raises(FileNotFoundError, match="face model file not found"):
        load_face_data(str(tmp_path / "absent.pkl"))


def test_demo_source():
    pytest.importorskip("portrait_rig.demo_head")
    data = load_face_data("demo")
    assert isinstance(data, FaceData) and data.n_vertices > 0
    fewer = load_face_data("demo", n_shape=min(1, data.n_shape), n_expression=0)
    assert (fewer.n_shape, fewer.n_expression) == (min(1, data.n_shape), 0)
