"""Animation render through the Portrait Rig engine: how much Blender and the engine add to
the server's own rendering time.

Starts the real server (``python -m server``, preview backend, demo head) on an ephemeral
port, builds the demo performance (``blender_rig.demo_scene``) in a headless ``bpy`` with
the extension loaded as Blender loads it, and renders it as ``blender -b ... -a`` would
(``bpy.ops.render.render(animation=True)``, PNG files). Prints

* ``total``: wall time of the animation render,
* ``server render``: the backend's rendering time from the frames' ``timings.render``
  (a batch's time shared by its frames),
* ``overhead per frame`` = (total - server render) / frames: what the engine, Blender
  (scene evaluation, PNG writing) and the transport add. Target <= 20 ms per frame,
* where Blender's side spends its time per frame (the engine's own figures: ``read`` =
  parameters from the render depsgraph, ``read_ahead`` = frame_set + parameters of coming
  frames, ``wait`` = blocked on the server, ``write`` = pixels into the render result),
* the batch sizes the server formed from the pipelined requests.

``--lookahead 0`` renders one frame at a time (what renders started from the UI do), for
comparison. Figures on a shared 2-core VM vary by +-20%: compare runs on the same machine;
Blender and the server compete for the same two cores here.

    python bench/bench_render_engine.py [--frames 48] [--size 512] [--lookahead 16 0]
"""

from __future__ import annotations

import argparse
import collections
import importlib
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from portrait_rig_cli import extension  # noqa: E402
from portrait_rig_cli.local_server import LocalServer  # noqa: E402

REPOSITORY_MODULE = "portrait_rig_bench"


def render_once(bpy, package: str, face, host: str, port: int, frames: int, size: int,
                lookahead: int, out: Path) -> dict:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    extension.enable(out.parent, REPOSITORY_MODULE)   # factory settings reset preferences
    demo_scene = importlib.import_module(f"{package}.blender_rig.demo_scene")
    sequence = importlib.import_module(f"{package}.blender_rig.sequence")
    prefs = bpy.context.preferences.addons[package].preferences
    prefs.server_host, prefs.server_port = host, port
    scene = bpy.context.scene
    demo_scene.build_demo_scene(bpy.context, face, frames=frames, size=size,
                                output=str(out / "frame_"))
    scene.portrait_rig_render.lookahead = lookahead
    start = time.perf_counter()
    bpy.ops.render.render(animation=True)
    total = time.perf_counter() - start
    summary = sequence.last_summary()
    assert summary["frames"] == frames and not summary["failure"], summary
    assert len(list(out.glob("frame_*.png"))) == frames
    summary["total_s"] = total
    return summary


def report(summary: dict, frames: int, lookahead: int) -> None:
    per_frame = summary["per_frame"]
    total_ms = summary["total_s"] * 1e3
    server_ms = sum(f["render_ms"] / f["batch_size"] for f in per_frame)
    overhead = (total_ms - server_ms) / frames
    print(f"\nlookahead {lookahead}: {frames} frames, {summary['requests']} requests, "
          f"{summary['prefetch_hits']} sent ahead and used")
    print(f"  total               {total_ms / 1e3:8.2f} s   ({total_ms / frames:6.1f} ms/frame)")
    print(f"  server render       {server_ms / 1e3:8.2f} s   ({server_ms / frames:6.1f} ms/frame)")
    print(f"  overhead per frame  {overhead:8.1f} ms  (target <= 20 ms)")
    times = summary["times_ms"]
    accounted = sum(times.values())
    for name in ("read", "read_ahead", "wait", "write"):
        print(f"    {name:<18}{times.get(name, 0.0) / frames:8.1f} ms/frame")
    print(f"    {'rest of Blender':<18}{(total_ms - accounted) / frames:8.1f} ms/frame "
          "(evaluation, compositing, PNG files)")
    sizes = collections.Counter(f["batch_size"] for f in per_frame)
    print("  server batch sizes  " + ", ".join(f"{size} x{count}"
                                             for size, count in sorted(sizes.items())))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--lookahead", type=int, nargs="+", default=[16, 0])
    ap.add_argument("--backend", default="preview")
    args = ap.parse_args()

    import bpy
    with LocalServer("--backend", args.backend, "--quiet") as server, \
            tempfile.TemporaryDirectory() as tmp:
        package = extension.package_name(REPOSITORY_MODULE)
        extension.enable(Path(tmp), REPOSITORY_MODULE)
        operators = importlib.import_module(f"{package}.blender_rig.operators")
        face = operators.fetch_server_model(server.host, server.port)
        print(f"server {server.host}:{server.port}, backend {args.backend}, "
              f"{args.frames} frames at {args.size} px")
        for lookahead in args.lookahead:
            out = Path(tmp) / f"lookahead_{lookahead}"
            out.mkdir()
            summary = render_once(bpy, package, face, server.host, server.port, args.frames,
                                  args.size, lookahead, out)
            report(summary, args.frames, lookahead)
        extension.remove_repository(REPOSITORY_MODULE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
