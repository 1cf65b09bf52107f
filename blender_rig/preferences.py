"""Add-on preferences: where the render server is, how to start one, where the face model
comes from and how many shape keys a new rig gets.

Network policy: Blender's "Allow Online Access" (``bpy.app.online_access``) governs every host
that is not this machine. Loopback hosts (``localhost``, 127.0.0.0/8, ::1) are always allowed
because a local render server is not internet access.
"""

from __future__ import annotations

import atexit
import ipaddress
import shlex
import subprocess

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

from ..portrait_rig import protocol

# The extension's package (``bl_ext.<repository>.portrait_rig``): the preferences' bl_idname.
ADDON_ID = __package__.rpartition(".")[0]

# The local server started from the preferences (one per Blender session).
_server_process: subprocess.Popen | None = None


def get() -> "PortraitRigPreferences":
    return bpy.context.preferences.addons[ADDON_ID].preferences


def is_loopback(host: str) -> bool:
    """True for names that never leave this machine. No DNS lookup: this runs on the UI
    thread, and a name that needs resolving is not loopback by definition here."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def network_error(host: str) -> str | None:
    """Why ``host`` may not be contacted, or None when it may."""
    if not host.strip():
        return "Server host is empty (Preferences > Add-ons > Portrait Rig)"
    if not is_loopback(host) and not bpy.app.online_access:
        return (f"Online access is disabled, so only a server on this machine can be used "
                f"(host {host!r}); enable Preferences > System > Network > Allow Online Access")
    return None


def server_process() -> subprocess.Popen | None:
    """The local server started from the preferences while it is still running."""
    global _server_process
    if _server_process is not None and _server_process.poll() is not None:
        _server_process = None
    return _server_process


def start_server(command: str) -> subprocess.Popen:
    """Start ``command`` (a shell-style command line, run without a shell) and return at
    once; the server runs beside Blender until ``stop_server``, the add-on is disabled or
    Blender quits. Its output goes to Blender's console."""
    global _server_process
    args = shlex.split(command)
    if not args:
        raise ValueError("The local server command is empty")
    if server_process() is not None:
        raise RuntimeError(f"A local server is already running (pid {_server_process.pid})")
    _server_process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    atexit.register(stop_server)
    return _server_process


def stop_server(timeout: float = 3.0) -> None:
    """Terminate the local server this add-on started (kill it if it ignores SIGTERM)."""
    global _server_process
    process, _server_process = _server_process, None
    atexit.unregister(stop_server)
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


class PortraitRigPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    server_host: StringProperty(
        name="Host", default=protocol.DEFAULT_HOST,
        description="Render server host name or address. Hosts other than this machine need "
                    "Allow Online Access")
    server_port: IntProperty(
        name="Port", default=protocol.DEFAULT_PORT, min=1, max=65535,
        description="Render server TCP port")
    token: StringProperty(
        name="Token", subtype='PASSWORD', default="",
        description="Access token the server was started with (empty: none)")
    server_command: StringProperty(
        name="Local Server Command", default="",
        description="Command line that starts a render server on this machine, e.g. "
                    "'portrait-rig-server --model demo --backend preview'. Run without a shell")

    face_source: EnumProperty(
        name="Face Model", default='SERVER',
        items=(('SERVER', "Server", "Download the face model the render server uses", 0),
               ('FILE', "Local File", "Load a FLAME .pkl or a Portrait Rig .npz file", 1)),
        description="Where Add Portrait Rig takes the face model from")
    face_file: StringProperty(
        name="Model File", subtype='FILE_PATH', default="",
        description="FLAME model (.pkl) or Portrait Rig face data (.npz)")
    shape_key_count: IntProperty(
        name="Identity Keys", default=100, min=0, max=400,
        description="Identity shape keys to create (capped by the model's components)")
    expression_key_count: IntProperty(
        name="Expression Keys", default=50, min=0, max=400,
        description="Expression shape keys to create (capped by the model's components)")

    def server_address(self) -> tuple[str, int]:
        return self.server_host.strip(), self.server_port

    def draw(self, context):
        layout = self.layout
        box = layout.box()
        box.label(text="Render Server", icon='URL')
        row = box.row(align=True)
        row.prop(self, "server_host")
        row.prop(self, "server_port")
        box.prop(self, "token")
        if (error := network_error(self.server_host)) is not None:
            box.label(text=error, icon='ERROR')
        box.prop(self, "server_command")
        row = box.row(align=True)
        running = server_process()
        row.operator("portrait_rig.start_server", icon='PLAY')
        row.operator("portrait_rig.stop_server", icon='CANCEL')
        if running is not None:
            box.label(text=f"Local server running (pid {running.pid})", icon='CHECKMARK')

        box = layout.box()
        box.label(text="Face Model", icon='USER')
        box.row().prop(self, "face_source", expand=True)
        if self.face_source == 'FILE':
            box.prop(self, "face_file")
        row = box.row(align=True)
        row.prop(self, "shape_key_count")
        row.prop(self, "expression_key_count")


def register():
    bpy.utils.register_class(PortraitRigPreferences)


def unregister():
    stop_server()
    bpy.utils.unregister_class(PortraitRigPreferences)
