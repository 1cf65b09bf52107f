"""``portrait-rig render SHOT --out DIR``: render an exported shot file without Blender.

The shot's frames go to a render server as pipelined batch requests (``--ahead`` in flight, so
a server or a cluster always has the next batch queued): a running one (``--server``), a
front end started here for a Ray cluster (``--cluster``), or a local server on the shot's
backend. Output in ``DIR``::

    frame_0001.png ...          the frames (sRGB; RGBA with the face coverage as alpha when
                                the shot asks for rgba8)
    <pass>/frame_0001.exr ...   each pass of the shot (--passes-as exr: float32; png: 8-bit,
                                depth 16-bit millimetres)
    contact_sheet.png           frames spread over the shot
    <scene>.mp4                 H.264, when ffmpeg is on the PATH

Every file is written under a temporary name and renamed, so an interrupted render leaves
whole frames only; the image is written after its passes, so a frame counts as done when all
its files exist. A second run skips done frames (``--overwrite`` renders them again).
A frame the server refuses is reported and the others still render; the exit status is then
1 and a re-run renders what is missing.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from portrait_rig.client import Client, Frame, ServerError
from portrait_rig.colour import linear_to_srgb
from portrait_rig.files import atomic_path
from portrait_rig.shot_file import ShotFile, ShotFileError

from . import contact_sheet
from .local_server import LocalServer

WRITE_THREADS = 2           # PNG/EXR encoding beside the socket


class RenderError(Exception):
    """The render cannot go on (bad shot, no server, lost connection); for the user."""


# ---------------------------------------------------------------------------- files

def frame_name(frame: int) -> str:
    return f"frame_{frame:04d}"


def frame_files(out: Path, frame: int, passes, passes_as: str) -> list[Path]:
    """Every file of ``frame``: its passes, then the image (written last)."""
    name = frame_name(frame)
    return [out / p / f"{name}.{passes_as}" for p in passes] + [out / f"{name}.png"]


def write_png(path: Path, pixels: np.ndarray) -> None:
    """uint8 [H, W] (grey), [H, W, 3] (RGB), [H, W, 4] (RGBA) or uint16 [H, W] as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, "PNG", compress_level=1)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())


def write_exr(path: Path, name: str, data: np.ndarray) -> None:
    """A float32 [H, W, C] pass as a ZIP-compressed scanline EXR; channels X, Y, Z for
    normals, R, G, B for colours, Y for the mask, Z for depth."""
    try:
        import OpenEXR
    except ImportError:
        raise RenderError("EXR passes need the OpenEXR package: pip install "
                          "'portrait-rig[render]' (or --passes-as png)") from None
    names = {"normal": "XYZ", "mask": "Y", "depth": "Z"}.get(name, "RGB")
    channels = {c: np.ascontiguousarray(data[..., i]) for i, c in enumerate(names)}
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    with atomic_path(path) as tmp, OpenEXR.File(header, channels) as exr:
        exr.write(tmp)


def pass_png(name: str, data: np.ndarray) -> np.ndarray:
    """8-bit view of a pass: normals (n + 1) / 2, colours sRGB-encoded, the mask as is;
    depth as 16-bit millimetres."""
    if name == "depth":
        return np.clip(np.rint(data[..., 0] * 1000.0), 0, 65535).astype(np.uint16)
    if name == "mask":
        return np.rint(np.clip(data[..., 0], 0, 1) * 255).astype(np.uint8)
    value = data * 0.5 + 0.5 if name == "normal" else linear_to_srgb(np.clip(data, 0, 1))
    return np.rint(np.clip(value, 0, 1) * 255).astype(np.uint8)


def write_frame(out: Path, frame: int, reply: Frame, passes_as: str) -> None:
    """Write the passes, then the image, each atomically."""
    h, w = reply.height, reply.width
    for name, (channels, floats) in reply.passes.items():
        data = np.frombuffer(floats, np.float32).reshape(h, w, channels)
        path = out / name / f"{frame_name(frame)}.{passes_as}"
        if passes_as == "exr":
            write_exr(path, name, data)
        else:
            write_png(path, pass_png(name, data))
    channels = 4 if reply.format == "rgba8" else 3
    pixels = np.frombuffer(reply.pixels, np.uint8).reshape(h, w, channels)
    write_png(out / f"{frame_name(frame)}.png", pixels)


# ---------------------------------------------------------------------------- frames

def parse_frames(text: str) -> set[int]:
    """``1-10,12,20..30`` -> the frame numbers (``A..B`` allows negative frames)."""
    frames: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(-?\d+)\s*(?:(?:-|\.\.)\s*(-?\d+))?\s*", part)
        if not match:
            raise ValueError(f"--frames: {part!r} is not a frame or a range A-B")
        lo = int(match[1])
        hi = int(match[2]) if match[2] is not None else lo
        if hi < lo:
            raise ValueError(f"--frames: range {part.strip()!r} ends before it starts")
        frames.update(range(lo, hi + 1))
    return frames


def frames_to_render(shot: ShotFile, out: Path, selection: set[int] | None,
                     overwrite: bool, passes_as: str) -> tuple[list[int], int]:
    """(indices into shot.frames to render, number of selected frames already done)."""
    todo, done = [], 0
    for index, entry in enumerate(shot.frames):
        if selection is not None and entry.frame not in selection:
            continue
        if not overwrite and all(p.exists() for p in frame_files(out, entry.frame,
                                                                 shot.passes, passes_as)):
            done += 1
        else:
            todo.append(index)
    return todo, done


# ---------------------------------------------------------------------------- rendering

def render_shot(client: Client, shot: ShotFile, todo: list[int], out: Path, *, ahead: int,
                passes_as: str, progress, log=print) -> list[tuple[int, str]]:
    """Render ``shot.frames[i]`` for ``i`` in ``todo`` through ``client`` into ``out``; returns
    the (frame, message) of the frames the server refused. Raises RenderError when the
    connection is lost or no reply comes within the client's timeout."""
    limit = client.hello.get("limits", {}).get("max_queued_batch", ahead)
    ahead = max(1, min(ahead, limit))
    waiting = deque(todo)
    in_flight: dict[object, int] = {}
    writes: deque = deque()
    failures: list[tuple[int, str]] = []

    def finish_writes(block: bool) -> None:
        while writes and (block or writes[0].done()):
            writes.popleft().result()           # raises what the writer raised
            progress.update(1)

    with ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="write") as pool:
        try:
            while waiting or in_flight:
                while waiting and len(in_flight) < ahead:
                    index = waiting.popleft()
                    entry = shot.frames[index]
                    rid = client.send_render(entry.params, shot.width, shot.height,
                                             backend=shot.backend, format=shot.image,
                                             passes=shot.passes, mode="batch",
                                             shot=shot.shot_request(index))
                    in_flight[rid] = index
                try:
                    reply = client.receive()
                except ServerError as exc:
                    if exc.id not in in_flight:
                        raise RenderError(f"the server refused: {exc.message}") from None
                    frame = shot.frames[in_flight.pop(exc.id)].frame
                    where = f" ({exc.field})" if exc.field else ""
                    failures.append((frame, f"{exc.code}: {exc.message}{where}"))
                    log(f"frame {frame}: {exc.code}: {exc.message}{where}")
                    continue
                index = in_flight.pop(getattr(reply, "id", None), None)
                if index is None or not isinstance(reply, Frame):
                    continue                        # not a reply to a render of ours
                writes.append(pool.submit(write_frame, out, shot.frames[index].frame, reply,
                                          passes_as))
                finish_writes(block=len(writes) > 2 * ahead)   # bounded memory
            finish_writes(block=True)
        except (ConnectionError, TimeoutError) as exc:
            raise RenderError(f"{exc} (run the command again to resume)") from None
    return failures


def encode_video(frames: list[Path], fps: float, path: Path) -> Path | None:
    """H.264 MP4 of ``frames`` with ffmpeg; None when ffmpeg is not on the PATH."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return None
    listing = "".join(f"file '{os.fspath(p.resolve())}'\nduration {1.0 / fps:.9f}\n"
                      for p in frames)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as list_file, \
            atomic_path(path) as tmp:
        list_file.write(listing)
        list_file.flush()
        subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-f", "concat", "-safe", "0",
                        "-i", list_file.name, "-r", f"{fps:g}", "-c:v", "libx264",
                        "-pix_fmt", "yuv420p", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",
                        "-f", "mp4", tmp], check=True, stdin=subprocess.DEVNULL)
    return path


def _server_args(args, shot: ShotFile) -> list[str]:
    server = ["--backend", shot.backend or "preview", "--quiet"]
    if args.cluster:
        server += ["--cluster", args.cluster]
    for option in args.option:
        server += ["--option", option]
    return server


def run(args) -> int:
    try:
        shot = ShotFile.load(args.shot)
        selection = parse_frames(args.frames) if args.frames else None
    except (OSError, ShotFileError, ValueError) as exc:
        print(f"portrait-rig render: {args.shot}: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    for name in ("", *shot.passes):
        (out / name).mkdir(parents=True, exist_ok=True)
    todo, done = frames_to_render(shot, out, selection, args.overwrite, args.passes_as)
    selected = done + len(todo)
    print(f"{args.shot}: {len(shot.frames)} frames at {shot.width}x{shot.height}, "
          f"{selected} selected, {done} already rendered", flush=True)
    failures: list = []
    if todo:
        try:
            if args.server:
                failures = _render_on(args.server, args, shot, todo, out, done, selected)
            else:
                with LocalServer(*_server_args(args, shot)) as server:
                    failures = _render_on((server.host, server.port), args, shot, todo,
                                          out, done, selected)
        except (RenderError, RuntimeError, OSError) as exc:
            print(f"portrait-rig render: {exc}", file=sys.stderr)
            return 1
    for frame, message in failures:
        print(f"portrait-rig render: frame {frame} not rendered: {message}", file=sys.stderr)
    _finish(args, shot, out)
    return 1 if failures else 0


def _render_on(address, args, shot, todo, out, done, selected):
    from tqdm import tqdm

    host, port = address
    token = args.token or os.environ.get("PORTRAIT_RIG_TOKEN")
    try:
        client = Client(host, port, token=token, timeout=args.timeout,
                        client_name="portrait-rig render")
        client.connect()
    except ServerError as exc:
        raise RenderError(f"the server at {host}:{port} refused: {exc.message}") from None
    with client:
        names = [b["name"] for b in client.hello.get("backends", [])]
        if shot.backend is not None and shot.backend not in names:
            raise RenderError(f"the server at {host}:{port} has no {shot.backend!r} backend "
                              f"(it offers {', '.join(names)})")
        workers = client.hello.get("workers")
        print(f"server {host}:{port}: backend {shot.backend or client.hello['default_backend']}"
              + (f", workers {workers}" if workers else ""), flush=True)
        started = time.perf_counter()
        with tqdm(total=selected, initial=done, unit="frame", dynamic_ncols=True,
                  file=sys.stderr) as progress:
            failures = render_shot(client, shot, todo, out, ahead=args.ahead,
                                   passes_as=args.passes_as, progress=progress,
                                   log=progress.write)
        seconds = time.perf_counter() - started
        rendered = len(todo) - len(failures)
        print(f"rendered {rendered} frames in {seconds:.1f} s "
              f"({rendered / max(seconds, 1e-9):.1f} frames/s)", flush=True)
    return failures


def _finish(args, shot: ShotFile, out: Path) -> None:
    """Contact sheet and video, once every frame of the shot is there."""
    images = [out / f"{frame_name(f.frame)}.png" for f in shot.frames]
    missing = sum(not p.exists() for p in images)
    if missing:
        if args.sheet or args.video:
            print(f"contact sheet and video: waiting for {missing} more frames", flush=True)
        return
    if args.sheet:
        sheet = out / "contact_sheet.png"
        contact_sheet.make_contact_sheet(contact_sheet.pick(images, args.sheet_frames),
                                         sheet, columns=args.sheet_columns,
                                         max_side=args.sheet_size)
        print(f"contact sheet: {sheet}", flush=True)
    if args.video:
        name = re.sub(r"[^\w.-]+", "_", shot.scene).strip("._") or "shot"
        video = encode_video(images, shot.fps, out / f"{name}.mp4")
        print(f"video: {video}" if video else "video: skipped (no ffmpeg on the PATH)",
              flush=True)


def add_parser(commands, address_type, positive) -> None:
    render = commands.add_parser(
        "render", help="render an exported shot file (no Blender needed)",
        description="Render a shot file written by the add-on's Export Shot through a "
                    "render server: frames written atomically, resumable, passes, contact "
                    "sheet and video.")
    render.add_argument("shot", help="the shot file (.json)")
    render.add_argument("--out", required=True, help="output folder")
    where = render.add_mutually_exclusive_group()
    where.add_argument("--server", type=address_type, metavar="HOST:PORT",
                       help="render on this running server")
    where.add_argument("--cluster", metavar="auto|ADDRESS",
                       help="start a front end here for this Ray cluster and render on it")
    render.add_argument("--token", default=None,
                        help="the --server's access token (default: $PORTRAIT_RIG_TOKEN)")
    render.add_argument("--option", action="append", default=[], metavar="BACKEND.KEY=VALUE",
                        help="backend option of the server started here (repeatable)")
    render.add_argument("--frames", default=None, metavar="LIST",
                        help="only these frames, e.g. 1-48 or 1-10,20..30 (default: all)")
    render.add_argument("--overwrite", action="store_true",
                        help="render frames whose files exist again")
    render.add_argument("--passes-as", choices=("exr", "png"), default="exr",
                        help="file format of the shot's passes (default %(default)s)")
    render.add_argument("--ahead", type=positive, default=32,
                        help="requests in flight (default %(default)s)")
    render.add_argument("--timeout", type=float, default=300.0,
                        help="seconds without any reply before giving up (default "
                             "%(default)s)")
    render.add_argument("--no-sheet", dest="sheet", action="store_false",
                        help="no contact sheet")
    render.add_argument("--sheet-frames", type=positive, default=12,
                        help="frames on the contact sheet (default %(default)s)")
    render.add_argument("--sheet-columns", type=positive, default=4,
                        help="contact sheet columns (default %(default)s)")
    render.add_argument("--sheet-size", type=positive, default=192,
                        help="largest side of a frame on the sheet (default %(default)s)")
    render.add_argument("--no-video", dest="video", action="store_false",
                        help="no video even when ffmpeg is available")


__all__ = ["RenderError", "add_parser", "run"]
