"""``python -m server.training.stylerig <stage> ...``: the StyleRig training pipeline.

Stages run in order (each resumes where a killed run stopped; run it again with the same
arguments): corpus -> landmarks -> dfr -> rignet -> evaluate. See docs/stylerig_training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import signal
import sys

from server.models.rignet import MODES
from server.training.runs import RunFolderBusy, check_device

from server.training.stylerig.corpus import CorpusSettings
from server.training import distributed


def _fields(cls, args, exclude=()) -> dict:
    """The dataclass fields of ``cls`` that ``args`` set (argparse dests equal field names)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in exclude and getattr(args, f.name, None) is not None}


def _add_training_options(p, defaults) -> None:
    p.add_argument("--corpus", required=True, help="corpus folder (the corpus stage's --out)")
    # --run-dir: torchrun's own parser refuses "--run" (a prefix of its --run-path).
    p.add_argument("--run-dir", "--run", dest="run", required=True,
                   help="run folder: checkpoints, logs, previews; an existing run resumes")
    p.add_argument("--face-model", dest="face_model", default=defaults.face_model,
                   help="'demo' or a FLAME .pkl / FaceData .npz file")
    p.add_argument("--embedding", default=None, help="landmark embedding file (DECA's "
                   "landmark_embedding.npy or smplx's flame_static_embedding.pkl); default: "
                   "detected on a render of the face model")
    p.add_argument("--steps", type=int, default=defaults.steps,
                   help="total optimiser steps (raise it to continue a finished run)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=defaults.batch_size,
                   help="images (dfr) or pairs (rignet) per step")
    p.add_argument("--lr", type=float, default=defaults.lr, help="learning rate")
    p.add_argument("--lr-decay", dest="lr_decay", type=float, default=defaults.lr_decay,
                   help="fraction of the run over which the learning rate falls to zero "
                   "(cosine; 0: constant)")
    p.add_argument("--render-size", dest="render_size", type=int, default=defaults.render_size,
                   help="render and compare at this size (default: the corpus image size)")
    p.add_argument("--supersample", type=int, default=defaults.supersample,
                   help="render at this many times the size and average each block, as a "
                   "camera's pixel integrates its area (1: sample pixel centres)")
    p.add_argument("--w-landmarks", dest="w_landmarks", type=float,
                   default=defaults.w_landmarks, help="lambda_land of L_render")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="network initialisation and batch order")
    p.add_argument("--log-every", dest="log_every", type=int, default=defaults.log_every,
                   help="steps between log records")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   default=defaults.checkpoint_every,
                   help="steps between checkpoints (0: only at the end)")
    p.add_argument("--preview-every", dest="preview_every", type=int,
                   default=defaults.preview_every,
                   help="steps between preview grids (0: only at the end)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")


def build_parser() -> argparse.ArgumentParser:
    from server.training.stylerig.evaluate import ESTIMATORS
    from server.training.stylerig.train_dfr import DFRSettings
    from server.training.stylerig.train_rignet import RigNetSettings

    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m server.training.stylerig", formatter_class=formatter,
        description="StyleRig training: corpus -> landmarks -> dfr -> rignet -> evaluate. "
                    "Each stage resumes when run again with the same arguments; see "
                    "docs/stylerig_training.md.")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    stages = parser.add_subparsers(dest="stage", required=True)
    stages.add_parser = functools.partial(stages.add_parser, formatter_class=formatter)

    p = stages.add_parser("corpus", help="sample (w, image) pairs from a StyleGAN generator")
    p.add_argument("--generator", required=True, help="StyleGAN2/3 file: NVIDIA .pkl, "
                   "rosinality .pt or our .safetensors")
    p.add_argument("--out", required=True, help="corpus folder")
    p.add_argument("--count", type=int, required=True, help="number of samples (paper: 200000)")
    defaults = CorpusSettings(generator="", count=1)
    p.add_argument("--shard-size", dest="shard_size", type=int, default=defaults.shard_size,
                   help="samples per shard (the unit of resumption)")
    p.add_argument("--truncation", type=float, default=defaults.truncation,
                   help="truncation psi")
    p.add_argument("--truncation-cutoff", dest="truncation_cutoff", type=int, default=None,
                   help="truncate only the first N layers (default: all)")
    p.add_argument("--image-size", dest="image_size", type=int, default=defaults.image_size,
                   help="stored image size (box-filtered from the generator's)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="latent seed")
    p.add_argument("--style-mixing", dest="style_mixing", type=float,
                   default=defaults.style_mixing, help="probability that a sample's later "
                   "layers come from a second latent (StyleGAN's mixing): teaches F which "
                   "layers carry what")
    p.add_argument("--noise-mode", dest="noise_mode", default=defaults.noise_mode,
                   choices=("const", "random", "none"), help="the generator's noise inputs")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16,
                   help="generator batch")
    p.add_argument("--rignet", default=None, help="an edit corpus: store this RigNet's edits "
                   "of the samples (with --dfr, the F it was trained with); for refining F "
                   "with dfr --also")
    p.add_argument("--dfr", default=None, help="F of the edit requests (with --rignet)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")

    p = stages.add_parser("landmarks", help="68 landmarks per corpus image (faceless images "
                          "are flagged and skipped later)")
    p.add_argument("--corpus", required=True, help="corpus folder (the corpus stage's --out)")
    p.add_argument("--landmarks", dest="source", default="dlib", choices=("dlib", "synthetic"),
                   help="'dlib' (real detections) or 'synthetic' (TESTS ONLY: projected "
                   "landmarks of randomly posed face models, not of the images)")
    p.add_argument("--detector", default="hog", choices=("hog", "cnn"),
                   help="dlib face detector")
    p.add_argument("--upsample", type=int, default=0, help="image doublings before detection")
    p.add_argument("--workers", type=int, default=1, help="processes (one shard each)")
    p.add_argument("--face-model", dest="face_model", default="demo",
                   help="face model of the synthetic landmarks")
    p.add_argument("--embedding", default=None, help="its landmark embedding file")

    p = stages.add_parser("dfr", help="train F: w -> face parameters")
    _add_training_options(p, DFRSettings())
    p.add_argument("--hidden", type=int, default=DFRSettings.hidden,
                   help="width of the hidden layers of each of F's heads")
    p.add_argument("--heads", action=argparse.BooleanOptionalAction, default=DFRSettings.heads,
                   help="one MLP per parameter group (--no-heads: one shared MLP, the paper's)")
    p.add_argument("--landmark-batch", dest="landmark_batch", type=int,
                   default=DFRSettings.landmark_batch,
                   help="images per step for the landmark term and the priors: the batch and "
                   "more (landmarks need no rasterisation; 0: the batch alone)")
    p.add_argument("--albedo-terms", dest="albedo_terms", type=int, default=4, choices=(1, 4),
                   help="albedo tint: 1 = global RGB gain, 4 = gain + linear ramps")
    p.add_argument("--also", nargs="+", default=(), metavar="CORPUS",
                   help="more corpora in the batches, after --corpus (edit corpora: see "
                   "the corpus stage's --rignet)")
    p.add_argument("--init", default=None, help="start from this F (a dfr.safetensors) "
                   "instead of fresh weights: refine it, e.g. on an edit corpus")
    for name in ("w_shape", "w_expression", "w_albedo"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float,
                       default=getattr(DFRSettings, name), help="prior weight")

    p = stages.add_parser("rignet", help="train RigNet (needs a trained F)")
    _add_training_options(p, RigNetSettings())
    p.add_argument("--dfr", required=True, help="F: the dfr stage's dfr.safetensors")
    p.add_argument("--modes", nargs="+", default=list(RigNetSettings.modes), choices=list(MODES),
                   help="edit modes trained (the paper trains each and all)")
    p.add_argument("--latent-dim", dest="latent_dim", type=int, default=RigNetSettings.latent_dim,
                   help="size of each layer's code l_k")
    for name, what in (("w_rec", "weight of L_rec"), ("w_edit", "weight of L_edit"),
                       ("w_consist", "weight of L_consist"),
                       ("w_control", "weight of L_control, the request in F's parameter "
                                     "space (not in the paper; see docs/stylerig_training.md)"),
                       ("w_render", "weight of L_edit and L_consist as renders (0: only "
                                    "L_rec and L_control, nothing rendered: far cheaper steps)"),
                       ("rho", "AdaDelta's rho"),
                       ("eps", "AdaDelta's epsilon")):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float,
                       default=getattr(RigNetSettings, name), help=what)
    p.add_argument("--generator", default=None, help="for preview images (default: the "
                   "corpus' generator if the file exists)")

    p = stages.add_parser("evaluate", help="control accuracy of a trained RigNet")
    p.add_argument("--corpus", required=True, help="corpus folder")
    p.add_argument("--dfr", required=True, help="F: the dfr stage's dfr.safetensors")
    p.add_argument("--rignet", required=True, help="the rignet stage's rignet.safetensors")
    p.add_argument("--out", default=None, help="folder for summary.json and edits.jsonl")
    p.add_argument("--edits", type=int, default=300, help="edits measured")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                   help="edit modes measured")
    p.add_argument("--estimator", default="latent", choices=ESTIMATORS,
                   help="'latent': F(w_hat), fast; 'image': landmarks and photometric fit of "
                        "the generated image, the honest measure (needs --generator)")
    p.add_argument("--generator", default=None,
                   help="the generator, for --estimator image (default: the corpus')")
    p.add_argument("--face-model", dest="face_model", default="demo",
                   help="'demo' or a FLAME .pkl, as in training")
    p.add_argument("--embedding", default=None, help="its landmark embedding file")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16,
                   help="edits per batch")
    p.add_argument("--seed", type=int, default=0, help="which pairs and modes are drawn")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    return parser


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.quiet
    # SIGTERM (cluster schedulers, `kill`) checkpoints like Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    finished = False
    try:
        if hasattr(args, "device"):             # landmarks run dlib, on the CPU
            check_device(args.device)
        if args.stage == "corpus":
            from server.training.stylerig.corpus import build_corpus
            build_corpus(args.out, CorpusSettings(**_fields(CorpusSettings, args)), args.device,
                         args.batch_size, progress)
        elif args.stage == "landmarks":
            from server.training.stylerig.landmarks import detect_corpus_landmarks
            summary = detect_corpus_landmarks(args.corpus, args.source, args.detector,
                                              args.upsample, args.workers, args.face_model,
                                              args.embedding, progress)
            print(f"landmarks ({summary['source']}): {summary['found']} faces, "
                  f"{summary['flagged']} images flagged as faceless")
        elif args.stage == "dfr":
            from server.training.stylerig.train_dfr import DFRSettings, train_dfr
            train_dfr(args.corpus, args.run, DFRSettings(**_fields(DFRSettings, args)),
                      args.device, progress)
        elif args.stage == "rignet":
            from server.training.stylerig.train_rignet import RigNetSettings, train_rignet
            train_rignet(args.corpus, args.run, RigNetSettings(**_fields(RigNetSettings, args)),
                         args.device, args.generator, progress)
        else:
            from server.training.stylerig.evaluate import EvalSettings, evaluate, format_summary
            summary = evaluate(args.corpus, EvalSettings(**_fields(EvalSettings, args)),
                               args.device, args.out, progress)
            print(format_summary(summary))
            if summary["edits"] and summary["failures"] == summary["edits"]:
                print("error: every edit failed, so nothing was measured (see above)",
                      file=sys.stderr)
                return 1
        finished = True
    except KeyboardInterrupt:
        print("interrupted: run the same command to resume from the last checkpoint or shard",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RunFolderBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        distributed.teardown(finished)
    return 0
