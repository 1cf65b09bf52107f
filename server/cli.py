"""``portrait-rig-server``: run the render server from the command line.

Prints exactly one line ``listening on HOST:PORT`` to stdout once it accepts connections
(``--port 0`` picks a free port; tools read it from that line). Everything else - one line
per request, warnings, errors - goes to stderr. SIGINT/SIGTERM shut down gracefully, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import socket
import sys
import traceback

from portrait_rig import protocol

from server.service.app import ServerConfig, build_server

TOKEN_ENV = "PORTRAIT_RIG_TOKEN"


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    if not host:
        return False                    # "" means every interface
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def backends_help() -> str:
    """The backends and their options, for ``--help`` (from the registry; imports nothing)."""
    from server.backends import SPECS

    lines = ["backends and their options (--option BACKEND.KEY=VALUE):"]
    for spec in SPECS.values():
        lines.append(f"  {spec.name}: {spec.description}")
        for option in spec.options:
            default = "" if option.default is None else f" (default {option.default})"
            lines.append(f"      {spec.name}.{option.name}: {option.help}{default}")
    lines.append("model files live under $PORTRAIT_RIG_HOME (default ~/.portrait_rig); "
                 "--check lists what each backend found there")
    return "\n".join(lines)


def parse_args(argv=None) -> tuple[ServerConfig, argparse.Namespace]:
    defaults = ServerConfig()
    ap = argparse.ArgumentParser(
        prog="portrait-rig-server",
        description="Portrait Rig render server (wire protocol v1, see docs/protocol.md).",
        epilog=backends_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default=defaults.host,
                    help="address to bind (default %(default)s: this machine only)")
    ap.add_argument("--port", type=int, default=defaults.port,
                    help="TCP port (default %(default)s; 0 picks a free one)")
    ap.add_argument("--backend", default=defaults.backend,
                    help="default backend of render requests (default %(default)s)")
    ap.add_argument("--model", default=defaults.model,
                    help="face model: 'demo', 'flame' (the FLAME file in the model folder: "
                         "flame/generic_model.pkl or flame2023.pkl) or a path to a FLAME .pkl "
                         "/ .npz (default %(default)s)")
    ap.add_argument("--device", default=defaults.device,
                    help="torch device the worker renders on: cpu, cuda, cuda:1 ... "
                         "(default %(default)s)")
    ap.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                    help=f"shared secret clients must send in hello (default: ${TOKEN_ENV}); "
                         "required when binding to anything but loopback. Prefer the "
                         "variable: other users can read command lines")
    ap.add_argument("--rate", type=float, default=defaults.rate,
                    help="messages per second per connection, sustained (default %(default)s)")
    ap.add_argument("--burst", type=int, default=defaults.burst,
                    help="messages per connection at once (default %(default)s)")
    ap.add_argument("--max-queued-batch", type=int, default=defaults.max_queued_batch,
                    help="queued batch requests per connection (default %(default)s)")
    ap.add_argument("--max-batch", type=int, default=defaults.max_batch,
                    help="requests grouped into one backend call (default %(default)s)")
    ap.add_argument("--option", action="append", default=[], metavar="BACKEND.KEY=VALUE",
                    help="a backend option, repeatable, e.g. diffusionrig.checkpoint=model.pt "
                         "or diffusionrig.sampler=dpm++ (see each backend's documentation)")
    ap.add_argument("--deca-model", default=None,
                    help="fit requests: DECA's deca_model.tar, used with a FLAME face model "
                         "(default: $PORTRAIT_RIG_HOME/deca/deca_model.tar when present)")
    ap.add_argument("--landmark-embedding", default=None,
                    help="fit requests: FLAME landmark embedding (DECA's landmark_embedding.npy "
                         "or smplx's flame_static_embedding.pkl; default: "
                         "$PORTRAIT_RIG_HOME/flame/landmark_embedding.npy when present)")
    ap.add_argument("--cluster", default=None, metavar="auto|ADDRESS",
                    help="render on the Ray cluster at this address ('auto': the one this "
                         "machine belongs to), one worker per GPU; see docs/cluster.md")
    ap.add_argument("--quiet", action="store_true", help="no per-request log lines")
    ap.add_argument("--check", action="store_true",
                    help="list every backend, the files it looked for and where, what it found "
                         "and what to do about the rest, and the device; exit status 0 when "
                         "the chosen --backend can run, 1 otherwise (starts no server)")
    limits = ap.add_argument_group("files and limits (docs/security.md)")
    limits.add_argument("--allow-folder", action="append", default=[], metavar="DIR",
                        help="a folder whose files requests may name (appearance.latent_file, "
                             "reference_photo), besides $PORTRAIT_RIG_HOME/latents and "
                             "/photos; repeatable")
    limits.add_argument("--max-connections-per-address", type=int,
                        default=defaults.max_connections_per_address,
                        help="open connections per client address (default %(default)s)")
    limits.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout,
                        help="seconds without a request before a connection is closed "
                             "(default %(default)s)")
    limits.add_argument("--write-timeout", type=float, default=defaults.write_timeout,
                        help="seconds a client may leave its replies unread before it is "
                             "dropped (default %(default)s)")
    limits.add_argument("--max-unsent", type=float, default=defaults.max_unsent / 2**20,
                        metavar="MIB", help="unread reply MiB per connection above which the "
                        "server stops reading from it (default %(default)g)")
    limits.add_argument("--shutdown-grace", type=float, default=defaults.shutdown_grace,
                        help="seconds renders in progress get to finish on SIGTERM "
                             "(default %(default)s)")
    args = ap.parse_args(argv)

    if not 0 <= args.port <= 65535:
        ap.error(f"--port {args.port} is outside 0..65535")
    for name in ("rate", "burst", "max_queued_batch", "max_batch", "max_connections_per_address",
                 "idle_timeout", "write_timeout", "max_unsent"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.shutdown_grace < 0:
        ap.error("--shutdown-grace must not be negative")
    for folder in args.allow_folder:
        if not os.path.isdir(os.path.expanduser(folder)):
            ap.error(f"--allow-folder {folder}: not a folder")
    if args.token is not None and not args.token:
        ap.error("--token is empty")
    if args.token is None and not is_loopback(args.host):
        ap.error(f"refusing to listen on {args.host or 'every interface'!r} without a token: "
                 "anyone who can reach the port could drive the renderer. Pass --token (or set "
                 f"{TOKEN_ENV}) or bind to {protocol.DEFAULT_HOST}. The token is sent in clear "
                 "text: on untrusted networks use an SSH tunnel.")
    backend_options: dict[str, dict[str, str]] = {}
    for option in args.option:
        target, sep, value = option.partition("=")
        backend, dot, key = target.partition(".")
        if not (sep and dot and backend and key.isidentifier()):
            ap.error(f"--option {option!r}: expected BACKEND.KEY=VALUE")
        backend_options.setdefault(backend, {})[key] = value
    config = ServerConfig(host=args.host, port=args.port, backend=args.backend,
                          model=args.model, device=args.device, token=args.token,
                          rate=args.rate, burst=args.burst,
                          max_queued_batch=args.max_queued_batch, max_batch=args.max_batch,
                          log_requests=not args.quiet, backend_options=backend_options,
                          deca_model=args.deca_model,
                          landmark_embedding=args.landmark_embedding, cluster=args.cluster,
                          allowed_folders=tuple(args.allow_folder),
                          max_connections_per_address=args.max_connections_per_address,
                          idle_timeout=args.idle_timeout, write_timeout=args.write_timeout,
                          max_unsent=int(args.max_unsent * 2**20),
                          shutdown_grace=args.shutdown_grace)
    return config, args


def check_device(device: str) -> str | None:
    """Why torch cannot use ``device``, or None."""
    from server.backends.base import torch_device

    try:
        torch_device(device)
    except ValueError as exc:
        return str(exc)
    return None


def run_check(config: ServerConfig, out=sys.stdout) -> int:
    """``--check``: what every backend found, what to do about the rest; 0 when the chosen
    backend can run."""
    from server.backends import BACKEND_NAMES, spec
    from server.backends.check import check_backend, shown
    from server import paths
    from server.paths import HOME_ENV, home

    def say(text=""):
        print(text, file=out)

    say(f"model folder: {home()} (${HOME_ENV})")
    device_problem = check_device(config.device)
    say(f"device: {config.device}: " + (device_problem or "available"))
    try:
        from portrait_rig.face_source import load_face_data
        face = load_face_data(paths.face_model_source(config.model))
        say(f"face model: {face.name} ({face.n_vertices} vertices)")
        face_ok = True
    except Exception as exc:  # noqa: BLE001 - reported, with the reason
        say(f"face model: {config.model}: cannot load: {exc}")
        face_ok = False
    unknown = [name for name in config.backend_options if name not in BACKEND_NAMES]
    for name in unknown:
        say(f"--option {name}.*: unknown backend (available: {', '.join(BACKEND_NAMES)})")
    states = {}
    for name in BACKEND_NAMES:
        state = states[name] = check_backend(name, config.backend_options.get(name, {}))
        chosen = " (chosen with --backend)" if name == config.backend else ""
        say()
        say(f"{name}{chosen}: {state.state}" + (f": {state.reason}" if state.reason else ""))
        say(f"  {spec(name).description}")
        for report in state.files:
            need = report.need
            if report.found and report.problem is None:
                status = "found"
            elif report.found:
                status = "WRONG KIND"
            else:
                status = "missing" if need.required else "not present (optional)"
            say(f"  - {need.role}: {shown(need.path)}: {status}")
            if report.found and report.problem:
                say(f"      {report.problem}")
            if not report.found and need.source:
                say(f"      where to get it: {need.source}; moved with --option "
                    f"{need.option}=FILE")
    chosen = states.get(config.backend)
    ok = (chosen is not None and chosen.state == "ready" and device_problem is None and face_ok
          and not unknown)
    say()
    say(f"backend {config.backend!r} " + ("can run" if ok else "cannot run"))
    return 0 if ok else 1


async def _serve(server) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:       # Windows: Ctrl+C raises KeyboardInterrupt instead
            pass
    host, port = await server.start()
    shown = f"[{host}]" if ":" in host else host
    print(f"listening on {shown}:{port}", flush=True)
    await stop.wait()
    server.log("shutting down")
    await server.shutdown()


def main(argv=None) -> int:
    config, args = parse_args(argv)
    if args.check:
        return run_check(config)
    device_problem = check_device(config.device)
    if device_problem:
        print(f"portrait-rig-server: cannot start: {device_problem}", file=sys.stderr)
        return 1
    try:
        server = build_server(config)
    except Exception as exc:  # noqa: BLE001 - startup failures end the process with a message
        if not isinstance(exc, (ValueError, OSError)):      # unexpected: show where
            traceback.print_exc()
        print(f"portrait-rig-server: cannot start: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    server.log(f"model {server.face_data.name!r} ({server.face_data.n_vertices} vertices), "
               f"backend {config.backend} on {config.device}")
    try:
        asyncio.run(_serve(server))
    except KeyboardInterrupt:
        pass
    if not server.stopped_cleanly:
        # A render or fit is still running native code on a thread: every request was
        # answered, so end now rather than let the interpreter's exit abort under it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
