"""``python -m server.photo.latent PHOTO --out z.npy``: a DiffusionRig appearance latent.

DiffusionRig takes a person's appearance (skin, hair, background, lighting style) from its
global latent z [64], which its encoder computes from an FFHQ-aligned photo. The backend does
this for ``appearance.reference_photo``; this command writes z to a file that
``appearance.latent_file`` takes, so a shot can keep one appearance without the photo (or mix
and edit latents). A personal model takes z from the same encoder: pass its checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    from server import paths

    parser = argparse.ArgumentParser(prog="python -m server.photo.latent",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("photo", help="a portrait photo; aligned the FFHQ way unless it is "
                                      "already a RESOLUTION-square aligned crop")
    parser.add_argument("--out", required=True, help="the latent file to write (.npy)")
    parser.add_argument("--checkpoint", default=None,
                        help="DiffusionRig stage-1 or personal model.pt (default: "
                             "$PORTRAIT_RIG_HOME/diffusionrig/model.pt)")
    parser.add_argument("--resolution", type=int, default=256,
                        help="the model's image size (default %(default)s)")
    args = parser.parse_args(argv)

    from server.checkpoints.diffusionrig import load_diffusionrig
    from server.photo.align import encoder_input

    checkpoint = Path(args.checkpoint) if args.checkpoint else paths.diffusionrig_checkpoint()
    try:
        model = load_diffusionrig(checkpoint, None, "cpu", args.resolution)
        with torch.no_grad():
            z = model.encode(encoder_input(args.photo, args.resolution))[0]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    np.save(args.out, z.numpy().astype(np.float32))
    print(f"wrote {args.out}: DiffusionRig latent [{z.numel()}] of {args.photo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
