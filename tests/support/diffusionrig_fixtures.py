"""Regression fixture for the DiffusionRig model and samplers: a tiny model's weights and the
outputs the official code computes from them.

tests/data/diffusionrig/
  tiny_unet.safetensors  ``denoisingUNet.*`` of a randomly initialised official DiffusionRig
                         in the ``TINY`` configuration, named as its state_dict names them,
                         stored float16 (the official outputs were computed from exactly these
                         values, in float32).
  tiny_official.npz      inputs and official outputs, float32 unless noted:
      x_t [2,3,16,16], t [2] int64, buffers [2,9,16,16], z [2,8]      UNet inputs
      eps [2,3,16,16]                                                  official UNet output
      noise [2,3,16,16]                                                initial noise
      ddim [2,3,16,16]   official ``ddim_sample_loop``, respacing "ddim20", clip_denoised
      ddim_x0 [4,2,3,16,16]  its ``pred_xstart`` at the steps DDIM_X0_STEPS
      dpm [2,3,16,16]    official dpm-solver (DPM-Solver++, multistep, order 2, x0 clipped to
                         [-1, 1], lower_order_final, denoise_to_zero) on the grid DPM_TIMESTEPS
      image [1,3,32,32], encoder_z [1,64]                              torchvision resnet18
                         (fc 512 -> 64) with ``patterned_encoder_state()`` weights
  stage1_256_keys.json   name -> shape of every tensor of the official full-size (stage-1,
                         256x256) model's state dict, built on the meta device

A ResNet-18 has 11.7M parameters, too many to ship, so the encoder's weights are a closed-form
pseudo-random pattern that this module and the generator compute identically.

Regenerate (needs an environment where the official code and ``torchvision.models.resnet18``
import):  python tests/support/diffusionrig_fixtures.py DIFFUSION_RIG_CHECKOUT DPM_SOLVER_CHECKOUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server.models.diffusionrig_unet import UNetConfig  # noqa: E402

FIXTURE_DIR = ROOT / "tests" / "data" / "diffusionrig"
WEIGHTS = FIXTURE_DIR / "tiny_unet.safetensors"
OUTPUTS = FIXTURE_DIR / "tiny_official.npz"
CHECKPOINT_KEYS = FIXTURE_DIR / "stage1_256_keys.json"

OFFICIAL_DIFFUSION_RIG = "adobe-research/diffusion-rig@92324f7582ef316b07870e9d9dcbcdd01cc4d77c"
OFFICIAL_DPM_SOLVER = "LuChengTHU/dpm-solver@52bc3fbcd5de56d60917b826b15d2b69460fc2fa"

# Every structural feature of the real model at a size that ships: two levels (a residual
# down- and up-sampling block), attention at 8x8 and in the middle, two heads (checks the
# legacy head-major qkv layout), skip projections in the decoder.
TINY = UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 1), num_res_blocks=1,
                  attention_ds=(2,), num_heads=2, latent_dim=8)
ENCODER_LATENT = 64
DDIM_X0_STEPS = (0, 1, 10, 19)
DPM_TIMESTEPS = (999, 888, 777, 666, 555, 444, 333, 222, 111, 0)



def _pattern(n: int, phase: float) -> np.ndarray:
    """n pseudo-random values in [0, 1): the fractional part of a scaled sine (float64)."""
    return np.modf(np.abs(np.sin(np.arange(n) * 12.9898 + phase) * 43758.5453))[0]


def patterned_encoder_state(latent_dim: int = ENCODER_LATENT) -> dict[str, torch.Tensor]:
    """Closed-form weights for a torchvision-named ResNet-18 encoder (no RNG involved):
    conv / linear weights uniform with std 1/sqrt(fan_in), BN scale ~1, shift, mean ~0.1,
    variance in [0.5, 1.5)."""
    from server.models.global_encoder import GlobalEncoder

    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in GlobalEncoder(latent_dim).state_dict().items()}
    state = {}
    for index, (name, (shape, dtype)) in enumerate(sorted(shapes.items())):
        if dtype == torch.int64:
            state[name] = torch.zeros(shape, dtype=torch.int64)
            continue
        n = int(np.prod(shape))
        u = _pattern(n, phase=1.37 * index + 0.5)
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            values = (2 * u - 1) * np.sqrt(3.0 / fan_in)
        elif name.endswith("running_var"):
            values = 0.5 + u
        elif name.endswith("weight"):
            values = 0.8 + 0.4 * u
        else:
            values = 0.2 * (2 * u - 1)
        state[name] = torch.from_numpy(values.reshape(tuple(shape))).float()
    return state


def load_fixture() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(UNet state dict under the official ``denoisingUNet.`` names, float32; the npz arrays
    as tensors)."""
    from safetensors.torch import load_file

    weights = {k: v.float() for k, v in load_file(str(WEIGHTS)).items()}
    with np.load(OUTPUTS) as data:
        arrays = {k: torch.from_numpy(data[k]) for k in data.files}
    return weights, arrays


def official_checkpoint_state() -> dict[str, torch.Tensor]:
    """A complete tiny DiffusionRig state dict under the official names: the fixture UNet plus
    the patterned encoder, as ``torch.save(model.state_dict())`` would write it."""
    weights, _ = load_fixture()
    return {**weights, **{f"encoder.{k}": v
                        for k, v in patterned_encoder_state(TINY.latent_dim).items()}}


# For backend tests: every structural feature at a size the CPU samples in milliseconds per
# step, with DiffusionRig's latent size (so its encoder is the full ResNet-18).
BACKEND_TINY = UNetConfig(image_size=32, model_channels=32, channel_mult=(1, 2),
                          num_res_blocks=1, attention_ds=(2,), num_heads=1, latent_dim=64)


def random_checkpoint_state(config: UNetConfig = BACKEND_TINY,
                            seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete DiffusionRig state dict for ``config`` under the official names: a random
    UNet (seeded, as ``_random_official_state``) and the patterned encoder."""
    from server.models.diffusionrig_unet import DiffusionRigUNet

    with torch.device("meta"):
        unet = DiffusionRigUNet(config)
    return {**{f"denoisingUNet.{k}": v for k, v in _random_official_state(unet, seed).items()},
            **{f"encoder.{k}": v for k, v in patterned_encoder_state(config.latent_dim).items()}}


def write_checkpoint(path: Path, config: UNetConfig = BACKEND_TINY, seed: int = 0) -> Path:
    """Write ``random_checkpoint_state`` as a float16 ``.safetensors`` (or ``.pt``) file."""
    from safetensors.torch import save_file

    state = {k: (v.half() if v.is_floating_point() else v).contiguous()
             for k, v in random_checkpoint_state(config, seed).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _random_official_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random values for every tensor (the official init zeroes output convolutions, which
    would hide whole paths), rounded through float16 so that the shipped file is exact."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=generator)
        if value.ndim >= 2:
            tensor = noise / np.sqrt(value[0].numel())
        elif name.endswith("weight"):                      # GroupNorm scales
            tensor = 1 + 0.2 * noise
        else:
            tensor = 0.1 * noise
        state[name] = tensor.half().float()
    return state


def generate(diffusion_rig_root: str, dpm_solver_root: str, seed: int = 0) -> None:
    """Run the official code on the tiny model and write the fixture files."""
    sys.path[:0] = [diffusion_rig_root, dpm_solver_root]
    from dpm_solver_pytorch import DPM_Solver, NoiseScheduleVP, model_wrapper
    from safetensors.torch import save_file
    from diffusion.gaussian_diffusion import get_named_beta_schedule
    from utils.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    args = model_and_diffusion_defaults()
    args.update(image_size=TINY.image_size, num_channels=TINY.model_channels,
                num_res_blocks=TINY.num_res_blocks, num_heads=TINY.num_heads,
                channel_mult=",".join(map(str, TINY.channel_mult)),
                attention_resolutions=",".join(str(TINY.image_size // d)
                                               for d in TINY.attention_ds),
                latent_dim=TINY.latent_dim, timestep_respacing="ddim20")
    model, diffusion = create_model_and_diffusion(**args)
    model.eval()
    unet = model.denoisingUNet
    unet_state = _random_official_state(unet, seed)
    unet.load_state_dict(unet_state)

    g = torch.Generator().manual_seed(seed + 1)
    size = TINY.image_size
    x_t = torch.randn(2, 3, size, size, generator=g)
    t = torch.tensor([999, 17])
    buffers = torch.rand(2, 9, size, size, generator=g) * 2 - 1
    z = torch.randn(2, TINY.latent_dim, generator=g)
    noise = torch.randn(2, 3, size, size, generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1

    with torch.no_grad():
        eps = unet(x_t, t, buffers, z)
        steps = list(diffusion.ddim_sample_loop_progressive(
            model, (2, 3, size, size), noise=noise, clip_denoised=True,
            model_kwargs={"physic_cond": buffers, "detail_cond": z}))
        ddim = steps[-1]["sample"]
        ddim_x0 = torch.stack([steps[i]["pred_xstart"] for i in DDIM_X0_STEPS])

        # dpm-solver on the integer grid: continuous time (n + 1) / N is exactly step n of its
        # discrete schedule; its model time (t - 1/N) * 1000 is rounded back to n.
        schedule = NoiseScheduleVP("discrete",
                                   betas=torch.from_numpy(get_named_beta_schedule("linear", 1000)))
        model_fn = model_wrapper(lambda x, tt: unet(x, tt.round(), buffers, z), schedule)
        solver = DPM_Solver(model_fn, schedule, algorithm_type="dpmsolver++",
                            correcting_x0_fn=lambda x0, tt: x0.clamp(-1, 1))
        grid = torch.tensor([(n + 1) / 1000 for n in DPM_TIMESTEPS], dtype=torch.float32)
        solver.get_time_steps = lambda **kw: grid
        dpm = solver.sample(noise.clone(), steps=len(grid) - 1, order=2, method="multistep",
                            lower_order_final=True, denoise_to_zero=True)

        from torchvision.models import resnet18
        encoder = resnet18()
        encoder.fc = torch.nn.Linear(512, ENCODER_LATENT)
        encoder.load_state_dict(patterned_encoder_state())
        encoder_z = encoder.eval()(image)

    with torch.device("meta"):
        full_size, _ = create_model_and_diffusion(**model_and_diffusion_defaults())
    keys = {k: list(v.shape) for k, v in full_size.state_dict().items()}

    FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    CHECKPOINT_KEYS.write_text(json.dumps({"source": OFFICIAL_DIFFUSION_RIG, "tensors": keys},
                                          indent=0) + "\n")
    save_file({f"denoisingUNet.{k}": v.half().contiguous() for k, v in unet_state.items()},
              str(WEIGHTS), metadata={"source": OFFICIAL_DIFFUSION_RIG, "config": repr(TINY)})
    np.savez(OUTPUTS, x_t=x_t.numpy(), t=t.numpy(), buffers=buffers.numpy(), z=z.numpy(),
             eps=eps.numpy(), noise=noise.numpy(), ddim=ddim.numpy(), ddim_x0=ddim_x0.numpy(),
             dpm=dpm.numpy(), image=image.numpy(), encoder_z=encoder_z.numpy())
    for path in (WEIGHTS, OUTPUTS, CHECKPOINT_KEYS):
        print(f"wrote {path} ({path.stat().st_size} B)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    generate(sys.argv[1], sys.argv[2])
