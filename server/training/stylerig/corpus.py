"""The StyleRig corpus: (w, image) pairs sampled from a frozen StyleGAN, stored in shards.

Sample i draws z_i = standard normal [z_dim] from NumPy's PCG64 seeded with SeedSequence([seed,
i]) (so any sample can be regenerated alone, and an interrupted run resumes exactly), maps it to
W+ with truncation (w = w_avg + psi * (mapping(z) - w_avg) on the first ``truncation_cutoff``
layers, all if None) and synthesises the image, which is downsampled to ``image_size`` for the
rest of the pipeline (box filter; antialiased bilinear for non-integer factors).

With ``style_mixing`` p > 0, a sample is, with probability p, a style mix as StyleGAN was
trained on: the layers from a crossover point on (uniform in 1..num_ws-1) take the latent of a
second draw (same rng, after z_i). RigNet's edits are W+ latents whose layers differ; F only
learns which layers carry pose, expression and light if its corpus holds such latents.

An edit corpus (``rignet`` and ``dfr`` set) holds a trained RigNet's edits instead: sample i is
RigNet's edit of the latent above towards a partner latent (drawn the same way from
SeedSequence([seed, i, 1])) in edit mode i mod 3 (pose, expression, lighting), the request
being the sample's controls with the mode's controls of the partner as F reads them, and the
image is the generator's image of the edited latent. F trained further on such a corpus
(``dfr --also``) learns to read the latents RigNet produces, which it otherwise misreads in
RigNet's favour (docs/stylerig_training.md).

Layout of the corpus folder:

    corpus.json          settings (generator, truncation, sizes, seed) and the sample count
    preview.png          the first images
    shard_00000/         samples [0, shard_size), then shard_00001/ ...
        w.npy            float32 [n, num_ws, w_dim]   the W+ latents
        images.npy       uint8 [n, S, S, 3]           RGB, rows top to bottom
        index.npy        int64 [n]                    global sample indices
        shard.json       {"first", "count"}
        landmarks.npz    written by the landmark stage

A shard is written into ``shard_XXXXX.partial/`` and renamed when complete, so after a kill
the corpus holds only whole shards; running the stage again writes the missing ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from server.checkpoints.stylegan import generator_fingerprint, load_generator
from server.checkpoints.stylerig import load_dfr, load_rignet
from server.models.rignet import MODES, mix_controls

from server.training.stylerig.preview import save_grid
from server.training.stylerig.run import absent_values
from server.training.progress import Progress

FORMAT = "portrait-rig.stylerig-corpus"
MANIFEST = "corpus.json"


@dataclass
class CorpusSettings:
    generator: str
    count: int
    shard_size: int = 1000
    truncation: float = 0.7
    truncation_cutoff: int | None = None
    image_size: int = 256
    seed: int = 0
    noise_mode: str = "const"
    style_mixing: float = 0.0
    rignet: str | None = None           # an edit corpus: this RigNet's edits ...
    dfr: str | None = None              # ... with requests as this F reads faces

    def __post_init__(self):
        for name in ("count", "shard_size", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not 0.0 <= self.style_mixing <= 1.0:
            raise ValueError(f"style_mixing: expected a probability in [0, 1], "
                             f"got {self.style_mixing!r}")
        if self.noise_mode not in ("const", "random", "none"):
            raise ValueError(f"noise_mode: expected const, random or none, got {self.noise_mode!r}")
        if (self.rignet is None) != (self.dfr is None):
            raise ValueError("an edit corpus needs both rignet and dfr (the F RigNet was "
                             "trained with)")

    def fixed(self) -> dict:
        """What every shard depends on (everything but the count)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "count"}


PARTNER_STREAM = 1                      # an edit corpus' partner latents


def _sample_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    key = [seed, index, stream] if stream else [seed, index]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def sample_z(seed: int, index: int, z_dim: int) -> np.ndarray:
    """z of sample ``index`` (see the module notes), float32 [z_dim]."""
    return _sample_rng(seed, index).standard_normal(z_dim).astype(np.float32)


def sample_latents(seed: int, index: int, z_dim: int, num_ws: int, style_mixing: float,
                   stream: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """(z, z2, cutoff) of sample ``index``: with probability ``style_mixing`` the layers from
    ``cutoff`` (uniform in 1..num_ws-1) on take their latent from a second draw z2, as in
    StyleGAN's mixing regularisation; otherwise cutoff = num_ws (z2 unused). z is
    ``sample_z``'s, so a corpus without mixing holds the same latents. ``stream`` 1 draws
    the partner latents of an edit corpus."""
    rng = _sample_rng(seed, index, stream)
    z = rng.standard_normal(z_dim).astype(np.float32)
    z2 = rng.standard_normal(z_dim).astype(np.float32)
    mixed = num_ws > 1 and rng.random() < style_mixing
    return z, z2, int(rng.integers(1, num_ws)) if mixed else num_ws


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, R, R] -> [B, C, size, size]: box filter for integer factors, else antialiased
    bilinear."""
    if x.shape[-1] == size:
        return x
    if x.shape[-1] % size == 0:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


def to_pipeline_images(img: torch.Tensor, size: int) -> np.ndarray:
    """Generator output [B, 3, R, R] in [-1, 1] -> uint8 [B, size, size, 3]."""
    x = resize_square((img.float().clamp(-1, 1) + 1) / 2, size)
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class RigNetEdits:
    """The edits of an edit corpus (module notes): (w, partner v, sample indices) ->
    RigNet's edit of each w [B, num_ws, w_dim]."""

    def __init__(self, settings: CorpusSettings, G, device):
        self.rignet = load_rignet(settings.rignet, device)
        self.dfr, _ = load_dfr(settings.dfr, device)
        for name, net in (("rignet", self.rignet), ("dfr", self.dfr)):
            if (net.num_ws, net.w_dim) != (G.num_ws, G.w_dim):
                raise ValueError(f"{getattr(settings, name)} reads [{net.num_ws}, {net.w_dim}] "
                                 f"latents, the generator makes [{G.num_ws}, {G.w_dim}]")
        self.layout = self.dfr.layout.control_layout()
        if self.layout.dim != self.rignet.control_dim:
            raise ValueError(f"{settings.rignet} takes {self.rignet.control_dim} controls, "
                             f"{settings.dfr} gives {self.layout.dim}: not the F it was "
                             "trained with")

    def __call__(self, w: torch.Tensor, v: torch.Tensor, indices) -> torch.Tensor:
        modes = list(MODES)
        request = mix_controls(self.dfr(w).controls(self.layout), self.dfr(v).controls(self.layout),
                               [modes[int(i) % len(modes)] for i in indices], self.layout)
        return self.rignet(w, request)


def file_fingerprint(path) -> str | None:
    """First 16 hex digits of the SHA-256 of a file's bytes (None for no file)."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@torch.no_grad()
def synthesise(G, seed: int, indices, settings: CorpusSettings, device,
               edits: RigNetEdits | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(w float32 [n, num_ws, w_dim], images uint8 [n, S, S, 3]) of the given samples."""
    ws = sample_ws(G, seed, indices, settings, device)
    if edits is not None:
        ws = edits(ws, sample_ws(G, seed, indices, settings, device, PARTNER_STREAM), indices)
    img = G.synthesis(ws, noise_mode=settings.noise_mode)
    return ws.float().cpu().numpy(), to_pipeline_images(img, settings.image_size)


def sample_ws(G, seed: int, indices, settings: CorpusSettings, device, stream: int = 0
              ) -> torch.Tensor:
    """W+ latents [n, num_ws, w_dim] of the given samples (module notes)."""
    drawn = [sample_latents(seed, int(i), G.z_dim, G.num_ws, settings.style_mixing, stream)
             for i in indices]
    z, z2 = (torch.from_numpy(np.stack([d[k] for d in drawn])).to(device) for k in (0, 1))
    ws = G.mapping(z, None, truncation_psi=settings.truncation,
                   truncation_cutoff=settings.truncation_cutoff)
    cutoff = torch.tensor([d[2] for d in drawn], device=device)
    if bool((cutoff < G.num_ws).any()):
        ws2 = G.mapping(z2, None, truncation_psi=settings.truncation,
                        truncation_cutoff=settings.truncation_cutoff)
        later = torch.arange(G.num_ws, device=device)[None, :] >= cutoff[:, None]
        ws = torch.where(later[..., None], ws2, ws)
    return ws


def shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, count)) for s in range(0, count, shard_size)]


def write_shard(folder: Path, first: int, w: np.ndarray, images: np.ndarray) -> None:
    """Write one shard atomically (a ``.partial`` folder renamed when complete)."""
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    np.save(partial / "w.npy", np.ascontiguousarray(w, dtype=np.float32))
    np.save(partial / "images.npy", np.ascontiguousarray(images, dtype=np.uint8))
    np.save(partial / "index.npy", np.arange(first, first + len(w), dtype=np.int64))
    (partial / "shard.json").write_text(json.dumps({"first": first, "count": len(w)}))
    if folder.exists():            # a shorter last shard of a smaller corpus
        shutil.rmtree(folder)
    os.rename(partial, folder)


def _shard_complete(folder: Path, first: int, count: int) -> bool:
    try:
        info = json.loads((folder / "shard.json").read_text())
    except (OSError, ValueError):
        return False
    return info == {"first": first, "count": count}


def _check_manifest(root: Path, settings: CorpusSettings, G) -> None:
    path = root / MANIFEST
    manifest = {"format": FORMAT, **settings.fixed(), "count": settings.count,
                "architecture": G.config.architecture, "num_ws": G.num_ws, "w_dim": G.w_dim,
                "img_resolution": G.img_resolution,
                "generator_fingerprint": generator_fingerprint(G),
                "rignet_fingerprint": file_fingerprint(settings.rignet),
                "dfr_fingerprint": file_fingerprint(settings.dfr)}
    if path.is_file():
        previous = {**absent_values(settings), **json.loads(path.read_text())}
        for key, value in manifest.items():
            # Files are identified by their fingerprints: they may have moved.
            if key not in ("count", "generator", "rignet", "dfr") and previous.get(key) != value:
                raise ValueError(f"{root}: the corpus was sampled with {key}={previous.get(key)!r}"
                                 f", not {value!r}; use a new folder to change it")
    path.write_text(json.dumps(manifest, indent=2))


def build_corpus(root, settings: CorpusSettings, device="cpu", batch_size: int = 16,
                 progress: bool = True) -> None:
    """Sample the corpus into ``root``, skipping shards that are already complete."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    G = load_generator(settings.generator, device)
    if G.c_dim:
        raise ValueError(f"{settings.generator}: conditional generators (c_dim={G.c_dim}) are "
                         "not supported")
    _check_manifest(root, settings, G)
    edits = RigNetEdits(settings, G, device) if settings.rignet else None
    ranges = shard_ranges(settings.count, settings.shard_size)
    todo = [(k, a, b) for k, (a, b) in enumerate(ranges)
            if not _shard_complete(root / shard_name(k), a, b - a)]
    bar = Progress(settings.count, "corpus", start=settings.count - sum(b - a for _, a, b in todo),
                   enabled=progress, unit="img")
    for k, first, end in todo:
        ws, images = [], []
        for start in range(first, end, batch_size):
            w, img = synthesise(G, settings.seed, range(start, min(start + batch_size, end)),
                                settings, device, edits)
            ws.append(w)
            images.append(img)
            bar.update(len(w))
        write_shard(root / shard_name(k), first, np.concatenate(ws), np.concatenate(images))
    bar.close()
    corpus = Corpus(root)
    save_grid([list(corpus.images(np.arange(r, min(r + 8, corpus.n))))
               for r in range(0, min(corpus.n, 32), 8)], root / "preview.png")


class Corpus:
    """Read access to a complete corpus folder (memory-mapped arrays) and its landmarks."""

    def __init__(self, root):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.root}: no {MANIFEST}; run the corpus stage first")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: not a StyleRig corpus manifest")
        self.n = int(self.manifest["count"])
        self.shard_size = int(self.manifest["shard_size"])
        self.image_size = int(self.manifest["image_size"])
        self.num_ws, self.w_dim = int(self.manifest["num_ws"]), int(self.manifest["w_dim"])
        self.shards = []
        for k, (first, end) in enumerate(shard_ranges(self.n, self.shard_size)):
            folder = self.root / shard_name(k)
            if not _shard_complete(folder, first, end - first):
                raise ValueError(f"{self.root}: {folder.name} is missing or incomplete; run the "
                                 "corpus stage again to finish the corpus")
            self.shards.append(folder)
        self._w = [np.load(f / "w.npy", mmap_mode="r") for f in self.shards]
        self._images = [np.load(f / "images.npy", mmap_mode="r") for f in self.shards]

    def _locate(self, indices) -> list[tuple[int, int]]:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"sample indices outside 0..{self.n - 1}")
        return [(int(i) // self.shard_size, int(i) % self.shard_size) for i in indices]

    def w(self, indices, device="cpu") -> torch.Tensor:
        """float32 [B, num_ws, w_dim]."""
        rows = [self._w[s][r] for s, r in self._locate(indices)]
        return torch.from_numpy(np.stack(rows)).to(device)

    def images(self, indices) -> np.ndarray:
        """uint8 [B, S, S, 3]."""
        return np.stack([self._images[s][r] for s, r in self._locate(indices)])

    # ------------------------------------------------------------------ landmarks
    def landmark_files(self) -> list[Path]:
        return [f / "landmarks.npz" for f in self.shards]

    def landmarks(self) -> tuple[np.ndarray, np.ndarray, str]:
        """(landmarks float32 [N, 68, 2] (dlib convention, image pixels), found bool [N],
        source) of every sample; raises if the landmark stage has not finished."""
        points, found, sources = [], [], set()
        for path in self.landmark_files():
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run the landmarks stage first")
            with np.load(path, allow_pickle=False) as data:
                points.append(data["landmarks"])
                found.append(data["found"])
                sources.add(str(data["source"]))
        if len(sources) != 1:
            raise ValueError(f"{self.root}: shards have landmarks from different sources "
                             f"{sorted(sources)}")
        return np.concatenate(points), np.concatenate(found), sources.pop()
