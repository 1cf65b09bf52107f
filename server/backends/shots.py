"""Temporal stability of rendered sequences: shots, fixed noise and latent smoothing.

A *shot* is a run of frames rendered as one take (the render engine names it after the scene
and its active camera, so a camera cut starts a new shot). Render requests of a sequence carry
a ``shot`` object (docs/protocol.md, "Shots"), parsed here into ``Shot`` and handed to backends
as ``RenderRequest.shot``. Backends that draw random numbers or encode frames independently
use it to keep consecutive frames consistent:

* Fixed noise (diffusion backends): the initial noise of every frame of a shot is drawn from
  ``shot.seed``, so only the rig parameters change between frames, never the noise.
* Latent smoothing (StyleGAN backends, ``shot.smooth``), after stylegan3-editing's video
  pipeline: the fine layers ``w[:, FINE_LAYER_START:]`` (colour and micro-texture) are replaced
  by their mean over the frames, then every frame's latent is filtered in time with
  ``KERNEL``: w'_t = (0.25 w_{t-2} + 0.75 w_{t-1} + w_t + 0.75 w_{t+1} + 0.25 w_{t+2}) / 3,
  and the same filter is applied to per-frame input transforms (StyleGAN3). Unlike the
  reference, which drops the two frames at each end, the kernel is renormalised over the
  frames that exist, so every frame of the shot is rendered and a constant sequence stays
  constant.

Smoothing frame t needs its neighbours, which a server rendering frames as they arrive has
not necessarily seen. So a request with ``smooth`` carries the parameters of its neighbours
(``Shot.neighbors``: up to two frames either side, of the same shot, in render order); the
backend computes their latents (cheap next to synthesis, and shared when the neighbours are
in the same batch) and keeps the centre of ``smooth_latents`` over that window. The filter
result at t is exact, because it only reaches two frames either side; the fine-layer mean is
taken over the window instead of the whole shot, so that no frame depends on frames that may
not exist yet.

Array functions accept numpy arrays or torch tensors (any device) and return the same type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from portrait_rig.params import ParamError, RigParams
from portrait_rig.protocol import SHOT_RADIUS as RADIUS

KERNEL = (0.25, 0.75, 1.0, 0.75, 0.25)   # weights of frames t-2 .. t+2 (sum 3)
assert len(KERNEL) == 2 * RADIUS + 1
FINE_LAYER_START = 9                     # W+ layers from here on are "fine" (stylegan3-editing)

MAX_SHOT_ID = 128
MAX_SEED = 2**32                         # as RigParams.appearance.seed
MAX_FRAME = 1_048_574                    # Blender's last frame number


class ShotError(ValueError):
    """A malformed ``shot`` object. ``field`` is the offending path (``shot.seed``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Shot:
    """Where a frame sits in a sequence.

    ``id`` names the shot; ``seed`` is its noise seed, shared by all of its frames; ``frame``
    is this request's frame number; ``smooth`` asks StyleGAN backends for latent smoothing;
    ``neighbors`` are ``(frame, RigParams)`` of up to ``RADIUS`` frames of the same shot on
    either side in render order (sent with ``smooth`` only; fewer at the shot's ends).
    """
    id: str
    seed: int = 0
    frame: int = 0
    smooth: bool = False
    neighbors: tuple[tuple[int, RigParams], ...] = ()

    def window(self, params: RigParams) -> tuple[list[int], list[RigParams], int]:
        """The frames to smooth over: frame numbers and parameters in frame order (this
        request's own ``params`` included) and the index of this frame among them."""
        entries = sorted([*self.neighbors, (self.frame, params)], key=lambda e: e[0])
        frames = [frame for frame, _ in entries]
        return frames, [p for _, p in entries], frames.index(self.frame)

    def to_dict(self) -> dict:
        out = {"id": self.id, "seed": self.seed, "frame": self.frame, "smooth": self.smooth}
        if self.neighbors:
            out["neighbors"] = [{"frame": f, "params": p.to_dict()} for f, p in self.neighbors]
        return out


def _integer(path: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise ShotError(path, f"expected an integer in [{low}, {high}), got {value!r}")
    return value


def parse_shot(data: Any, n_shape: int, n_expression: int, path: str = "shot") -> Shot:
    """Validate a wire ``shot`` object. Raises ShotError for the shot's own fields and
    ParamError (its ``field`` prefixed with the path, e.g. ``shot.neighbors[0].params.pose.jaw``)
    for a neighbour's parameters."""
    if not isinstance(data, dict):
        raise ShotError(path, f"expected an object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"id", "seed", "frame", "smooth", "neighbors"})
    if unknown:
        raise ShotError(f"{path}.{unknown[0]}", "unknown field (allowed: id, seed, frame, "
                                                "smooth, neighbors)")
    shot_id = data.get("id")
    if not isinstance(shot_id, str) or not 0 < len(shot_id) <= MAX_SHOT_ID:
        raise ShotError(f"{path}.id", f"required, a string of 1..{MAX_SHOT_ID} characters")
    seed = _integer(f"{path}.seed", data.get("seed", 0), 0, MAX_SEED)
    frame = _integer(f"{path}.frame", data.get("frame", 0), -MAX_FRAME, MAX_FRAME + 1)
    smooth = data.get("smooth", False)
    if not isinstance(smooth, bool):
        raise ShotError(f"{path}.smooth", f"expected true or false, got {smooth!r}")

    raw = data.get("neighbors", [])
    if not isinstance(raw, list) or len(raw) > 2 * RADIUS:
        raise ShotError(f"{path}.neighbors", f"expected a list of at most {2 * RADIUS} "
                                             "{frame, params} objects")
    neighbors, seen = [], {frame}
    for i, entry in enumerate(raw):
        where = f"{path}.neighbors[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"frame", "params"}:
            raise ShotError(where, "expected an object with exactly 'frame' and 'params'")
        number = _integer(f"{where}.frame", entry["frame"], -MAX_FRAME, MAX_FRAME + 1)
        if number in seen:
            raise ShotError(f"{where}.frame", f"frame {number} appears twice in the window")
        seen.add(number)
        try:
            params = RigParams.from_dict(entry["params"])
            params.validate_for_model(n_shape, n_expression)
        except ParamError as exc:
            inner = "" if exc.field == "params" else f".{exc.field}"
            raise ParamError(f"{where}.params{inner}", str(exc).split(": ", 1)[-1]) from None
        neighbors.append((number, params))
    before = sum(1 for number, _ in neighbors if number < frame)
    if before > RADIUS or len(neighbors) - before > RADIUS:
        raise ShotError(f"{path}.neighbors", f"at most {RADIUS} frames on each side of "
                                             f"frame {frame}")
    return Shot(shot_id, seed, frame, smooth, tuple(neighbors))


# ------------------------------------------------------------------------------ smoothing

def smoothing_matrix(n: int) -> np.ndarray:
    """[n, n] float64: row t holds the weights that make frame t of an n-frame sequence,
    ``KERNEL`` centred on t, cut at the sequence's ends and renormalised to sum 1."""
    if n < 1:
        raise ValueError(f"a sequence needs at least one frame, got {n}")
    weights = np.zeros((n, n))
    for t in range(n):
        for offset, weight in zip(range(-RADIUS, RADIUS + 1), KERNEL):
            if 0 <= t + offset < n:
                weights[t, t + offset] = weight
    return weights / weights.sum(axis=1, keepdims=True)


def smooth(x, axis: int = 0):
    """Filter ``x`` (numpy array or torch tensor) along its time axis ``axis`` with the
    renormalised kernel (``smoothing_matrix``). Same shape, type, dtype and device."""
    if isinstance(x, np.ndarray):
        moved = np.moveaxis(x, axis, 0)
        n = moved.shape[0]
        out = (smoothing_matrix(n) @ moved.reshape(n, -1)).astype(x.dtype, copy=False)
        return np.moveaxis(out.reshape(moved.shape), 0, axis)
    import torch                                # backends pass tensors; the core stays numpy

    moved = torch.movedim(x, axis, 0)
    n = moved.shape[0]
    weights = torch.as_tensor(smoothing_matrix(n), dtype=x.dtype, device=x.device)
    out = weights @ moved.reshape(n, -1)
    return torch.movedim(out.reshape(moved.shape), 0, axis)


def smooth_latents(w, fine_start: int = FINE_LAYER_START):
    """W+ latents [T, L, C] (frames, layers, channels) -> smoothed [T, L, C]: layers
    ``fine_start:`` replaced by their mean over the T frames, then ``smooth`` over time."""
    if w.ndim != 3:
        raise ValueError(f"expected W+ latents [frames, layers, channels], got shape "
                         f"{tuple(w.shape)}")
    if isinstance(w, np.ndarray):
        w = w.copy()
        w[:, fine_start:] = w[:, fine_start:].mean(axis=0, keepdims=True)
    else:
        w = w.clone()
        w[:, fine_start:] = w[:, fine_start:].mean(dim=0, keepdim=True)
    return smooth(w)


def smooth_transforms(transforms):
    """Per-frame transforms [T, ...] (e.g. StyleGAN3 input transforms [T, 3, 3]) filtered
    entry by entry over time, as the reference pipeline does."""
    return smooth(transforms)
