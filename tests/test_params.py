"""The rig parameter schema: JSON round trip and validation that names the offending field."""

import json
import math

import pytest

from portrait_rig.params import (MAX_EXPRESSION, MAX_TEXTURE, ParamError, RigParams,
                                 SCHEMA_VERSION)


def full_params() -> RigParams:
    data = {
        "shape": [0.5, -1.0, 2.0],
        "expression": [1.0, 0.0, -0.25],
        "pose": {"global": [0.0, 0.3, 0.0], "neck": [0.1, 0.0, 0.0], "jaw": [0.2, 0.0, 0.0],
                 "eye_left": [0.0, 0.1, 0.0], "eye_right": [0.0, 0.1, 0.0]},
        "translation": [0.0, 0.01, -0.5],
        "camera": {"type": "orthographic", "scale": 9.5, "tx": 0.01, "ty": -0.02},
        "lighting": {"sh": [[3.0, 2.9, 2.8]] + [[0.1 * k, 0.0, -0.1] for k in range(8)]},
        "appearance": {"seed": 42, "truncation": 0.5, "personal_model": "alice",
                       "texture": [0.25, -1.5, 30.0]},
    }
    return RigParams.from_dict(data)


def test_json_round_trip_is_exact():
    params = full_params()
    again = RigParams.from_json(params.to_json())
    assert again == params
    assert again.to_dict() == params.to_dict()
    assert json.loads(params.to_json())["version"] == SCHEMA_VERSION


def test_defaults_are_valid_and_complete():
    params = RigParams()
    assert RigParams.from_dict(params.to_dict()) == params
    assert len(params.lighting.sh) == 9 and all(len(row) == 3 for row in params.lighting.sh)
    assert params.pose.to_dict().keys() == {"global", "neck", "jaw", "eye_left", "eye_right"}
    assert params.camera.type == "perspective"


def test_missing_fields_take_defaults():
    params = RigParams.from_dict({"expression": [1.0]})
    assert params.expression == [1.0]
    assert params.pose == RigParams().pose


@pytest.mark.parametrize("data, field", [
    ({"pose": {"jaw": [0.0, 0.0]}}, "pose.jaw"),
    ({"pose": {"neck": [0.0, float("nan"), 0.0]}}, "pose.neck[1]"),
    ({"pose": {"eye_left": [0.0, 0.0, 100.0]}}, "pose.eye_left[2]"),
    ({"pose": {"hip": [0.0, 0.0, 0.0]}}, "pose.hip"),
    ({"shape": [0.0, float("inf")]}, "shape[1]"),
    ({"shape": [1e6]}, "shape[0]"),
    ({"shape": "wide"}, "shape"),
    ({"expression": [0.0] * (MAX_EXPRESSION + 1)}, "expression"),
    ({"expression": [True]}, "expression[0]"),
    ({"translation": [0.0, 0.0]}, "translation"),
    ({"translation": [0.0, 0.0, 1e9]}, "translation[2]"),
    ({"camera": {"fov_y": 0.0}}, "camera.fov_y"),
    ({"camera": {"fov_y": 200.0}}, "camera.fov_y"),
    ({"camera": {"type": "fisheye"}}, "camera.type"),
    ({"camera": {"scale": -1.0}}, "camera.scale"),
    ({"camera": {"near": 5.0, "far": 1.0}}, "camera.near"),
    ({"camera": {"zoom": 2}}, "camera.zoom"),
    ({"lighting": {"sh": [[1.0, 1.0, 1.0]] * 8}}, "lighting.sh"),
    ({"lighting": {"sh": [[1.0, 1.0]] * 9}}, "lighting.sh[0]"),
    ({"lighting": {"sh": [[1.0, 1.0, 1.0]] * 8 + [[1.0, 1e9, 1.0]]}}, "lighting.sh[8][1]"),
    ({"appearance": {"seed": -3}}, "appearance.seed"),
    ({"appearance": {"seed": 1.5}}, "appearance.seed"),
    ({"appearance": {"latent_file": 7}}, "appearance.latent_file"),
    ({"appearance": {"style": "anime"}}, "appearance.style"),
    ({"appearance": {"texture": [0.0, float("nan")]}}, "appearance.texture[1]"),
    ({"appearance": {"texture": [1e3]}}, "appearance.texture[0]"),
    ({"appearance": {"texture": [0.0] * (MAX_TEXTURE + 1)}}, "appearance.texture"),
    ({"appearance": {"texture": {"0": 1.0}}}, "appearance.texture"),
    ({"colour": 1}, "colour"),
    ({"version": 99}, "version"),
])
def test_bad_input_names_the_field(data, field):
    with pytest.raises(ParamError) as err:
        RigParams.from_dict(data)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_rotation_norm_is_bounded():
    limit = 4 * math.pi
    ok = [limit * 0.99 / math.sqrt(3)] * 3
    RigParams.from_dict({"pose": {"global": ok}})
    with pytest.raises(ParamError) as err:
        RigParams.from_dict({"pose": {"global": [limit * 0.9] * 3}})
    assert err.value.field == "pose.global"


def test_non_object_and_bad_json():
    with pytest.raises(ParamError):
        RigParams.from_dict([1, 2, 3])
    with pytest.raises(ParamError) as err:
        RigParams.from_json("{not json")
    assert err.value.field == "params"


def test_validate_for_model_counts():
    params = RigParams.from_dict({"shape": [0.1] * 5, "expression": [0.2] * 3})
    params.validate_for_model(5, 3)
    with pytest.raises(ParamError) as err:
        params.validate_for_model(4, 3)
    assert err.value.field == "shape"
    with pytest.raises(ParamError) as err:
        params.validate_for_model(5, 2)
    assert err.value.field == "expression"


def test_copy_is_independent():
    params = full_params()
    other = params.copy()
    other.pose.jaw[0] = 0.5
    other.appearance.texture[0] = 2.0
    assert params.pose.jaw[0] == 0.2 and params.appearance.texture[0] == 0.25
