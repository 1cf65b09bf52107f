"""Pivotal tuning (Roich et al. 2022, PTI): a personal StyleGAN generator for one photo.

    python -m server.training.pti --photo PHOTO --name alice [--generator FILE]
        [--encoder FILE] [--pivot-steps 450] [--steps 350] [--lr 3e-4] [--locality]
        [--device cuda] [--restart]

1. Pivot: the photo is inverted (``server.inversion``): the encoder's W+ code when there is
   one (``--encoder``, default ``stylegan/encoder.pt`` when present; PTI's 'w+' pivot),
   refined by ``--pivot-steps`` of optimisation, or a W code optimised from w_avg (PTI's
   default 'w' pivot, 450 steps).
2. Tuning: every synthesis weight of a copy of the generator is fine-tuned (Adam, lr 3e-4,
   at most ``--steps`` 350 steps) so that the pivot renders the photo: pixel MSE + LPIPS
   (when its weights are in the data folder; tuning stops once it is at most 0.06, PTI's
   threshold) + the dlib identity distance (weight ``--identity-weight``). ``--locality``
   adds PTI's locality regulariser (off by default, as in PTI): each step a latent
   w = mapping(z, psi 0.5) is moved to distance 30 from the pivot along w - pivot, and the
   tuned generator's image there is held to the original's (0.1 MSE + 0.1 LPIPS).
3. Output in ``personal/<name>/`` (``server.paths``), each file written to a temporary name
   and renamed, the generator last: ``pivot.npz`` ('w' [num_ws, w_dim]), ``preview.png``
   (photo | pivot before tuning | after), ``pti.json`` (settings and reconstruction metrics
   before and after: PSNR and dlib identity distance against the aligned photo) and
   ``generator.safetensors`` - which ``appearance.personal_model = <name>`` renders (the
   pivot is its identity unless the request names another).

The run saves ``pti_state.pt`` after the pivot and every ``--save-every`` tuning steps; run
the same command again after a kill and it resumes there (``--restart`` starts over). The
state is removed once the model is written. Progress goes to stderr (tqdm), one JSON line per
step to ``pti_log.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from portrait_rig.files import write_atomic
from server import paths
from server.backends.check import check_file

STATE, LOG, RECORD, PREVIEW, PIVOT = ("pti_state.pt", "pti_log.jsonl", "pti.json",
                                      "preview.png", "pivot.npz")
LPIPS_THRESHOLD = 0.06
PIVOT_STEPS = 450            # PTI's first_inv_steps: the W pivot without an encoder
LOCALITY_ALPHA, LOCALITY_PSI, LOCALITY_WEIGHT = 30.0, 0.5, 0.1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.training.pti",
                                 description="Pivotal tuning: a personal StyleGAN generator "
                                             "for one photo")
    ap.add_argument("--photo", required=True, help="the portrait photo (PNG or JPEG)")
    ap.add_argument("--name", required=True, help="personal model name (letters, digits, ._-)")
    ap.add_argument("--generator", help="StyleGAN2/3 generator (default: the data folder's)")
    ap.add_argument("--encoder", help="e4e / ReStyle checkpoint for the pivot (default: "
                                      "stylegan/encoder.pt when present; 'none' to optimise)")
    ap.add_argument("--pivot-steps", type=int, default=None,
                    help="pivot optimisation steps (default 450 without an encoder, 0 with)")
    ap.add_argument("--steps", type=int, default=350, help="tuning steps (default 350)")
    ap.add_argument("--lr", type=float, default=3e-4, help="tuning learning rate")
    ap.add_argument("--identity-weight", type=float, default=0.5)
    ap.add_argument("--locality", action="store_true", help="PTI's locality regulariser")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="output folder (default: personal/<name>/ in the data folder)")
    ap.add_argument("--restart", action="store_true", help="ignore a saved state")
    args = ap.parse_args(argv)
    try:
        paths.check_name(args.name, "personal model")
        summary = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pti: {exc}", file=sys.stderr)
        return 2
    before, after = summary["before"], summary["after"]
    print(f"pti: {summary['out']}: PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB, "
          f"identity distance {before['identity_distance']:.4f} -> "
          f"{after['identity_distance']:.4f} after {summary['tuning_steps']} steps")
    return 0


def run(args) -> dict:
    """Pivot, tune and write the personal model (module notes); returns the pti.json record."""
    from tqdm import tqdm

    from server.checkpoints.encoders import load_encoder
    from server.checkpoints.stylegan import load_generator, save_generator
    from server.inversion.invert import PhotoInverter
    from server.models.lpips import load_lpips

    photo = Path(args.photo).expanduser().read_bytes()
    out = Path(args.out).expanduser() if args.out else paths.personal_generator(args.name).parent
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    generator_path = Path(args.generator).expanduser() if args.generator \
        else paths.stylegan_generator()
    problem = check_file(paths.stylerig_files({"generator": args.generator,
                                               "rignet": "none"})[0]).problem
    if problem:
        raise FileNotFoundError(problem)
    G = load_generator(generator_path, device)
    encoder_path = None if args.encoder == "none" else (
        Path(args.encoder).expanduser() if args.encoder else paths.stylegan_encoder())
    encoder = load_encoder(encoder_path, device) if encoder_path and encoder_path.is_file() \
        else None
    if args.encoder not in (None, "none") and encoder is None:
        raise FileNotFoundError(f"--encoder: file not found: {encoder_path}")
    lpips_files = paths.lpips_files()
    lpips = load_lpips(*lpips_files, device=device) if lpips_files else None
    pivot_steps = args.pivot_steps if args.pivot_steps is not None else \
        (0 if encoder is not None else PIVOT_STEPS)
    settings = {"photo_sha256": hashlib.sha256(photo).hexdigest(),
                "generator": str(generator_path), "encoder": str(encoder_path) if encoder else None,
                "pivot_steps": pivot_steps, "steps": args.steps, "lr": args.lr,
                "identity_weight": args.identity_weight, "locality": args.locality,
                "seed": args.seed}
    state = _load_state(out / STATE, settings, args.restart)
    log = open(out / LOG, "a" if state else "w")

    inverter = PhotoInverter(G, encoder, lpips)
    if state is None:
        bar = tqdm(total=pivot_steps or 1, desc="pivot", file=sys.stderr)
        inversion = inverter.invert(photo, "auto", pivot_steps, "w" if encoder is None else "w+",
                                    args.seed, on_progress=lambda *a: bar.update(1))
        bar.close()
        state = {"settings": settings, "pivot": torch.from_numpy(inversion.ws), "step": 0,
                 "generator": None, "optimizer": None,
                 "photo": torch.from_numpy(inversion.aligned),
                 "landmarks": torch.from_numpy(inversion.alignment.aligned_landmarks)}
        _save_state(out / STATE, state)
    pivot = state["pivot"].to(device)[None]

    from server.inversion.losses import LossWeights, ReconstructionLosses
    from server.inversion.invert import psnr, to_uint8
    from server.models.stylegan3 import set_transform

    photo_rgb = state["photo"].numpy()
    losses = ReconstructionLosses(photo_rgb, state["landmarks"].numpy(),
                                  LossWeights(pixel=1.0, lpips=1.0,
                                              identity=args.identity_weight, landmarks=0.0),
                                  lpips=lpips, descriptor=inverter.descriptor, device=device)
    tuned = copy.deepcopy(G)
    if state["generator"] is not None:
        tuned.load_state_dict(state["generator"])
    if hasattr(tuned.synthesis, "input"):
        set_transform(tuned)
    tuned.synthesis.requires_grad_(True)
    optimiser = torch.optim.Adam(tuned.synthesis.parameters(), lr=args.lr)
    if state["optimizer"] is not None:
        optimiser.load_state_dict(state["optimizer"])

    def render(net):
        return net.synthesis(pivot, noise_mode="const", force_fp32=True)

    def measure(net) -> tuple[dict, torch.Tensor]:
        with torch.no_grad():
            image = render(net)
            distance = losses.identity_distance(image).item() if losses.descriptor else None
            return {"psnr": round(psnr(image, losses.photo), 4),
                    "identity_distance": round(distance, 5) if distance is not None else None
                    }, image

    before, before_image = measure(inverter.G)
    step = state["step"]
    bar = tqdm(total=args.steps, initial=step, desc="tuning", file=sys.stderr)
    while step < args.steps:
        image = render(tuned)
        total, values = losses(image, step)
        if args.locality:
            total = total + _locality(G, tuned, pivot, lpips, args.seed, step, values)
        if lpips is not None and values.get("lpips", 1.0) <= LPIPS_THRESHOLD:
            break
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
        step += 1
        log.write(json.dumps({"step": step, **values}) + "\n")
        log.flush()
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in values.items() if k != "landmark_error"})
        if step % args.save_every == 0 and step < args.steps:
            state.update(step=step, generator=tuned.state_dict(),
                         optimizer=optimiser.state_dict())
            _save_state(out / STATE, state)
    bar.close()
    log.close()
    tuned.requires_grad_(False)
    after, after_image = measure(tuned)

    # Write: pivot, preview, record, then the generator that makes the model visible.
    buffer = io.BytesIO()
    np.savez(buffer, w=state["pivot"].numpy().astype(np.float32))
    write_atomic(out / PIVOT, buffer.getvalue())
    from PIL import Image

    sheet = np.concatenate([photo_rgb, to_uint8(before_image), to_uint8(after_image)], 1)
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, "PNG")
    write_atomic(out / PREVIEW, buffer.getvalue())
    record = {"name": args.name, "out": str(out), "before": before, "after": after,
              "tuning_steps": step, "settings": settings}
    write_atomic(out / RECORD, json.dumps(record, indent=1).encode())
    save_generator(tuned, out / "generator.safetensors")
    (out / STATE).unlink(missing_ok=True)
    return record


def _locality(G, tuned, pivot, lpips, seed: int, step: int, values: dict) -> torch.Tensor:
    """PTI's locality regulariser at one latent moved to distance 30 from the pivot."""
    rng = torch.Generator().manual_seed(seed * 1_000_003 + step)
    z = torch.randn([1, G.z_dim], generator=rng).to(pivot.device)
    with torch.no_grad():
        w = G.mapping(z, truncation_psi=LOCALITY_PSI)
        direction = w - pivot
        w = pivot + LOCALITY_ALPHA * direction / direction.norm()
        original = G.synthesis(w, noise_mode="const", force_fp32=True)
    image = tuned.synthesis(w, noise_mode="const", force_fp32=True)
    loss = LOCALITY_WEIGHT * (image - original).square().mean()
    if lpips is not None:
        loss = loss + LOCALITY_WEIGHT * lpips(image, original).mean()
    values["locality"] = float(loss)
    return loss


def _save_state(path: Path, state: dict) -> None:
    from server.checkpoints.torch_file import write_torch_file

    write_torch_file(state, path)


def _load_state(path: Path, settings: dict, restart: bool) -> dict | None:
    if restart or not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("settings") != settings:
        raise ValueError(f"{path} was saved by a run with other settings or another photo; "
                         "pass --restart to start over")
    print(f"pti: resuming from {path} at step {state['step']}", file=sys.stderr)
    return state


if __name__ == "__main__":
    sys.exit(main())
