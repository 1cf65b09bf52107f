"""StyleGAN checkpoints in the official file layouts, written from our generators.

* ``write_nvidia_pickle``: a network snapshot as NVlabs' training loop writes it,
  ``pickle.dump(dict(G, D, G_ema, augment_pipe, training_set_kwargs))``, each network reduced
  the way ``torch_utils.persistence`` reduces it: ``_reconstruct_persistent_obj(meta)`` with
  meta = {type: 'class', version: 6, module_src, class_name, state}, state being the
  module's ``__dict__`` (parameters, buffers, submodules, init kwargs as ``dnnlib.util.EasyDict``,
  plain attributes as NumPy scalars). Stand-ins registered under those module names in
  ``sys.modules`` while pickling make the stream name exactly those globals; they are removed
  after. ``module_src`` is a script that would leave a marker file if anything executed it.
* ``write_rosinality_checkpoint``: ``torch.save`` of rosinality's ``g_ema`` (+ ``latent_avg``),
  optionally with training-checkpoint extras (``args`` namespace).
* ``write_pickle_calling``: a pickle whose stream calls an arbitrary global (refusal tests).

Generators come from ``random_generator``: seeded random weights, with the tensors the
official code initialises to zero or one (biases, noise strengths, w_avg, magnitude EMAs)
randomised too so that every tensor affects the image.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from server.checkpoints.stylegan import _TO_ROSINALITY, _rosinality_table
from server.models import StyleGAN2Config, StyleGAN2Generator, StyleGAN3Config, StyleGAN3Generator
from tests.support.stand_ins import stand_in_modules

TINY_SG2 = StyleGAN2Config(img_resolution=32, z_dim=16, w_dim=16, channel_base=256, channel_max=16,
                           mapping_layers=2, num_fp16_res=4, conv_clamp=256)
TINY_SG3_T = StyleGAN3Config.preset("t", 32, z_dim=16, w_dim=16, channel_base=256, channel_max=16)
TINY_SG3_R = StyleGAN3Config.preset("r", 32, z_dim=16, w_dim=16, channel_base=512, channel_max=32)
# Fewer, narrower layers (fast), still with every kind of layer (critically sampled tail, ToRGB).
SMALL_SG3_T = StyleGAN3Config.preset("t", 16, z_dim=8, w_dim=8, channel_base=64, channel_max=8,
                                     num_layers=6)
SMALL_SG3_R = StyleGAN3Config.preset("r", 16, z_dim=8, w_dim=8, channel_base=128, channel_max=16,
                                     num_layers=6)

PERSISTENCE_VERSION = 6
DATA = Path(__file__).resolve().parents[1] / "data"


def official_keys(name: str) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor of an official checkpoint, in state_dict order; ``name``
    is a key of tests/data/stylegan_checkpoint_keys.json, e.g. 'stylegan3-r-G_ema-1024'."""
    tensors = json.loads((DATA / "stylegan_checkpoint_keys.json").read_text())[name]["tensors"]
    return [(k, list(v)) for k, v in tensors.items()]


def official_to_rosinality(state, config):
    """Inverse of ``server.checkpoints.stylegan.rosinality_to_official`` (for writing
    rosinality-format fixtures): (rosinality ``g_ema`` state dict, latent_avg)."""
    table = _rosinality_table(int(config.img_resolution).bit_length() - 1, config.mapping_layers)
    ros = OrderedDict((r, _TO_ROSINALITY[kind](state[o]).clone()) for o, r, kind in table)
    return ros, state["mapping.w_avg"].clone()


def random_generator(config, seed: int = 0):
    """Generator for ``config`` with seeded random weights (see module docstring), eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = StyleGAN3Generator if isinstance(config, StyleGAN3Config) else StyleGAN2Generator
        G = cls(config)
        with torch.no_grad():
            for name, t in list(G.named_parameters()) + list(G.named_buffers()):
                if name.endswith("magnitude_ema"):
                    t.copy_(torch.rand([]) + 0.5)
                elif t.ndim == 0 or name.endswith(("bias", "w_avg")):
                    t.add_(torch.randn_like(t) * 0.2)
    return G.eval().requires_grad_(False)


# --- NVIDIA network pickles ----------------------------------------------------------------

def _reconstruct_persistent_obj(meta):  # named in the stream only; never called by our loader
    raise RuntimeError("stand-in for torch_utils.persistence._reconstruct_persistent_obj")


class EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict."""


_STAND_INS = {
    "torch_utils": {}, "dnnlib": {"EasyDict": EasyDict}, "dnnlib.util": {"EasyDict": EasyDict},
    "torch_utils.persistence": {"_reconstruct_persistent_obj": _reconstruct_persistent_obj}}


@contextlib.contextmanager
def official_globals():
    """Register ``torch_utils.persistence`` and ``dnnlib.util`` stand-ins while pickling."""
    with stand_in_modules(_STAND_INS):
        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
        yield


class PersistentRecord:
    """Pickles as ``torch_utils.persistence._reconstruct_persistent_obj(meta)``."""

    def __init__(self, class_name: str, state: dict, module_src: str):
        self.meta = dict(type="class", version=PERSISTENCE_VERSION, module_src=module_src,
                         class_name=class_name, state=state)

    def __reduce__(self):
        return _reconstruct_persistent_obj, (self.meta,)


_OFFICIAL_CLASS = {"StyleGAN2Generator": "Generator", "StyleGAN3Generator": "Generator"}


def _record(module: torch.nn.Module, module_src: str, init_kwargs: dict | None = None):
    """The persistent record of ``module``: its ``__dict__`` as pickled by the official code
    (floats as NumPy scalars, tuples of ints as NumPy arrays, submodules as records)."""
    state = {}
    for key, value in vars(module).items():
        if isinstance(value, (StyleGAN2Config, StyleGAN3Config)):
            continue
        if isinstance(value, float):
            value = np.float64(value)
        elif isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
            value = np.asarray(value)
        state[key] = value
    state["_modules"] = OrderedDict((name, _record(child, module_src))
                                    for name, child in module._modules.items())
    state["_init_args"], state["_init_kwargs"] = (), init_kwargs or {}
    class_name = _OFFICIAL_CLASS.get(type(module).__name__, type(module).__name__)
    return PersistentRecord(class_name, state, module_src)


def official_init_kwargs(G, repo: str) -> dict:
    """Generator init kwargs as the official code passes them. 'stylegan2-ada': mapping_kwargs
    and synthesis_kwargs dicts ('stylegan2-ada-legacy': every option, as its legacy.py writes
    for converted TensorFlow pickles); 'stylegan3': synthesis kwargs flattened, fp16 and clamp
    left to the class defaults, as stylegan3's train.py does."""
    cfg = G.config
    kw = EasyDict(z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim,
                  img_resolution=cfg.img_resolution, img_channels=cfg.img_channels,
                  mapping_kwargs=EasyDict(num_layers=cfg.mapping_layers))
    if repo in ("stylegan2-ada", "stylegan2-ada-legacy"):
        if not isinstance(cfg, StyleGAN2Config):
            raise ValueError("stylegan2-ada pickles hold StyleGAN2 generators only")
        kw["synthesis_kwargs"] = EasyDict(channel_base=cfg.channel_base,
                                          channel_max=cfg.channel_max,
                                          num_fp16_res=cfg.num_fp16_res, conv_clamp=cfg.conv_clamp)
        if repo == "stylegan2-ada-legacy":
            kw["mapping_kwargs"].update(embed_features=None, layer_features=None,
                                        activation="lrelu", w_avg_beta=0.995,
                                        lr_multiplier=cfg.mapping_lr_multiplier)
            kw["synthesis_kwargs"].update(architecture="skip", use_noise=cfg.use_noise,
                                          resample_filter=list(cfg.resample_filter),
                                          activation="lrelu")
        return kw
    kw.update(channel_base=cfg.channel_base, channel_max=cfg.channel_max)
    if isinstance(cfg, StyleGAN3Config):
        default = StyleGAN3Config()
        kw.update({k: v for k, v in cfg.to_dict().items()
                   if k not in kw and not k.startswith("mapping_") and v != getattr(default, k)})
        kw.update(magnitude_ema_beta=0.5 ** (32 / 20e3))
    else:
        kw.update(fused_modconv_default="inference_only")
    return kw


def write_nvidia_pickle(path, G, repo: str = "stylegan3", marker_path=None,
                        extra_G_ema_state: dict | None = None) -> None:
    """Write ``G`` as G and G_ema of an official snapshot (see module docstring). The embedded
    ``module_src`` writes ``marker_path`` if it is ever executed. ``extra_G_ema_state`` adds
    entries to G_ema's state (e.g. a payload that must be refused)."""
    if marker_path:
        src = f"open({str(marker_path)!r}, 'w').close()\n"
    else:
        src = "raise RuntimeError('never executed')\n"
    G_ema = _record(G, src, official_init_kwargs(G, repo))
    G_ema.meta["state"].update(extra_G_ema_state or {})
    D = PersistentRecord("Discriminator", {
        "_parameters": OrderedDict(weight=torch.nn.Parameter(torch.ones(2, 2))),
        "_buffers": OrderedDict(), "_modules": OrderedDict(), "training": False,
        "_init_args": (), "_init_kwargs": EasyDict(c_dim=0)}, src)
    training_set_kwargs = dict(EasyDict(path="ffhq.zip", resolution=G.img_resolution))
    snapshot = dict(G=_record(G, src, official_init_kwargs(G, repo)), D=D, G_ema=G_ema,
                    augment_pipe=None, training_set_kwargs=training_set_kwargs)
    with official_globals(), open(path, "wb") as f:
        pickle.dump(snapshot, f)


# --- rosinality ----------------------------------------------------------------------------

def write_stylerig_home(home, direction_seed: int = 0):
    """A data folder for the stylerig backend: a random StyleGAN3-R generator (``SMALL_SG3_R``,
    seed 3) as ``stylegan/generator.pkl`` and a random edit direction
    ``stylegan/directions/age_boundary.npy``. Returns the generator and the direction [w_dim]."""
    home = Path(home)
    G = random_generator(SMALL_SG3_R, seed=3)
    (home / "stylegan" / "directions").mkdir(parents=True)
    write_nvidia_pickle(home / "stylegan" / "generator.pkl", G)
    direction = np.random.RandomState(direction_seed).randn(1, G.w_dim).astype(np.float32)
    np.save(home / "stylegan" / "directions" / "age_boundary.npy", direction)
    return G, torch.from_numpy(direction[0])


def write_rosinality_checkpoint(path, G: StyleGAN2Generator, latent_avg: bool = True,
                                training: bool = False) -> None:
    """``torch.save({'g_ema': ..., 'latent_avg': ...})`` as rosinality's convert_weight.py;
    ``training`` adds 'g' and an ``args`` namespace as its train.py checkpoints hold."""
    ros, w_avg = official_to_rosinality(G.state_dict(), G.config)
    ckpt = {"g_ema": ros}
    if latent_avg:
        ckpt["latent_avg"] = w_avg
    if training:
        ckpt.update(g=ros, args=argparse.Namespace(size=G.img_resolution, channel_multiplier=2))
    torch.save(ckpt, path)


# --- hostile pickles -----------------------------------------------------------------------

class _Call:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def write_pickle_calling(path, func, args: tuple, G=None) -> None:
    """A network pickle whose stream calls ``func(*args)``: nested inside G_ema's state when
    ``G`` is given (so the valid records before it load first), else at the top level."""
    if G is None:
        with open(path, "wb") as f:
            pickle.dump({"G_ema": _Call(func, args)}, f)
    else:
        write_nvidia_pickle(path, G, extra_G_ema_state={"payload": _Call(func, args)})


def storage_bytes_calling(func, args: tuple) -> bytes:
    """Bytes shaped like a pickled storage (legacy ``torch.save`` stream) whose inner pickle
    calls ``func(*args)``: what ``torch.storage._load_from_bytes`` would execute."""
    buffer = io.BytesIO()
    torch.save(_Call(func, args), buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()
