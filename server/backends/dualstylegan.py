"""The DualStyleGAN backend: the rig's face in the style of an exemplar portrait (cartoon,
caricature, anime, ...), DualStyleGAN (Yang et al. CVPR 2022) driven by the StyleRig path.

Files: one folder per style family under ``server.paths.dualstylegan_dir()`` (the official
``checkpoint/`` layout: ``<style>/generator.pt``, ``(refined_)exstyle_code.npy``, optional
``sampler.pt``) and the optional Z+ encoder ``encoder.pt`` (``server.checkpoints.dualstylegan``).

Per batch of requests, for every frame to compute (each request and, with shot smoothing, its
neighbours):

1. Content, the intrinsic W+ [L, C]: the StyleRig path (``server.backends.stylegan_rig``):
   the identity of ``appearance.seed`` or ``latent_file`` (mapped, truncated towards w_avg by
   ``appearance.truncation``), or of ``appearance.reference_photo`` embedded with the Z+
   encoder (its z+ mapped layer by layer, then truncated towards 0 by ``photo_truncation``,
   as ``style_transfer.py`` does with 0.75); then RigNet's edit to the rig's pose, expression
   and light as seen from the camera, when RigNet weights are present. DualStyleGAN's
   intrinsic generator is the FFHQ StyleGAN2, kept frozen while the style paths were trained
   (only ``res`` and ``style`` are optimised), so a RigNet trained for FFHQ steers it and every
   family shares the identities. With ``appearance.style_reconstruct`` the content is the
   exemplar's own code instead: the exemplar's reconstruction (the add-on's gallery).
2. Style, the extrinsic W+: the family's (``style_family``) exemplar number
   ``style_exemplar`` (the order of its code file, the official style id); or, when set, a
   code drawn by the sampler N from ``style_seed``; or ``style_image``, an image on the server
   embedded with the encoder as a new exemplar (the paper's refinement of such codes, sec. 3.4,
   needs VGG and ID losses whose weights are not part of the model files: not done). Each
   z+ goes through the family's mapping network.
3. Weights [L]: ``style_weights`` when given, else ``style_structure`` on the structure layers
   (the first ``structure_layers``, 7 of 18) and ``style_colour`` on the others; the paper's
   default is 0.75 and 1. Reconstructions use weight 1 everywhere.
4. Shots with ``smooth`` (docs/protocol.md "Shots"): content and extrinsic latents are smoothed
   as StyleGAN latents are (``shots.smooth_latents``), the weights with the same time filter,
   so keyframed sliders move smoothly and a change of exemplar blends over a few frames.
5. One DualStyleGAN forward per family in the batch, noise mode 'const' (the generator's
   stored noise: fixed for every frame of every shot), images converted as ``stylerig``'s.

Each frame's header carries ``info.style``: ``family``, ``families`` (all families found),
``source`` ('exemplar', 'sampled' or 'image'), ``exemplar`` (index or null), ``name`` (the
exemplar's file name or null), ``exemplars`` (how many the family has), ``layers`` and
``structure_layers``. The gallery asks for ``style_reconstruct`` frames exemplar by exemplar
and learns the count and names from them.

Options (``--option dualstylegan.KEY=VALUE``): ``folder`` the style folders (default
``paths.dualstylegan_dir()``); ``family`` the default family (default "cartoon" when present,
else the first found); ``rignet`` "auto" / "none" / FILE as ``stylerig``; ``encoder`` "auto"
(``<folder>/encoder.pt`` when present) / "none" / FILE; ``photo_truncation`` (0.75);
``max_identities`` (64) identity latents and ``max_families`` (2) loaded families kept.

Timings (milliseconds, whole batch): ``identity``, ``rignet``, ``style``, ``synthesis``,
``image``, ``passes``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from portrait_rig.params import Appearance, RigParams
from server import paths
from server.backends.base import (Backend, RenderRequest, RenderResult, StageTimer, check_request,
                                  file_stamp, torch_device)
from server.backends.shots import smooth, smooth_latents
from server.backends.stylegan_rig import RigLatents, RigPasses, frame_images, request_windows
from server.checkpoints.dualstylegan import (ZPlusEncoder, load_dualstylegan, load_encoder,
                                             load_sampler, read_exstyle_codes)
from server.models.dualstylegan import DualStyleGAN, map_codes
from server.models.style_sampler import StyleSampler
from server.renderer.face_model import FaceModel
from server.renderer.head_view import head_views

DEFAULT_FAMILY = "cartoon"
ENCODER_SIZE = 256
_STYLE_ENTRIES = 256             # extrinsic latents kept per family


@dataclass
class Family:
    """One loaded style: its network, exemplar codes (name -> z+ [L, C], file order), the
    sampler when present, and the extrinsic W+ computed so far."""
    name: str
    model: DualStyleGAN
    codes: OrderedDict
    sampler: StyleSampler | None
    styles: OrderedDict = field(default_factory=OrderedDict)


class DualStyleGANBackend(Backend):
    """DualStyleGAN + RigNet on "cpu" or "cuda" (float32). Options: see the module notes."""

    name = "dualstylegan"

    def __init__(self, face_model: FaceModel, device: str = "cpu", folder=None, family=None,
                 rignet="auto", encoder="auto", photo_truncation=0.75, max_identities=64,
                 max_families=2):
        super().__init__(face_model, device)
        self.torch_device = torch_device(device)
        self.max_identities, self.max_families = max_identities, max_families
        self.photo_truncation = photo_truncation
        self.folder = Path(folder).expanduser() if folder else paths.dualstylegan_dir()
        found = paths.dualstylegan_families(self.folder)
        if not found:
            raise FileNotFoundError(f"no DualStyleGAN style under {self.folder}: "
                                    f"{paths.SOURCES['dualstylegan']}")
        self.default_family = family or (DEFAULT_FAMILY if DEFAULT_FAMILY in found else found[0])
        if self.default_family not in found:
            raise ValueError(f"family: no style {self.default_family!r} under {self.folder} "
                             f"(found: {', '.join(found)})")
        self.encoder_path = self._encoder_path(encoder)
        self._encoder: ZPlusEncoder | None = None
        self._families: OrderedDict[str, Family] = OrderedDict()
        self.num_ws = self.z_dim = None
        first = self._family(self.default_family)
        # The intrinsic generator is the same frozen FFHQ StyleGAN2 in every family: one
        # identity path (and RigNet) serves them all.
        self.rig = RigLatents(first.model.generator, self.torch_device, face_model.data, rignet,
                              self.max_identities, backend="dualstylegan",
                              generator_name=f"{self.default_family}/generator.pt",
                              same_generator=False)
        self.num_ws, self.z_dim = first.model.num_ws, first.model.z_dim
        self._passes = RigPasses(face_model, device)

    def summary(self) -> str:
        rignet = (f"RigNet {self.rig.rignet_path}" if self.rig.rignet is not None else
                  "no RigNet: identity only, the rig's pose, expression and light do not "
                  "change the portrait")
        return (f"{self.folder} (default style {self.default_family!r}), {rignet}, on "
                f"{self.torch_device}")

    # ------------------------------------------------------------------------ files
    def _encoder_path(self, option) -> Path | None:
        if option in (None, "none"):
            return None
        if option == "auto":
            path = self.folder / "encoder.pt"
            return path if path.is_file() else None
        path = Path(option).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"encoder: file not found: {path}")
        return path

    def _family(self, name: str | None) -> Family:
        name = self.default_family if name is None else name
        family = self._families.get(name)
        if family is not None:
            self._families.move_to_end(name)
            return family
        try:
            folder = paths.dualstylegan_family(name, self.folder)
        except ValueError as exc:
            raise ValueError(f"appearance.style_family: {exc}") from None
        if not (folder / "generator.pt").is_file():
            found = ", ".join(paths.dualstylegan_families(self.folder)) or "none"
            raise FileNotFoundError(f"appearance.style_family: no style {name!r} under "
                                    f"{self.folder} (found: {found})")
        model = load_dualstylegan(folder / "generator.pt", self.torch_device)
        if self.num_ws is not None and (model.num_ws, model.z_dim) != (self.num_ws, self.z_dim):
            raise ValueError(f"appearance.style_family: {name!r} has [{model.num_ws}, "
                             f"{model.z_dim}] latents, the other styles [{self.num_ws}, "
                             f"{self.z_dim}]")
        codes = read_exstyle_codes(paths.dualstylegan_codes(folder))
        shape = next(iter(codes.values())).shape
        if shape != (model.num_ws, model.z_dim):
            raise ValueError(f"{paths.dualstylegan_codes(folder)}: codes {list(shape)} do not "
                             f"fit the generator's [{model.num_ws}, {model.z_dim}]")
        sampler = None
        if (folder / "sampler.pt").is_file():
            sampler = load_sampler(folder / "sampler.pt", model.z_dim, self.torch_device)
            split = (sampler.config.structure_layers, sampler.config.colour_layers)
            if split != (model.structure_layers, model.num_ws - model.structure_layers):
                raise ValueError(f"{folder / 'sampler.pt'}: samples {split[0]} structure and "
                                 f"{split[1]} colour layers; the generator has "
                                 f"{model.structure_layers} and "
                                 f"{model.num_ws - model.structure_layers}")
        family = Family(name, model, codes, sampler)
        self._families[name] = family
        while len(self._families) > self.max_families:
            self._families.popitem(last=False)
        return family

    def _encoder_for(self, field_name: str) -> ZPlusEncoder:
        if self._encoder is None:
            if self.encoder_path is None:
                raise ValueError(f"appearance.{field_name}: needs DualStyleGAN's Z+ encoder: "
                                 f"put encoder.pt (its 'encoder' download) in {self.folder} or "
                                 "pass --option dualstylegan.encoder=FILE")
            encoder = load_encoder(self.encoder_path, self.torch_device)
            if (encoder.n_styles, encoder.dim) != (self.num_ws, self.z_dim):
                raise ValueError(f"encoder: {self.encoder_path} embeds into "
                                 f"[{encoder.n_styles}, {encoder.dim}], the generators take "
                                 f"[{self.num_ws}, {self.z_dim}]")
            self._encoder = encoder
        return self._encoder

    def warmup(self) -> None:
        """On CUDA, one frame so the first request does not pay for kernel selection."""
        if self.torch_device.type == "cuda":
            self.render([RenderRequest(RigParams(), 256, 256)])

    # ------------------------------------------------------------------------ rendering
    @torch.inference_mode()
    def render(self, requests: list[RenderRequest]) -> list[RenderResult]:
        for i, request in enumerate(requests):
            check_request(i, request)
        lap = StageTimer(self.torch_device)
        params, windows = request_windows(requests)
        families = [self._family(p.appearance.style_family) for p in params]
        plain = [i for i, p in enumerate(params) if not p.appearance.style_reconstruct]

        content = [None] * len(params)
        for i in plain:
            content[i] = self._identity(params[i].appearance)
        lap("identity")
        if plain and self.rig.rignet is not None:
            views = []
            for request, (start, length, _) in zip(requests, windows):
                views += head_views(params[start: start + length], request.width,
                                    request.height)
            edited = self.rig.edit(torch.stack([content[i] for i in plain]),
                                   [params[i] for i in plain], [views[i] for i in plain])
            for row, i in enumerate(plain):
                content[i] = edited[row]
            lap("rignet")

        styles, weights, infos = [], [], []
        found = paths.dualstylegan_families(self.folder)
        if not found:
            raise FileNotFoundError(f"no DualStyleGAN style under {self.folder}: "
                                    f"{paths.SOURCES['dualstylegan']}")
        for p, family in zip(params, families):
            exstyle, info = self._style(family, p.appearance, found)
            styles.append(exstyle)
            weights.append(self._weights(family.model, p.appearance))
            infos.append(info)
        for i, p in enumerate(params):
            if p.appearance.style_reconstruct:
                content[i] = styles[i]
        lap("style")

        content, styles, weights = torch.stack(content), torch.stack(styles), torch.stack(weights)
        rows = []
        for start, length, centre in windows:
            if length > 1:
                span = slice(start, start + length)
                rows.append((smooth_latents(content[span])[centre],
                             smooth_latents(styles[span])[centre],
                             smooth(weights[span])[centre]))
            else:
                rows.append((content[start], styles[start], weights[start]))
        images: list[torch.Tensor | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        models = {family.name: family.model for family in families}
        for i, (start, _, centre) in enumerate(windows):
            groups.setdefault(families[start + centre].name, []).append(i)
        for name, members in groups.items():
            c, e, w = (torch.stack([rows[i][j] for i in members]) for j in range(3))
            out = models[name](c, e, w, noise_mode="const")
            for row, i in enumerate(members):
                images[i] = out[row]
        lap("synthesis")
        results = [RenderResult(image, info={"style": infos[start + centre]})
                   for image, (start, _, centre) in
                   zip(frame_images(torch.stack(images), requests), windows)]
        lap("image")
        return self._passes.complete(requests, results, lap)

    def _identity(self, appearance: Appearance) -> torch.Tensor:
        """Content W+ [L, C] before RigNet: a photo's embedding, or the seed / latent file."""
        if not appearance.reference_photo:
            return self.rig.identity(appearance)
        path = paths.client_file("appearance.reference_photo", appearance.reference_photo,
                                     paths.PHOTOS)
        key = ("photo", file_stamp(path), self.photo_truncation)
        w = self.rig.cached(key)
        if w is None:
            encoder = self._encoder_for("reference_photo")
            codes = encoder(encoder_input(path, "reference_photo").to(self.torch_device))
            w = map_codes(self.rig.G.mapping, codes)[0]
            w = self.rig.put(key, DualStyleGAN.truncate(w, self.photo_truncation))
        return w

    def _style(self, family: Family, appearance: Appearance, found: list[str]
               ) -> tuple[torch.Tensor, dict]:
        """(extrinsic W+ [L, C], the frame's ``info.style``) of a request's style; ``found``
        lists the families on disk."""
        info = {"family": family.name, "families": found,
                "source": "exemplar", "exemplar": None, "name": None,
                "exemplars": len(family.codes), "layers": family.model.num_ws,
                "structure_layers": family.model.structure_layers}
        if appearance.style_image:
            path = paths.client_file("appearance.style_image", appearance.style_image,
                                     paths.PHOTOS)
            key = ("image", file_stamp(path))
            info["source"] = "image"
        elif appearance.style_seed is not None:
            if family.sampler is None:
                raise ValueError(f"appearance.style_seed: style {family.name!r} has no "
                                 f"sampler.pt (random styles need it: download it into "
                                 f"{self.folder / family.name})")
            key = ("seed", appearance.style_seed)
            info["source"] = "sampled"
        else:
            index = appearance.style_exemplar
            if index >= len(family.codes):
                raise ValueError(f"appearance.style_exemplar: style {family.name!r} has "
                                 f"{len(family.codes)} exemplars (0..{len(family.codes) - 1}), "
                                 f"got {index}")
            key = ("exemplar", index)
            info.update(exemplar=index, name=list(family.codes)[index])
        w = family.styles.get(key)
        if w is None:
            if key[0] == "image":
                codes = self._encoder_for("style_image")(
                    encoder_input(path, "style_image").to(self.torch_device))
            elif key[0] == "seed":
                codes = family.sampler(family.sampler.noise(key[1]).to(self.torch_device))
            else:
                codes = torch.from_numpy(family.codes[info["name"]])[None].to(self.torch_device)
            w = family.model.map_codes(codes)[0]
            family.styles[key] = w
            while len(family.styles) > _STYLE_ENTRIES:
                family.styles.popitem(last=False)
        family.styles.move_to_end(key)
        return w, info

    def _weights(self, model: DualStyleGAN, appearance: Appearance) -> torch.Tensor:
        """The weight vector [L] of a request (see the module notes)."""
        return style_weights(appearance, model.num_ws, model.structure_layers,
                             self.torch_device)


def style_weights(appearance: Appearance, layers: int, structure_layers: int,
                  device=None) -> torch.Tensor:
    """float32 [layers]: ``appearance.style_weights``, all ones for a reconstruction, else
    ``style_structure`` on the first ``structure_layers`` and ``style_colour`` on the rest."""
    if appearance.style_reconstruct:
        values = [1.0] * layers
    elif appearance.style_weights is not None:
        values = appearance.style_weights
        if len(values) != layers:
            raise ValueError(f"appearance.style_weights: the style's generator has {layers} "
                             f"layers, got {len(values)} weights")
    else:
        values = ([appearance.style_structure] * structure_layers
                  + [appearance.style_colour] * (layers - structure_layers))
    return torch.tensor(values, dtype=torch.float32, device=device)


def encoder_input(path: Path, field_name: str) -> torch.Tensor:
    """The Z+ encoder's input [1, 3, 256, 256] in [-1, 1] from an image file: a square image
    whose side is a multiple of 256 is taken as an FFHQ-aligned crop and average-pooled to 256
    (as ``style_transfer.py`` pools its 1024 crops); any other is aligned with
    ``server.photo.align.align_face`` (dlib's landmarks, FFHQ's recipe)."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = np.asarray(opened.convert("RGB"))
    except OSError as exc:
        raise ValueError(f"appearance.{field_name}: cannot read {path}: {exc}") from None
    height, width = image.shape[:2]
    if height != width or height % ENCODER_SIZE:
        try:
            from server.photo.align import align_face
            image, _ = align_face(image, ENCODER_SIZE)
        except (ImportError, ValueError, RuntimeError) as exc:   # no dlib, no face found
            raise ValueError(f"appearance.{field_name}: {path} is {width}x{height}, not a "
                             f"square aligned crop, and aligning it failed: {exc}") from None
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    pixels = pixels.permute(2, 0, 1)[None]
    return F.adaptive_avg_pool2d(pixels, ENCODER_SIZE).contiguous()
