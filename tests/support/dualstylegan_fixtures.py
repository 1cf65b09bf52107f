"""DualStyleGAN test networks: pattern weights, official-layout files, and how the reference
outputs in tests/data/dualstylegan/ were made.

Reference outputs (``official.npz``) come from the official code (williamyang1991/DualStyleGAN
at b3f0cf8, with its CPU ops ``model/stylegan/op_cpu`` in place of the CUDA ones, as its
readme describes for CPU inference), run in float32 on the CPU of this project's environment,
with the weights ``pattern_state`` draws for the tensor names and shapes in ``keys.json``:

* generator: the official ``DualStyleGAN(32, 512, 8, channel_multiplier=2, res_index=4)``: a
  32x32 network with the official widths (512 channels; its transforms hard-code 512), 8 W+
  layers, ModRes blocks on layers 0-4 and colour transforms on 5-7, so that both paths and a
  ToRGB on each side of the split are exercised. ``keys.json["generator"]`` lists its
  ``state_dict`` as the official module names it. Inputs ``content_z`` and ``exstyle_z`` [2, 8,
  512] (np.random.RandomState(1) and (2) normal draws). Outputs:
  ``exstyle_w`` = ``generator.generator.style`` applied layer by layer to ``exstyle_z`` (what
  ``style_transfer.py`` feeds as the extrinsic code); ``image_default`` = ``generator([content_z],
  exstyle_w, z_plus_latent=True, truncation=0.75, truncation_latent=0, use_res=True,
  interp_weights=WEIGHTS_DEFAULT, randomize_noise=False)`` (``style_transfer.py``'s call with
  its default weights shortened to 8 layers); ``image_mixed`` the same call with
  ``WEIGHTS_MIXED`` (a different value on every layer) and truncation 1; ``image_content``
  with all weights 0 (the intrinsic StyleGAN2 alone).
* encoder: the official ``GradualStyleEncoder(50, 'ir_se', opts)`` (input_nc 3, n_styles 8)
  at reduced widths: ``get_blocks`` returning stages of depth 64, 16, 32, 64 with the
  official 3, 4, 14, 3 units (built with the official ``get_block`` and
  ``bottleneck_IR_SE``), and the style heads and lateral layers rebuilt as the official
  ``GradualStyleBlock(64, 64, 16 | 32 | 64)`` and 1x1 convolutions for those widths. Its
  forward is the official one. In eval mode (batch norm on running statistics), input
  ``encoder_input`` [2, 3, 64, 64] (np.random.RandomState(3) uniform in [-1, 1]), output
  ``encoder_codes`` [2, 8, 64].
* sampler: the official ``_netT(128, 7 * 512)`` and ``_netT(128, 11 * 512)`` of
  ``model/sampler/icp.py`` in eval mode, inputs ``sampler_noise`` [2, 2, 128]
  (np.random.RandomState(4); row 0 to the structure network, row 1 to the colour one),
  output ``sampler_codes`` [2, 18, 512] = cat(structure [2, 7, 512], colour [2, 11, 512]).

The weights themselves are not stored: ``pattern_state`` regenerates them from the key list.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from server.checkpoints.dualstylegan import dualstylegan_from_state
from server.models.dualstylegan import DualStyleGAN, DualStyleGANConfig
from server.models.psp_encoder import PSPEncoder, PSPEncoderConfig
from server.models.style_sampler import StyleSampler, StyleSamplerConfig
from server.models.stylegan2 import StyleGAN2Config
from tests.support.stylegan_fixtures import official_to_rosinality

DATA = Path(__file__).resolve().parents[1] / "data" / "dualstylegan"
KEYS = DATA / "keys.json"
OFFICIAL = DATA / "official.npz"
MANIFESTS = DATA / "official_1024_keys.json"

FIXTURE_LAYERS = 8
WEIGHTS_DEFAULT = [0.75] * 5 + [1.0] * 3
WEIGHTS_MIXED = [0.9, 0.2, 0.6, 0.0, 1.0, 0.3, 0.8, 0.5]
SEEDS = {"generator": 10, "encoder": 11, "sampler": 12}

# A narrow network of the same architecture for backend and server tests (our files only).
TINY = DualStyleGANConfig(StyleGAN2Config(img_resolution=32, z_dim=16, w_dim=16,
                                          channel_base=512, channel_max=16, mapping_layers=2),
                          structure_layers=5)
TINY_ENCODER = PSPEncoderConfig(stem=16, stages=((16, 1), (32, 1), (24, 1), (16, 1)),
                                n_styles=8, style_dim=16)
TINY_SAMPLER = StyleSamplerConfig(noise_dim=8, hidden=8, structure_layers=5, colour_layers=3,
                                  code_dim=16)


def official_keys(network: str) -> list[tuple[str, list[int]]]:
    """(name, shape) of the fixture network's official state dict ('generator', 'encoder',
    'sampler'), as the official code lists it."""
    return [(k, v) for k, v in json.loads(KEYS.read_text())[network]]


def pattern_tensor(name: str, shape, generator: torch.Generator) -> torch.Tensor:
    """One tensor of the pattern, for its official name: a standard normal draw n [shape] from
    ``generator``, shaped by the tensor's role so that every tensor changes the output and
    activations stay of order one:

    ``*.kernel`` rosinality's FIR [1, 3, 3, 1] (outer product / 64, x 4; n unused);
    ``*.num_batches_tracked`` 100; ``*.running_var`` 0.5 + |n|; ``*.running_mean`` 0.1 n;
    mapping and T_s weights (``style.<i>.weight``, lr multiplier 0.01) 100 n;
    colour transforms ``res.<k>.weight`` I sqrt(C) + n; AdaIN ``*norm*.style.weight``
    n / sqrt(fan in), ``*norm*.style.bias`` 1 + 0.2 n (gamma half), 0.2 n (beta half);
    ModRes convolutions ``res.<k>.conv*.0.weight`` 0.3 n; ``*.modulation.bias`` 1 + 0.2 n;
    other one-element or 1-D ``*.weight`` (batch norm, PReLU, noise strengths) 1 + 0.2 n;
    other ``*.bias`` 0.2 n; torch's own conv and linear weights (encoder, sampler, not the
    equalised ``*.linear.weight``) n / sqrt(fan in); everything else n (the equalised and
    modulated layers scale their weights at run time).
    """
    n = torch.randn(shape, generator=generator)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "kernel":
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        return torch.outer(taps, taps) / 64 * 4
    if leaf == "num_batches_tracked":
        return torch.tensor(100)
    if leaf == "running_var":
        return 0.5 + n.abs()
    if leaf == "running_mean":
        return 0.1 * n
    if re.search(r"(^|\.)style\.\d+\.weight$", name):
        return 100 * n
    if re.fullmatch(r"res\.\d+\.weight", name):
        return torch.eye(shape[0]) * math.sqrt(shape[1]) + n
    if re.search(r"norm2?\.style\.weight$", name):
        return n / math.sqrt(shape[1])
    if re.search(r"norm2?\.style\.bias$", name):
        half = shape[0] // 2
        return torch.cat([1 + 0.2 * n[:half], 0.2 * n[half:]])
    if re.fullmatch(r"res\.\d+\.conv2?\.0\.weight", name):
        return 0.3 * n
    if name.endswith("modulation.bias"):
        return 1 + 0.2 * n
    if leaf == "weight" and len(shape) <= 1:
        return 1 + 0.2 * n
    if leaf == "bias":
        return 0.2 * n
    if (leaf == "weight" and not name.startswith(("generator.", "decoder.", "res."))
            and not name.endswith("linear.weight")):
        return n / math.sqrt(math.prod(shape[1:]))
    return n


def pattern_state(keys, seed: int) -> OrderedDict[str, torch.Tensor]:
    """The pattern weights for ``keys`` [(name, shape)], drawn in order from
    ``torch.Generator().manual_seed(seed)``."""
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict((name, pattern_tensor(name, shape, generator)) for name, shape in keys)


def official_inputs() -> dict[str, np.ndarray]:
    """The fixture inputs (see the module notes)."""
    return {"content_z": np.random.RandomState(1).randn(2, FIXTURE_LAYERS, 512).astype(np.float32),
            "exstyle_z": np.random.RandomState(2).randn(2, FIXTURE_LAYERS, 512).astype(np.float32),
            "encoder_input": np.random.RandomState(3).uniform(-1, 1, (2, 3, 64, 64))
            .astype(np.float32),
            "sampler_noise": np.random.RandomState(4).randn(2, 2, 128).astype(np.float32)}


# ------------------------------------------------------------------------------ our networks

def official_generator_keys(config: DualStyleGANConfig) -> list[tuple[str, list[int]]]:
    """(official name, shape) of every tensor a DualStyleGAN of ``config`` stores."""
    with torch.device("meta"):
        model = DualStyleGAN(config)
    return [(k, list(v.shape)) for k, v in official_generator_state(model).items()]


def random_dualstylegan(config: DualStyleGANConfig = TINY, seed: int = 0) -> DualStyleGAN:
    """A DualStyleGAN of ``config`` holding the pattern weights of its official names, loaded
    through ``dualstylegan_from_state``."""
    return dualstylegan_from_state(pattern_state(official_generator_keys(config), seed))


def official_generator_state(model: DualStyleGAN) -> OrderedDict[str, torch.Tensor]:
    """``model``'s tensors under the official DualStyleGAN names (what ``g_ema`` holds)."""
    state = model.state_dict()
    generator = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
    ros, _ = official_to_rosinality(generator, model.config.generator)
    out = OrderedDict((k, v) for k, v in state.items() if k.startswith("style."))
    out.update((f"generator.{k}", v) for k, v in ros.items())
    out.update((k, v) for k, v in state.items() if k.startswith("res."))
    return out


def random_sampler(config: StyleSamplerConfig = TINY_SAMPLER, seed: int = 0) -> StyleSampler:
    with torch.device("meta"):
        model = StyleSampler(config)
    keys = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict(pattern_state(keys, seed), assign=True)
    return model.eval().requires_grad_(False)


def random_encoder(config: PSPEncoderConfig = TINY_ENCODER, seed: int = 0) -> PSPEncoder:
    with torch.device("meta"):
        model = PSPEncoder(config)
    keys = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict(pattern_state(keys, seed), assign=True)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------ official files

def write_generator_pt(path: Path, model: DualStyleGAN) -> None:
    """``torch.save({'g_ema': state})`` as ``finetune_dualstylegan.py`` writes it."""
    torch.save({"g_ema": official_generator_state(model)}, path)


def write_sampler_pt(path: Path, sampler: StyleSampler) -> None:
    """``torch.save({'color': ..., 'structure': ...})`` as ``train_sampler.py`` writes it."""
    state = sampler.state_dict()
    torch.save({part: OrderedDict((k[len(part) + 1:], v) for k, v in state.items()
                                  if k.startswith(part + "."))
                for part in ("color", "structure")}, path)


def write_exstyle_codes(path: Path, codes: dict[str, np.ndarray]) -> None:
    """``np.save`` of a dict name -> [1, L, C] float32, as ``destylize.py`` writes it."""
    np.save(path, {name: np.asarray(code, np.float32).reshape(1, *np.shape(code)[-2:])
                   for name, code in codes.items()})


def write_encoder_pt(path: Path, encoder: PSPEncoder, decoder: DualStyleGAN,
                     latent_avg: torch.Tensor | None = None) -> None:
    """pSp's save dict: {'state_dict': encoder.* + decoder.*, 'opts', 'latent_avg'?};
    ``decoder``'s intrinsic StyleGAN2 plays the decoder."""
    state = OrderedDict((f"encoder.{k}", v) for k, v in encoder.state_dict().items())
    state.update((f"decoder.{k[len('generator.'):]}", v)
                 for k, v in official_generator_state(decoder).items()
                 if k.startswith("generator."))
    n_styles = encoder.config.n_styles
    opts = {"encoder_type": "GradualStyleEncoder", "input_nc": 3, "learn_in_w": False,
            "start_from_latent_avg": latent_avg is not None,
            "output_size": 2 ** ((n_styles + 2) // 2), "checkpoint_path": None}
    ckpt = {"state_dict": state, "opts": opts}
    if latent_avg is not None:
        ckpt["latent_avg"] = latent_avg
    torch.save(ckpt, path)


# ------------------------------------------------------------------------------ a style folder

CARTOON = [f"cartoon_{i:03d}.png" for i in range(4)]
ANIME = [f"anime_{i:03d}.png" for i in range(3)]


def write_style_home(home: Path, n_expression: int) -> dict:
    """A model folder for the dualstylegan backend with TINY networks: ``home/dualstylegan``
    as the official checkpoint/ folder (cartoon: codes and sampler; anime: refined codes
    preferred over plain ones, no sampler; the Z+ encoder) and ``home/rignet.safetensors``, a
    RigNet for a face model with ``n_expression`` components. Returns the paths and the
    networks written."""
    from PIL import Image

    from server.checkpoints.stylerig import save_rignet
    from server.models.rignet import ControlLayout, RigNet

    root = home / "dualstylegan"
    layers = TINY.num_ws
    cartoon, anime = random_dualstylegan(TINY, seed=1), random_dualstylegan(TINY, seed=2)
    # The intrinsic StyleGAN2 is FFHQ's in every family: only the style paths differ.
    anime.generator.load_state_dict(cartoon.generator.state_dict())
    for name, model in (("cartoon", cartoon), ("anime", anime)):
        (root / name).mkdir(parents=True)
        write_generator_pt(root / name / "generator.pt", model)
    codes = {n: np.random.RandomState(10 + i).randn(1, layers, 16) for i, n in enumerate(CARTOON)}
    write_exstyle_codes(root / "cartoon" / "exstyle_code.npy", codes)
    anime_codes = {n: np.random.RandomState(20 + i).randn(1, layers, 16)
                   for i, n in enumerate(ANIME)}
    write_exstyle_codes(root / "anime" / "refined_exstyle_code.npy", anime_codes)
    write_exstyle_codes(root / "anime" / "exstyle_code.npy",
                        {"unrefined.png": np.zeros((1, layers, 16))})
    sampler = random_sampler(TINY_SAMPLER, seed=3)
    write_sampler_pt(root / "cartoon" / "sampler.pt", sampler)
    encoder = random_encoder(TINY_ENCODER, seed=4)
    write_encoder_pt(root / "encoder.pt", encoder, cartoon)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        net = RigNet(layers, 16, latent_dim=4, layout=ControlLayout.for_model(n_expression))
        with torch.no_grad():
            net.decoder.weight.normal_(0, 0.5)
    save_rignet(net.eval(), home / "rignet.safetensors")
    photo = np.random.RandomState(6).randint(0, 256, (512, 512, 3), dtype=np.uint8)
    Image.fromarray(photo).save(home / "photo.png")
    Image.fromarray(photo[::-1]).save(home / "style.png")
    return {"root": root, "rignet": home / "rignet.safetensors", "net": net,
            "cartoon": cartoon, "anime": anime, "codes": codes, "anime_codes": anime_codes,
            "sampler": sampler, "encoder": encoder, "photo": home / "photo.png",
            "style": home / "style.png"}
