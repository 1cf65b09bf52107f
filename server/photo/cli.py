"""``python -m server.photo.cli PHOTO``: fit the rig to a photo from the command line.

Prints the fitted rig parameters (JSON, as the ``fit`` message's ``params``) to stdout or
``--out``; ``--aligned`` saves the FFHQ-aligned crop, ``--overlay`` the crop with the fitted
face drawn translucently over it, the detected (green) and fitted (red) landmarks and a legend.
The fitting options are shared with the commands that fit photo albums (personalisation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


OVERLAY_OPACITY = 0.5
LEGEND = (("detected landmarks", (0, 255, 0)), ("fitted landmarks", (255, 0, 0)),
          (f"fitted face, {int(OVERLAY_OPACITY * 100)}% opaque", (200, 200, 200)))


def add_fitting_options(parser: argparse.ArgumentParser) -> None:
    """The options every command that fits photos takes."""
    parser.add_argument("--face-model", default="demo",
                        help="'demo', 'flame' (the FLAME file in the model folder) or a FLAME "
                             ".pkl / FaceData .npz path (default %(default)s)")
    parser.add_argument("--deca-model", default=None,
                        help="DECA's deca_model.tar, to fit FLAME photos with its encoder "
                             "(default: $PORTRAIT_RIG_HOME/deca/deca_model.tar when present)")
    parser.add_argument("--embedding", default=None,
                        help="FLAME landmark embedding (DECA's landmark_embedding.npy or smplx's "
                             "flame_static_embedding.pkl; default: "
                             "$PORTRAIT_RIG_HOME/flame/landmark_embedding.npy when present, "
                             "else detected on a render of the face model)")
    parser.add_argument("--fit-method", default="auto", choices=("auto", "deca", "optimisation"),
                        help="'deca' needs the DECA model and FLAME; 'auto' uses it when "
                             "present (default %(default)s)")
    parser.add_argument("--fit-size", type=int, default=256,
                        help="side of the FFHQ-aligned crop photos are fitted in "
                             "(default %(default)s)")
    parser.add_argument("--detector", default="hog", choices=("hog", "cnn"),
                        help="dlib face detector (default %(default)s)")
    parser.add_argument("--texture", default="auto",
                        help="'auto', 'none' or a FLAME_texture.npz, as the diffusionrig "
                             "backend's option: the albedo space whose code photos are fitted "
                             "with and the buffers use (default %(default)s)")


def fitter_from_args(args, settings=None):
    """(FaceModel, PhotoFitter) for the options of ``add_fitting_options``; the DECA model and
    embedding default to the model folder's files when they exist."""
    from portrait_rig.face_source import load_face_data
    from server import paths
    from server.photo.fit import PhotoFitter
    from server.renderer.face_model import FaceModel

    model = FaceModel(load_face_data(paths.face_model_source(args.face_model)))
    deca = args.deca_model or (paths.deca_model() if paths.deca_model().is_file() else None)
    embedding = args.embedding or (paths.landmark_embedding()
                                   if paths.landmark_embedding().is_file() else None)
    from server.renderer.texture import choose_texture

    fitter = PhotoFitter(model, deca_model=deca, embedding=embedding, method=args.fit_method,
                         size=args.fit_size, detector=args.detector, settings=settings,
                         texture=choose_texture(args.texture, model.triangles.shape[0]))
    return model, fitter


def read_photo(path) -> bytes:
    """The bytes of an image file; ValueError naming the path when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.verify()
    except FileNotFoundError:
        raise FileNotFoundError(f"photo not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: not an image Pillow can read (PNG, JPEG ...): {exc}") \
            from None
    return path.read_bytes()


def overlay(fit, face_model) -> np.ndarray:
    """The aligned crop with the fitted face (``OVERLAY_OPACITY``), both landmark sets and a
    legend, RGB uint8."""
    import torch
    from PIL import Image, ImageDraw

    from server.renderer import BufferRenderer
    from portrait_rig.colour import linear_to_srgb

    size = fit.aligned.shape[0]
    params, result = fit.result.params, fit.result
    with torch.no_grad():
        vertices, _ = face_model.pose_params([params])
        albedo = torch.as_tensor(linear_to_srgb(result.vertex_albedo), dtype=torch.float32)
        buffers = BufferRenderer(face_model.data.triangles).render(
            vertices, albedo, torch.tensor(params.lighting.sh), [params.camera], size, size)
    mask = OVERLAY_OPACITY * buffers.mask[0].numpy()
    face = np.clip(buffers.rendered[0].numpy(), 0, 1) * 255
    image = Image.fromarray(np.round(fit.aligned * (1 - mask) + face * mask).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for points, colour in ((result.target_landmarks, (0, 255, 0)), (result.landmarks,
                                                                      (255, 0, 0))):
        for x, y in points:
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=colour)
    for row, (label, colour) in enumerate(LEGEND):
        y = 4 + 12 * row
        draw.rectangle([4, y + 2, 10, y + 8], fill=colour)
        draw.text((14, y), label, fill=(255, 255, 255))
    return np.asarray(image)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.photo.cli",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("photo", help="a portrait photo (PNG, JPEG ...)")
    add_fitting_options(parser)
    parser.add_argument("--out", help="write the parameters here instead of stdout")
    parser.add_argument("--aligned", help="save the aligned crop (PNG)")
    parser.add_argument("--overlay", help="save the crop with the fitted face over it (PNG)")
    args = parser.parse_args(argv)

    from PIL import Image

    from server.photo import NoFaceFound

    try:
        model, fitter = fitter_from_args(args)
        fit = fitter.fit(read_photo(args.photo))
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
