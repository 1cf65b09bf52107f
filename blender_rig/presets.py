"""Expression presets: named mixes of the face model's expression components.

A preset is written in component display names (the demo head's expression components:
``portrait_rig.demo_head.EXPRESSION_COMPONENTS``), looked up through the rig Key's
``portrait_rig_component_names`` mapping (key name -> display name, see ``rig_builder``).
Applying one sets every expression key (``Exp###``): the preset's components to their
weights, all others to 0, so presets do not pile up and can be keyframed one after another.
Models without named expression components (FLAME's are anonymous PCA directions) offer only
Neutral.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import rig_builder

EXPRESSION_KEY_PREFIX = "Exp"


@dataclass(frozen=True)
class Preset:
    label: str
    description: str
    weights: dict[str, float] = field(default_factory=dict)   # display name -> coefficient


PRESETS: dict[str, Preset] = {
    "NEUTRAL": Preset("Neutral", "All expression keys at rest"),
    "SMILE": Preset("Smile", "Both mouth corners up, eyes narrowed a little",
                    {"smile": 1.0, "squint": 0.3}),
    "SURPRISE": Preset("Surprise", "Brows up, lips parted and rounded",
                       {"brow raise": 1.5, "mouth funnel": 0.8}),
    "SAD": Preset("Sad", "Mouth corners down, brows lifted, lips pressed",
                  {"frown": 1.2, "brow raise": 0.5, "lip press": 0.3}),
    "ANGRY": Preset("Angry", "Brows drawn down, nose wrinkled, lips pressed",
                    {"brow furrow": 1.5, "sneer": 0.6, "lip press": 0.8, "squint": 0.4}),
    "DISGUST": Preset("Disgust", "Upper lip raised, brows drawn",
                      {"sneer": 1.3, "brow furrow": 0.6, "frown": 0.4}),
    "WINK": Preset("Wink", "Left eye closed with a half smile",
                   {"blink left": 1.0, "half smile left": 0.6}),
    "BLINK": Preset("Blink", "Both eyes closed", {"blink left": 1.0, "blink right": 1.0}),
    "KISS": Preset("Kiss", "Lips puckered", {"pucker": 1.2}),
    "PUFF": Preset("Puffed Cheeks", "Cheeks blown out, lips closed",
                   {"cheek puff": 1.2, "lip press": 0.5}),
}


def label(identifier: str) -> str:
    preset = PRESETS.get(identifier)
    return preset.label if preset else identifier


def description(identifier: str) -> str:
    preset = PRESETS.get(identifier)
    return preset.description if preset else "Set the rig's expression shape keys to a preset"


ENUM_ITEMS = tuple((key, preset.label, preset.description, index)
                   for index, (key, preset) in enumerate(PRESETS.items()))


def expression_keys(rig) -> tuple[list, dict]:
    """The rig's expression key blocks in component order, and display name -> key block."""
    _, mesh_obj = rig_builder.rig_parts(rig)
    key = mesh_obj.data.shape_keys
    if key is None:
        return [], {}
    display = key.get(rig_builder.PROP_COMPONENT_NAMES, {})
    blocks = [block for block in key.key_blocks if block.name.startswith(EXPRESSION_KEY_PREFIX)]
    return blocks, {display.get(block.name, block.name): block for block in blocks}


def usable(rig) -> set[str]:
    """Presets whose every component the rig has."""
    _, by_name = expression_keys(rig)
    return {identifier for identifier, preset in PRESETS.items()
            if all(name in by_name for name in preset.weights)}


def apply(rig, identifier: str, *, insert_keyframes: bool = False, frame: int | None = None) -> int:
    """Set the rig's expression keys to preset ``identifier``; with ``insert_keyframes`` also
    key them all at ``frame``. Returns the number of keys set. Raises ValueError for an
    unknown preset or one that needs components the rig lacks."""
    preset = PRESETS.get(identifier)
    if preset is None:
        raise ValueError(f"unknown expression preset {identifier!r} "
                         f"(known: {', '.join(PRESETS)})")
    blocks, by_name = expression_keys(rig)
    missing = [name for name in preset.weights if name not in by_name]
    if missing:
        raise ValueError(f"preset {preset.label} needs the expression components "
                         f"{', '.join(missing)}, which rig '{rig.name}' does not have")
    targets = {block.name: 0.0 for block in blocks}
    targets.update({by_name[name].name: weight for name, weight in preset.weights.items()})
    for block in blocks:
        block.value = targets[block.name]
        if insert_keyframes:
            if frame is None:
                block.keyframe_insert("value")
            else:
                block.keyframe_insert("value", frame=frame)
    return len(blocks)
