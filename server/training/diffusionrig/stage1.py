"""DiffusionRig stage 1: learn the generic face prior from a large set of aligned faces.

    python -m server.training.diffusionrig.stage1 prepare --photos RAW --data DATA [fitting options]
    python -m server.training.diffusionrig.stage1 train --data DATA --out RUN \\
        [--steps 50000 --batch 32 --lr 1e-4] [--checkpoint init.pt] [--device cuda]

``prepare`` fits every photo of RAW (FFHQ images or any portraits; cached, see
``server.training.diffusionrig.album``) and writes the dataset folder: the aligned crop ``<stem>.png`` and
its rig parameters ``<stem>.json`` per photo. ``train`` trains UNet and encoder together
(``server.training.diffusionrig.trainer``; buffers rendered per batch in DECA's conventions),
from the official initialisation or from ``--checkpoint``, with the same checkpoints,
resuming and logs as stage 2. The paper trained 50000 steps at batch 32 on each of 8 GPUs
(lr 1e-4): ``torchrun --nproc-per-node 8 -m server.training.diffusionrig.stage1 train --batch
256 --device cuda ...`` trains that way (``--batch`` is the global batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from server.models.diffusionrig import DiffusionRig
from server.checkpoints.diffusionrig import load_diffusionrig
from server.models.diffusionrig_unet import UNetConfig
from server.renderer.texture import choose_texture

from server.training.diffusionrig.album import FolderData, fit_photos, list_photos, write_dataset
from server.training.diffusionrig.trainer import Trainer, TrainConfig
from server import paths
from server.photo.cli import add_fitting_options, fitter_from_args
from server.training.diffusionrig.personalise import add_training_options, train_config
from server.training.runs import check_device, run_command

STAGE1_DEFAULTS = TrainConfig(steps=50000, batch_size=32, lr=1e-4, save_every=5000)


def official_initialisation(model: DiffusionRig) -> DiffusionRig:
    """Zero the layers improved-diffusion's UNet starts at zero (``zero_module``): the last
    convolution of every residual block, every attention output projection and the output
    convolution, so each block starts as the identity and the model predicts eps = 0."""
    with torch.no_grad():
        for name, module in model.denoisingUNet.named_modules():
            if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
                for tensor in module.parameters():
                    tensor.zero_()
    return model


def prepare(photos, data_dir, fitter, log=None) -> dict:
    """Fit the photos of ``photos`` (cached in ``<data_dir>/.fits``) into a dataset folder."""
    fitted, stats = fit_photos(list_photos(photos), fitter, Path(data_dir) / ".fits", log)
    write_dataset(fitted, data_dir)
    return {**stats, "photos": len(fitted)}


def train(data, out_dir, config: TrainConfig = STAGE1_DEFAULTS, checkpoint=None,
          model_config: UNetConfig = UNetConfig(), device="cpu", resume=True, log=None):
    """Train stage 1 on ``data`` (a ``TrainingData``, e.g. ``FolderData``); returns the
    trainer after the run."""
    if checkpoint:
        model = load_diffusionrig(checkpoint, None, "cpu", model_config.image_size)
    else:
        model = official_initialisation(DiffusionRig(model_config))
    config = dataclasses.replace(config, train_encoder=True)
    trainer = Trainer(model, data, out_dir, config, device, log)
    trainer.run(resume=resume)
    return trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.training.diffusionrig.stage1",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    defaults_formatter = argparse.ArgumentDefaultsHelpFormatter
    p = commands.add_parser("prepare", help="fit photos into a dataset folder",
                            formatter_class=defaults_formatter)
    p.add_argument("--photos", required=True, help="folder of face photos")
    p.add_argument("--data", required=True, help="dataset folder to write")
    add_fitting_options(p)
    t = commands.add_parser("train", help="train on a dataset folder",
                            formatter_class=defaults_formatter)
    t.add_argument("--data", required=True, help="dataset folder (from prepare)")
    t.add_argument("--out", required=True, help="run folder (an existing run resumes)")
    t.add_argument("--checkpoint", default=None, help="start from these weights")
    t.add_argument("--face-model", default="demo",
                   help="'demo', 'flame' or a FLAME .pkl, as the dataset was fitted with")
    add_training_options(t, STAGE1_DEFAULTS)
    t.add_argument("--texture", default="auto",
                   help="'auto', 'none' or a FLAME_texture.npz, as the diffusionrig backend's "
                        "option: the buffers' albedo")
    args = parser.parse_args(argv)
    def run():
        if args.command == "prepare":
            prepare(args.photos, args.data, fitter_from_args(args)[1])
            return
        check_device(args.device)
        from portrait_rig.face_source import load_face_data
        from server.renderer.face_model import FaceModel
        face_model = FaceModel(load_face_data(paths.face_model_source(args.face_model)))
        data = FolderData(args.data, face_model, args.image_size,
                          choose_texture(args.texture, face_model.triangles.shape[0]))
        train(data, args.out, train_config(args, train_encoder=True), args.checkpoint,
              UNetConfig(image_size=args.image_size), args.device, resume=not args.restart)
    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
