"""``portrait-rig demo``: build the demo performance, render it through the render server and
write frames, a contact sheet, a video and the .blend.

Headless and in one process (``bpy``): a factory-fresh Blender with the Portrait Rig
extension enabled as Blender enables it, a local server subprocess on the chosen backend (or
an existing server), the rig built from the server's own face model, the take keyframed by
``blender_rig.demo_scene``, then ``bpy.ops.render.render(animation=True)`` through the
Portrait Rig engine. Output in ``--out``::

    demo.blend            the scene (blender -b demo.blend -a renders it again, given the
                          extension and a server at the address in its preferences)
    frames/frame_####.png the frames
    contact_sheet.png     --sheet-frames frames spread over the take
    demo.mp4              H.264, when this Blender has FFmpeg
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from . import contact_sheet, extension
from .local_server import LocalServer

REPOSITORY_MODULE = "portrait_rig_cli"
SCENE_NAME = "Portrait Rig Demo"


def run(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.server:
        host, port = args.server
        return _render(args, out, host, port, started)
    with LocalServer("--backend", args.backend or "preview", "--quiet") as server:
        print(f"render server: {args.backend or 'preview'} backend on "
              f"{server.host}:{server.port} (started in {time.perf_counter() - started:.1f} s)",
              flush=True)
        return _render(args, out, server.host, server.port, started)


def _render(args, out: Path, host: str, port: int, started: float) -> int:
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    repository = Path(tempfile.mkdtemp(prefix="portrait-rig-extension-"))
    try:
        package = extension.enable(repository, REPOSITORY_MODULE)
        try:
            return _render_scene(args, out, host, port, started, package.__name__)
        finally:
            extension.remove_repository(REPOSITORY_MODULE)    # disables the extension too
    finally:
        shutil.rmtree(repository, ignore_errors=True)


def _render_scene(args, out: Path, host: str, port: int, started: float, package: str) -> int:
    import importlib

    import bpy

    operators = importlib.import_module(f"{package}.blender_rig.operators")
    demo_scene = importlib.import_module(f"{package}.blender_rig.demo_scene")
    compat = importlib.import_module(f"{package}.blender_rig.compat")
    sequence = importlib.import_module(f"{package}.blender_rig.sequence")

    prefs = bpy.context.preferences.addons[package].preferences
    prefs.server_host, prefs.server_port, prefs.token = host, port, args.token or ""
    try:
        face = operators.fetch_server_model(host, port, prefs.token)  # the model it renders
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot get the face model from {host}:{port}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the extension's own ServerError class
        raise RuntimeError(f"the server at {host}:{port} refused the face model: "
                           f"{exc}") from None

    scene = bpy.context.scene
    scene.name = SCENE_NAME
    demo_scene.build_demo_scene(bpy.context, face, frames=args.frames, size=args.size)
    if args.backend:
        scene.portrait_rig.backend = args.backend
    blend = out / "demo.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))    # first: //frames/ is relative to it
    print(f"scene: {blend} ({args.frames} frames at {args.size} px)", flush=True)

    render_start = time.perf_counter()
    bpy.ops.render.render(animation=True)               # raises RuntimeError on failure
    render_s = time.perf_counter() - render_start
    summary = sequence.last_summary() or {}
    per_frame = summary.get("per_frame", [])
    server_s = sum(f["render_ms"] / f["batch_size"] for f in per_frame) / 1e3
    frames = [Path(scene.render.frame_path(frame=f))
              for f in range(scene.frame_start, scene.frame_end + 1)]
    print(f"rendered {len(frames)} frames in {render_s:.1f} s (server rendering {server_s:.1f} "
          f"s, {summary.get('requests', 0)} requests, largest batch "
          f"{max((f['batch_size'] for f in per_frame), default=0)}): {frames[0].parent}",
          flush=True)

    sheet = out / "contact_sheet.png"
    contact_sheet.make_contact_sheet(contact_sheet.pick(frames, args.sheet_frames), sheet,
                                     columns=args.sheet_columns, max_side=args.sheet_size)
    print(f"contact sheet: {sheet}", flush=True)
    if args.sheet:
        Path(args.sheet).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sheet, args.sheet)
        print(f"contact sheet copied to {args.sheet}", flush=True)
    if args.video:
        video = encode_video(frames, scene.render.fps, out / "demo.mp4", compat)
        print(f"video: {video}" if video else "video: skipped (this Blender has no FFmpeg)",
              flush=True)
    print(f"done in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


def encode_video(frames: list[Path], fps: int, path: Path, compat) -> Path | None:
    """Encode image files as H.264 MP4 with Blender's sequencer; None without FFmpeg.
    ``compat``: the extension's ``blender_rig.compat`` (sequencer and output differ by
    version)."""
    import bpy

    if not bpy.app.build_options.codec_ffmpeg:
        return None
    scene = bpy.data.scenes.new("Portrait Rig video")
    try:
        editor = scene.sequence_editor_create()
        strip = compat.sequencer_strips(editor).new_image(
            name="frames", filepath=str(frames[0]), channel=1, frame_start=1)
        for frame in frames[1:]:
            strip.elements.append(frame.name)
        first = bpy.data.images.load(str(frames[0]), check_existing=False)
        scene.render.resolution_x, scene.render.resolution_y = first.size
        bpy.data.images.remove(first)
        scene.render.resolution_percentage = 100
        scene.render.fps = fps
        scene.frame_start, scene.frame_end = 1, len(frames)
        scene.view_settings.view_transform = 'Standard'   # pass the frames' colours through
        settings = scene.render.image_settings
        compat.set_movie_output(settings)
        scene.render.ffmpeg.format = 'MPEG4'
        scene.render.ffmpeg.codec = 'H264'
        scene.render.ffmpeg.constant_rate_factor = 'HIGH'
        scene.render.filepath = str(path.with_suffix(""))
        produced = Path(scene.render.frame_path(frame=1))
        bpy.ops.render.render(animation=True, scene=scene.name)
    finally:
        bpy.data.scenes.remove(scene)
    produced.replace(path)                  # Blender names movies <name><first>-<last>.mp4
    return path
