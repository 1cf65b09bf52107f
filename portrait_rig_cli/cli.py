"""``portrait-rig``: the command line (see ``portrait_rig_cli`` for the commands)."""

from __future__ import annotations

import argparse
import sys

from . import render


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="portrait-rig", description="Portrait Rig tools")
    commands = ap.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="render the demo performance (frames, contact sheet, video, .blend)",
        description="Build the demo head's performance in a new Blender scene, render it "
                    "through a render server and write frames, a contact sheet, a video "
                    "and the .blend.")
    demo.add_argument("--out", default="renders", help="output folder (default %(default)s)")
    demo.add_argument("--frames", type=_positive, default=48,
                      help="length of the take in frames (default %(default)s)")
    demo.add_argument("--size", type=_positive, default=512,
                      help="frame width and height in pixels (default %(default)s)")
    demo.add_argument("--backend", default=None,
                      help="server backend (default: preview for a started server, the "
                           "server's default for --server)")
    demo.add_argument("--server", type=_address, default=None, metavar="HOST:PORT",
                      help="use this running server instead of starting one")
    demo.add_argument("--token", default=None, help="the --server's access token, if any")
    demo.add_argument("--sheet-frames", type=_positive, default=8,
                      help="frames on the contact sheet (default %(default)s)")
    demo.add_argument("--sheet-columns", type=_positive, default=4,
                      help="contact sheet columns (default %(default)s)")
    demo.add_argument("--sheet-size", type=_positive, default=192,
                      help="largest side of a frame on the sheet (default %(default)s)")
    demo.add_argument("--sheet", default=None, metavar="PATH",
                      help="also copy the contact sheet here (e.g. "
                           "docs/images/demo_contact_sheet.png)")
    demo.add_argument("--no-video", dest="video", action="store_false",
                      help="skip the MP4 even when FFmpeg is available")
    render.add_parser(commands, _address, _positive)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command == "demo":
        if args.frames < 2:
            parser().error("--frames must be at least 2")
        if args.backend == "diffusionrig":
            parser().error("the diffusionrig backend takes its appearance from a reference "
                           "photo or latent, which the demo scene has none of: render with "
                           "--backend preview or stylerig, or open the demo's .blend, set the "
                           "rig's Reference photo in the Portrait Rig panel and render it "
                           "(blender -b demo.blend -a)")
        from . import demo, extension
        try:
            status = demo.run(args)
        except (RuntimeError, OSError, ValueError) as exc:
            # Blender's render errors arrive as RuntimeError("Error: Portrait Rig: ...").
            print(f"portrait-rig demo: {exc}".rstrip(), file=sys.stderr)
            status = 1
        return extension.exit_status(status)
    if args.command == "render":
        return render.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
