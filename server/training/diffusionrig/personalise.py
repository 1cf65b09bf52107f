"""DiffusionRig stage 2: personalise the stage-1 model on a small album of one person.

    python -m server.training.diffusionrig.personalise --photos DIR --name alice \\
        [--checkpoint model.pt] [--steps 5000 --batch 4 --lr 1e-5] [--device cuda]

1. Every photo is fitted once (``server.training.diffusionrig.album.fit_photos``; cached in
   ``<out>/album/``): DECA's encoder with ``--deca-model`` on a FLAME face model, otherwise
   optimisation against landmarks and the photo.
2. Each photo's identity is replaced by the album's mean shape and its buffers are rendered
   as the ``diffusionrig`` backend renders them (``server.renderer.deca``).
3. The UNet is fine-tuned with the encoder frozen (``server.training.diffusionrig.trainer``:
   P2-weighted eps loss, Adam, checkpoints every ``--save-every`` steps; a killed run resumes
   where it stopped when started again with the same arguments; ``--restart`` starts over).

Output, by default in the personal models folder ``server.paths.personal_dir()/<name>/``
(where the backend's ``appearance.personal_model = <name>`` looks): ``model.pt``,
``state.pt``, ``log.jsonl`` (every step's loss), ``album.json`` (every photo's fit) and the
fitting cache ``album/``. About 20 photos, 5000 steps at batch 4 is the paper's recipe
(~30 min on a V100).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from server import paths
from server.checkpoints.diffusionrig import load_diffusionrig
from server.renderer.texture import choose_texture

from server.training.diffusionrig.album import PHOTO_SUFFIXES, album_data, fit_photos, list_photos, mean_shape
from server.training import distributed
from server.training.diffusionrig.trainer import Trainer, TrainConfig
from server.training.runs import check_device, run_command
from server.photo.cli import add_fitting_options, fitter_from_args

ALBUM_DIR, ALBUM_FILE = "album", "album.json"


def make_fitter(face_model, deca_model=None, embedding=None, method="auto", fit_size=256,
                detector="hog", fit_settings=None, texture=None):
    from server.photo import PhotoFitter
    return PhotoFitter(face_model, deca_model=deca_model, embedding=embedding, method=method,
                       size=fit_size, detector=detector, settings=fit_settings, texture=texture)


def personalise(photos, checkpoint, out_dir, config: TrainConfig = TrainConfig(),
                face_model=None, fitter=None, texture: str = "auto", image_size: int = 256,
                device="cpu", resume: bool = True, log=None) -> dict:
    """Run stage 2 (module notes) into ``out_dir``; returns a summary: the photos fitted,
    read from the cache and skipped, the mean shape, the evaluation loss before and after
    (fixed examples, timesteps and noise) and the model path.

    ``face_model``: a ``FaceModel`` (default: the demo head); ``fitter``: a
    ``server.photo.PhotoFitter`` for it (default: ``make_fitter(face_model)``)."""
    from portrait_rig.face_source import load_face_data
    from server.renderer.face_model import FaceModel

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    face_model = face_model or FaceModel(load_face_data("demo"))
    texture = choose_texture(texture, face_model.triangles.shape[0])
    fitter = fitter or make_fitter(face_model, texture=texture)
    photo_paths = list_photos(photos)
    if not photo_paths:
        raise ValueError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) in {photos}")
    # Under torchrun rank 0 fits the album (and fills the cache); the others read the cache.
    ctx = distributed.setup(device)
    if not ctx.is_main:
        ctx.barrier()
    fitted, stats = fit_photos(photo_paths, fitter, out_dir / ALBUM_DIR, log)
    if ctx.is_main:
        ctx.barrier()
    if not fitted:
        raise ValueError(f"no face found in any of the {len(photo_paths)} photos of {photos}")
    log(f"album: {len(fitted)} photos ({stats['fitted']} fitted, {stats['cached']} from the "
        f"cache, {len(stats['skipped'])} skipped)")
    shape = mean_shape(fitted)
    data = album_data(fitted, face_model, image_size, texture)
    if ctx.is_main:
        (out_dir / ALBUM_FILE).write_text(json.dumps({
            "mean_shape": shape, "skipped": stats["skipped"],
            "photos": [{"source": p.source, "method": p.method,
                        "landmark_error": p.landmark_error, "params": p.params.to_dict()}
                       for p in fitted]}, indent=1))

    model = load_diffusionrig(checkpoint, None, "cpu", image_size)
    trainer = Trainer(model, data, out_dir, config, device, log)
    before = trainer.evaluate()
    model_path = trainer.run(resume=resume)
    after = trainer.evaluate()
    log(f"personal model: {model_path} (evaluation loss {before:.4g} -> {after:.4g})")
    return {"fitted": stats["fitted"], "cached": stats["cached"], "skipped": stats["skipped"],
            "photos": len(fitted), "mean_shape": shape, "loss_before": before,
            "loss_after": after, "model": model_path, "step": trainer.step}


def add_training_options(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The options of both DiffusionRig training commands (their parsers show defaults)."""
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps")
    parser.add_argument("--batch", type=int, default=defaults.batch_size, help="batch size")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="learning rate")
    parser.add_argument("--save-every", type=int, default=defaults.save_every,
                        help="steps between saved states (a kill loses at most these)")
    parser.add_argument("--log-every", type=int, default=defaults.log_every,
                        help="steps between flushes of log.jsonl")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the data order, noise and dropout")
    parser.add_argument("--precision", default=defaults.precision,
                        choices=("auto", "fp32", "fp16"),
                        help="'auto': fp16 autocast on CUDA, fp32 on the CPU")
    parser.add_argument("--image-size", type=int, default=256,
                        help="the model's image size (256 for the official model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N]")
    parser.add_argument("--restart", action="store_true",
                        help="ignore a saved state in the output folder and start over")

def train_config(args, train_encoder: bool) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr,
                       save_every=args.save_every, log_every=args.log_every, seed=args.seed,
                       precision=args.precision, train_encoder=train_encoder)


def main(argv=None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m server.training.diffusionrig.personalise",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--photos", required=True, help="folder of photos of one person")
    parser.add_argument("--name", help="personal model name (a plain folder name)")
    parser.add_argument("--out", help="output folder (default: the personal models folder "
                                      "/<name>)")
    parser.add_argument("--checkpoint", default=None,
                        help="stage-1 model (default: the server's DiffusionRig checkpoint)")
    add_fitting_options(parser)
    add_training_options(parser, defaults)
    args = parser.parse_args(argv)
    if not args.name and not args.out:
        parser.error("give --name (saved in the personal models folder) or --out")
    try:
        out = Path(args.out) if args.out else paths.personal_checkpoint(args.name).parent
    except ValueError as exc:
        parser.error(str(exc))
    checkpoint = Path(args.checkpoint) if args.checkpoint else paths.diffusionrig_checkpoint()
    if not checkpoint.is_file():
        parser.error(f"stage-1 checkpoint not found: {checkpoint}")

    def run():
        check_device(args.device)               # before fitting the album, not after
        face_model, fitter = fitter_from_args(args)
        personalise(args.photos, checkpoint, out, train_config(args, train_encoder=False),
                    face_model, fitter, args.texture, args.image_size, args.device,
                    resume=not args.restart)
    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
