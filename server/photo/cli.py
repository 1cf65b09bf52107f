"""``python -m server.photo.cli PHOTO``: fit the rig to a photo from the command line.

Prints the fitted rig parameters (JSON, as the ``fit`` message's ``params``) to stdout or
``--out``; ``--aligned`` saves the FFHQ-aligned crop, ``--overlay`` the crop with the fitted
face drawn over it and the detected (green) and fitted (red) landmarks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def overlay(fit, face_model) -> np.ndarray:
    """The aligned crop with the fitted face (70% opaque) and both landmark sets, RGB uint8."""
    import torch
    from PIL import Image, ImageDraw

    from server.renderer import BufferRenderer
    from portrait_rig.colour import linear_to_srgb

    size = fit.aligned.shape[0]
    params, result = fit.result.params, fit.result
    with torch.no_grad():
        vertices, _ = face_model.pose_params([params])
        albedo = torch.as_tensor(linear_to_srgb(result.vertex_albedo), dtype=torch.float32)
        buffers = BufferRenderer(face_model.data.faces).render(
            vertices, albedo, torch.tensor(params.lighting.sh), [params.camera], size, size)
    mask = 0.7 * buffers.mask[0].numpy()
    face = np.clip(buffers.rendered[0].numpy(), 0, 1) * 255
    image = Image.fromarray(np.round(fit.aligned * (1 - mask) + face * mask).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for points, colour in ((result.target_landmarks, (0, 255, 0)), (result.landmarks,
                                                                      (255, 0, 0))):
        for x, y in points:
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=colour)
    return np.asarray(image)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.photo.cli",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("photo", help="a portrait photo (PNG, JPEG ...)")
    parser.add_argument("--face-model", default="demo",
                        help="'demo' or a FLAME .pkl / FaceData .npz (default %(default)s)")
    parser.add_argument("--deca-model", help="DECA's deca_model.tar (FLAME face models)")
    parser.add_argument("--embedding", help="FLAME landmark embedding file")
    parser.add_argument("--method", default="auto", choices=("auto", "deca", "optimisation"))
    parser.add_argument("--size", type=int, default=256, help="aligned crop side")
    parser.add_argument("--detector", default="hog", choices=("hog", "cnn"))
    parser.add_argument("--out", help="write the parameters here instead of stdout")
    parser.add_argument("--aligned", help="save the aligned crop (PNG)")
    parser.add_argument("--overlay", help="save the crop with the fitted face over it (PNG)")
    args = parser.parse_args(argv)

    from PIL import Image

    from portrait_rig.face_source import load_face_data
    from server.renderer.face_model import FaceModel
    from server.photo import NoFaceFound

    from server.photo.fit import PhotoFitter

    try:
        model = FaceModel(load_face_data(args.face_model))
        fitter = PhotoFitter(model, deca_model=args.deca_model, embedding=args.embedding,
                             method=args.method, size=args.size, detector=args.detector)
        fit = fitter.fit(Path(args.photo).read_bytes())
    except (OSError, ValueError, NoFaceFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(fit.result.params.to_dict(), indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    if args.aligned:
        Image.fromarray(fit.aligned).save(args.aligned)
    if args.overlay:
        Image.fromarray(overlay(fit, model)).save(args.overlay)
    print(f"{fit.result.method}: landmark error {fit.result.landmark_error:.2f} px",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
