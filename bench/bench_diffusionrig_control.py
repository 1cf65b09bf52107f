"""Does a DiffusionRig stage 1 trained with our pipeline follow the rig, and does its global
latent keep the appearance? Measured in a world whose truth is known.

    python bench/bench_diffusionrig_control.py [--out DIR] [--size 32] [--count 2000]
        [--steps 1800 --batch 8 --lr 5e-4] [--held-out 6]

1. World: ``tests/support/face_world.py`` writes a stage-1 dataset folder (``<stem>.png`` +
   ``<stem>.json``, as ``stage1 prepare`` writes it): the demo head under random identity,
   expression, pose, jaw and SH light, with a skin tone, hair colour and background the
   buffers do not carry.
2. Training: the shipped CLI, ``python -m server.training.diffusionrig.stage1 train``, single
   threaded, from ``--checkpoint`` holding a small UNet in the official initialisation (the
   CLI reads the architecture from the file).
3. Control, on held-out world samples A: the image of A gives the global latent z_A; the model
   generates (DDIM, one fixed noise per A) with A's rig (reconstruction) and with edited rigs:
   yaw +-20 degrees, a new expression with the jaw opened or closed, the key light swung 60
   degrees in azimuth. The photo fitting pipeline (``server.photo``: dlib detection, FFHQ
   alignment, optimisation; the generated image upsampled to 256 px) fits every generated
   image, and, as the fitter's own ceiling, the world's true render of the same rig and look.
   Achieved change = fit(edited generation) - fit(reconstruction), against the requested
   change; the no-edit baseline is the error of a model that ignores the edit (|requested|).
4. Appearance: mean colour of the background, the hair and the skin of each generation
   against the world's true render of the same rig with A's look, next to the spread between
   two looks (the same rig with another held-out sample's look).

Everything is cached under ``--out`` (default ``bench/results/diffusionrig_control``): a rerun
continues (the world, the training run and the fits resume); a rerun with more ``--steps``
trains the same run further and measures it anew. Prints a table, writes
``results.json`` and ``contact_sheet.png`` (rows: held-out samples; columns: the input A, the
reconstruction, then generated / true for each edit).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from server.checkpoints.torch_file import write_torch_file  # noqa: E402

from tests.support.face_world import (FaceWorld, Look, euler_matrix, light_direction,  # noqa: E402
                                yaw_pitch_roll)

CONDITIONS = ("reconstruction", "yaw +20", "yaw -20", "expression", "light")
YAW_EDIT_DEG, LIGHT_EDIT_DEG, JAW_EDIT = 20.0, 60.0, 0.25


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ model

def tiny_config(size: int):
    from server.models.diffusionrig_unet import UNetConfig
    return UNetConfig(image_size=size, model_channels=32, channel_mult=(1, 2, 2),
                      num_res_blocks=1, attention_ds=(), num_heads=1, latent_dim=64)


def write_initial_model(path: Path, size: int) -> None:
    """A small DiffusionRig in the official initialisation, saved as the CLI's --checkpoint."""
    from server.models.diffusionrig import DiffusionRig
    from server.training.diffusionrig.stage1 import official_initialisation

    if path.is_file():
        return
    torch.manual_seed(0)
    model = official_initialisation(DiffusionRig(tiny_config(size)))
    write_torch_file(model.state_dict(), path)


def train(args, data: Path, run: Path, init: Path) -> dict:
    """The shipped CLI, single threaded; an existing run folder resumes."""
    command = [sys.executable, "-m", "server.training.diffusionrig.stage1", "train",
               "--data", str(data), "--out", str(run), "--checkpoint", str(init),
               "--face-model", "demo", "--texture", "none", "--image-size", str(args.size),
               "--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr),
               "--save-every", "25", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log("train: " + " ".join(command[1:]))
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
               if line.strip()]
    losses = [r["loss"] for r in records]
    return {"steps": len(records), "seconds": round(sum(r["seconds"] for r in records), 1),
            "seconds_per_step": round(float(np.median([r["seconds"] for r in records])), 3),
            "loss_first_50": float(np.mean(losses[:50])),
            "loss_last_50": float(np.mean(losses[-50:]))}


# ------------------------------------------------------------------------------ edits

def edited(params, condition: str, other):
    """A copy of ``params`` with ``condition``'s edit; ``other``: another held-out sample's
    parameters (the new expression)."""
    from portrait_rig.rotations import axis_angle_to_matrix, matrix_to_axis_angle

    p = params.copy()
    if condition.startswith("yaw"):
        sign = 1.0 if "+" in condition else -1.0
        turn = euler_matrix(math.radians(sign * YAW_EDIT_DEG), 0.0, 0.0)
        rotation = turn @ axis_angle_to_matrix(np.asarray(p.pose.global_))
        p.pose.global_ = [float(v) for v in matrix_to_axis_angle(rotation)]
    elif condition == "expression":
        jaw = p.pose.jaw[0]
        p.pose.jaw = [jaw + JAW_EDIT if jaw < 0.15 else jaw - JAW_EDIT, 0.0, 0.0]
        p.expression = list(other.expression)
    elif condition == "light":
        sh = np.asarray(p.lighting.sh, dtype=np.float64)
        d = light_direction(sh)
        sign = -1.0 if math.atan2(d[0], d[2]) > 0 else 1.0
        sh[1:4] = euler_matrix(math.radians(sign * LIGHT_EDIT_DEG), 0.0, 0.0) @ sh[1:4]
        p.lighting.sh = sh.tolist()
    return p


def azimuth(sh) -> float:
    d = light_direction(sh)
    return math.degrees(math.atan2(d[0], d[2]))


# ------------------------------------------------------------------------------ generation

@torch.no_grad()
def generate(model, renderer, params: list, images: np.ndarray, seeds: list[int], size: int,
             steps: int) -> np.ndarray:
    """DDIM samples [N, S, S, 3] uint8: the rig ``params``, the latent of ``images``, the
    initial noise of ``seeds``."""
    from server.diffusion import NoiseSchedule
    from server.diffusion.samplers import ddim_sample, initial_noise
    from server.training.diffusionrig.album import image_tensor, render_buffers

    schedule = NoiseSchedule.linear()
    condition = render_buffers(renderer, params, size)
    z = model.encode(torch.stack([image_tensor(im, size) for im in images]))
    noise = torch.cat([initial_noise(s, (1, 3, size, size)) for s in seeds])
    x0 = ddim_sample(lambda x, t: model(x, t, condition, z), noise, schedule,
                     schedule.respaced(steps))
    return np.round(((x0 + 1) * 127.5).clamp(0, 255).permute(0, 2, 3, 1).numpy()).astype(np.uint8)


@torch.no_grad()
def denoising_errors(model, renderer, params: list, images: np.ndarray, size: int,
                     timesteps=(200, 500, 800, 950)) -> dict:
    """Mean |x0 prediction - image| (8-bit) of one model call on the noised held-out image at
    each timestep, with its own buffers and latent: how far training has got at each noise
    level (sampling starts at t = 950, where an eps error is amplified by 1 / sqrt(abar))."""
    from server.diffusion import NoiseSchedule
    from server.diffusion.samplers import initial_noise
    from server.training.diffusionrig.album import image_tensor, render_buffers

    schedule = NoiseSchedule.linear()
    condition = render_buffers(renderer, params, size)
    x0 = torch.stack([image_tensor(im, size) for im in images])
    z = model.encode(x0)
    errors = {}
    for t in timesteps:
        abar = schedule.alpha_bar(t)
        noise = initial_noise(2000 + t, tuple(x0.shape))
        x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise
        eps = model(x_t, torch.full((len(x0),), t), condition, z)
        pred = ((x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
        errors[str(t)] = float((pred - x0).abs().mean() * 127.5)
    return errors


# ------------------------------------------------------------------------------ fitting

def make_fitter(fit_size: int):
    """The photo fitting pipeline as ``python -m server.photo.cli`` builds it, with fewer
    optimisation steps (the crops are small)."""
    from server.photo import FitSettings
    from server.photo.cli import add_fitting_options, fitter_from_args

    parser = argparse.ArgumentParser()
    add_fitting_options(parser)
    options = parser.parse_args(["--face-model", "demo", "--fit-method", "optimisation",
                                 "--fit-size", str(fit_size), "--texture", "none"])
    settings = FitSettings(rigid_steps=40, shape_steps=60, light_steps=40, refine_steps=30,
                           render_size=64)
    return fitter_from_args(options, settings)[1]


def fit_summary(fitter, image: np.ndarray) -> dict | None:
    """Yaw, pitch (degrees), jaw (radians), expression, light azimuth (degrees) of the fit of
    ``image`` (upsampled to 256 px for the detector), or None when no face is found."""
    from server.photo import NoFaceFound

    big = np.asarray(Image.fromarray(image).resize((256, 256), Image.BICUBIC))
    try:
        p = fitter.fit(big).result.params
    except NoFaceFound:
        return None
    yaw, pitch, _ = yaw_pitch_roll(p.pose.global_)
    return {"yaw": math.degrees(yaw), "pitch": math.degrees(pitch), "jaw": p.pose.jaw[0],
            "expression": list(p.expression), "azimuth": azimuth(p.lighting.sh)}


# ------------------------------------------------------------------------------ measures

def region_means(image: np.ndarray, masks: dict) -> dict:
    return {name: (image[mask].mean(axis=0) if mask.any() else None)
            for name, mask in masks.items()}


def colour_error(a: dict, b: dict) -> dict:
    """Mean |difference| of two images' region colours (8-bit units, over RGB)."""
    return {name: (float(np.abs(a[name] - b[name]).mean())
                   if a[name] is not None and b[name] is not None else None) for name in a}


def mean(values) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def control_rows(fits: dict, truth: dict, requests: dict) -> list[dict]:
    """Per edit: requested change, achieved change of the generations, the fitter's change on
    the true renders, mean |achieved - requested| against the no-edit baseline."""
    rows = []
    specs = [("yaw +20", "yaw", "deg"), ("yaw -20", "yaw", "deg"),
             ("expression", "jaw", "rad"), ("light", "azimuth", "deg")]
    for condition, key, unit in specs:
        req, got, ceiling = [], [], []
        for i in requests:
            rec, edit = fits[i].get("reconstruction"), fits[i].get(condition)
            t_rec, t_edit = truth[i].get("reconstruction"), truth[i].get(condition)
            r = requests[i][condition][key]
            req.append(r)
            got.append(_change(key, rec, edit))
            ceiling.append(_change(key, t_rec, t_edit))
        signs = np.sign(req)
        ok = [k for k, g in enumerate(got) if g is not None]
        row = {"condition": condition, "quantity": key, "unit": unit,
               "requested": mean([abs(r) for r in req]),
               "achieved": mean([got[k] * signs[k] for k in ok]),
               "truth_fit": mean([c * s for c, s in zip(ceiling, signs) if c is not None]),
               "error": mean([abs(got[k] - req[k]) for k in ok]),
               "truth_error": mean([abs(c - r) for c, r in zip(ceiling, req) if c is not None]),
               "baseline": mean([abs(req[k]) for k in ok]), "fitted": len(ok),
               "samples": len(req)}
        if condition == "expression":
            row["expression_correlation"] = mean([
                _corr(np.subtract(fits[i]["expression"]["expression"],
                                  fits[i]["reconstruction"]["expression"]),
                      requests[i]["expression"]["delta_expression"])
                for i in requests if fits[i].get("expression") and fits[i].get("reconstruction")])
            row["truth_expression_correlation"] = mean([
                _corr(np.subtract(truth[i]["expression"]["expression"],
                                  truth[i]["reconstruction"]["expression"]),
                      requests[i]["expression"]["delta_expression"])
                for i in requests if truth[i].get("expression") and truth[i].get("reconstruction")])
        rows.append(row)
    return rows


def _change(key: str, before: dict | None, after: dict | None) -> float | None:
    """after - before of a fitted quantity (angles wrapped to [-180, 180) degrees)."""
    if not before or not after:
        return None
    change = after[key] - before[key]
    return (change + 180.0) % 360.0 - 180.0 if key == "azimuth" else change


def _corr(a, b) -> float | None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    if a.std() < 1e-9 or b.std() < 1e-9:
        return None
    return float(np.corrcoef(a, b)[0, 1])


# ------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "diffusionrig_control"))
    parser.add_argument("--size", type=int, default=32, help="image size of the model")
    parser.add_argument("--count", type=int, default=2000, help="world images to train on")
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--held-out", type=int, default=6)
    parser.add_argument("--sampler-steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--fit-size", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, run, init = out / "data", out / "run", out / "init.pt"

    world = FaceWorld(size=args.size, supersample=4)
    t0 = time.monotonic()
    world.write_dataset(data, args.count, seed=0, log=log)
    log(f"world: {args.count} samples in {data} ({time.monotonic() - t0:.0f} s this run)")
    write_initial_model(init, args.size)
    training = train(args, data, run, init)
    log(f"training: {training}")

    from server.checkpoints.diffusionrig import load_diffusionrig
    from server.renderer.deca import DecaBufferRenderer

    model = load_diffusionrig(run / "model.pt", None, "cpu", args.size)
    renderer = DecaBufferRenderer(world.model, None)

    # Held-out samples: another seed of the world than the training set's.
    n = args.held_out
    held = [world.sample(i, seed=1) for i in range(n + 1)]
    params = [p for p, _ in held[:n]]
    looks = [lk for _, lk in held[:n]]
    inputs, _ = world.render(params, looks)
    requests, rigs = {}, {}
    for i in range(n):
        other = held[(i + 1) % (n + 1)][0]
        rigs[i] = {c: (params[i] if c == "reconstruction" else edited(params[i], c, other))
                   for c in CONDITIONS}
        requests[i] = {}
        for c in CONDITIONS:
            p0, p1 = params[i], rigs[i][c]
            requests[i][c] = {
                "yaw": math.degrees(yaw_pitch_roll(p1.pose.global_)[0]
                                    - yaw_pitch_roll(p0.pose.global_)[0]),
                "jaw": p1.pose.jaw[0] - p0.pose.jaw[0],
                "azimuth": azimuth(p1.lighting.sh) - azimuth(p0.lighting.sh),
                "delta_expression": list(np.subtract(p1.expression, p0.expression))}

    eval_dir = out / f"eval_{training['steps']}_steps_ddim{args.sampler_steps}"   # measured anew
    eval_dir.mkdir(exist_ok=True)
    generated, truth_images, swapped = {}, {}, {}
    t0 = time.monotonic()
    for c in CONDITIONS:
        path = eval_dir / f"generated_{c.replace(' ', '_')}.npy"
        if path.is_file():
            generated[c] = np.load(path)
        else:
            generated[c] = generate(model, renderer, [rigs[i][c] for i in range(n)], inputs,
                                    [1000 + i for i in range(n)], args.size,
                                    args.sampler_steps)
            np.save(path, generated[c])
        truth_images[c], _ = world.render([rigs[i][c] for i in range(n)], looks)
        # The same rig with the next sample's look: the spread between two looks.
        swapped[c], _ = world.render([rigs[i][c] for i in range(n)],
                                     [looks[(i + 1) % n] for i in range(n)])
    log(f"generation: {time.monotonic() - t0:.0f} s")

    fits_path = eval_dir / "fits.json"
    cache = json.loads(fits_path.read_text()) if fits_path.is_file() else {}
    fitter = make_fitter(args.fit_size)
    fits = {i: {} for i in range(n)}
    truth = {i: {} for i in range(n)}
    t0 = time.monotonic()
    for i in range(n):
        for c in CONDITIONS:
            for kind, images, table in (("generated", generated, fits),
                                        ("truth", truth_images, truth)):
                key = f"{kind}/{i}/{c}"
                if key not in cache:
                    cache[key] = fit_summary(fitter, images[c][i])
                    fits_path.write_text(json.dumps(cache))
                table[i][c] = cache[key]
        log(f"fits: sample {i + 1}/{n} ({time.monotonic() - t0:.0f} s)")

    rows = control_rows(fits, truth, requests)

    appearance = []
    for c in CONDITIONS:
        masks = world.regions([rigs[i][c] for i in range(n)])
        errors, spreads = [], []
        for i in range(n):
            m = {k: v[i] for k, v in masks.items()}
            true_means = region_means(truth_images[c][i].astype(np.float64), m)
            errors.append(colour_error(region_means(generated[c][i].astype(np.float64), m),
                                       true_means))
            spreads.append(colour_error(region_means(swapped[c][i].astype(np.float64), m),
                                        true_means))
        appearance.append({"condition": c, **{
            f"{region}_{what}": mean([e[region] for e in table])
            for region in ("background", "hair", "face")
            for what, table in (("error", errors), ("spread", spreads))}})

    denoising = denoising_errors(model, renderer, params, inputs, args.size)
    results = {"settings": vars(args), "training": training, "control": rows,
               "appearance": appearance, "denoising": denoising,
               "detected": {c: sum(fits[i][c] is not None for i in range(n)) for c in CONDITIONS},
               "per_sample": {"requests": requests, "generated_fits": fits,
                              "truth_fits": truth,
                              "looks": [Look.to_dict(lk) for lk in looks]}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_contact_sheet(out / "contact_sheet.png", inputs, generated, truth_images)
    print_table(results)
    log(f"results: {out / 'results.json'}, contact sheet: {out / 'contact_sheet.png'}")
    return 0


def write_contact_sheet(path: Path, inputs, generated, truth_images, zoom: int = 3) -> None:
    """Rows: held-out samples. Columns: input A, reconstruction, then generated / true render
    for each edit."""
    rows = []
    for i in range(len(inputs)):
        tiles = [inputs[i], generated["reconstruction"][i]]
        for c in CONDITIONS[1:]:
            tiles += [generated[c][i], truth_images[c][i]]
        rows.append(np.concatenate(tiles, axis=1))
    sheet = np.concatenate(rows, axis=0)
    Image.fromarray(sheet).resize((sheet.shape[1] * zoom, sheet.shape[0] * zoom),
                                  Image.NEAREST).save(path)


def print_table(results: dict) -> None:
    def f(v, digits=1):
        return "-" if v is None else f"{v:.{digits}f}"

    t = results["training"]
    s = results["settings"]
    print(f"\nDiffusionRig stage 1 in the face world: {s['count']} images at {s['size']} px, "
          f"{t['steps']} steps at batch {s['batch']}, lr {s['lr']} "
          f"({t['seconds'] / 60:.1f} min, {t['seconds_per_step']} s/step), loss "
          f"{t['loss_first_50']:.3f} -> {t['loss_last_50']:.3f}")
    print("\nControl (achieved change of the fitted generations, signed along the request; "
          "error = mean |achieved - requested|; baseline = a model ignoring the edit):")
    print(f"{'edit':<12} {'quantity':<9} {'requested':>9} {'achieved':>9} {'fit of truth':>12} "
          f"{'error':>7} {'truth err':>9} {'baseline':>8} {'fitted':>7}")
    for r in results["control"]:
        d = 3 if r["unit"] == "rad" else 1
        print(f"{r['condition']:<12} {r['quantity'] + ' ' + r['unit']:<9} "
              f"{f(r['requested'], d):>9} {f(r['achieved'], d):>9} {f(r['truth_fit'], d):>12} "
              f"{f(r['error'], d):>7} {f(r['truth_error'], d):>9} {f(r['baseline'], d):>8} "
              f"{r['fitted']:>4}/{r['samples']}")
        if "expression_correlation" in r:
            print(f"{'':<12} expression change correlation: generated "
                  f"{f(r['expression_correlation'], 2)}, truth "
                  f"{f(r['truth_expression_correlation'], 2)}")
    print("\nAppearance (mean |region colour - true render's|, 8-bit; spread = the same rig "
          "with another look):")
    print(f"{'condition':<15} {'background':>10} {'spread':>7} {'hair':>6} {'spread':>7} "
          f"{'skin':>6} {'spread':>7}")
    for a in results["appearance"]:
        print(f"{a['condition']:<15} {f(a['background_error']):>10} "
              f"{f(a['background_spread']):>7} {f(a['hair_error']):>6} "
              f"{f(a['hair_spread']):>7} {f(a['face_error']):>6} {f(a['face_spread']):>7}")
    print("faces detected in the generations: " + ", ".join(
        f"{c} {k}" for c, k in results["detected"].items()))
    print("one-call x0 error on the noised held-out images (8-bit MAE) at t = " + ", ".join(
        f"{t}: {e:.1f}" for t, e in results["denoising"].items()))


if __name__ == "__main__":
    sys.exit(main())
