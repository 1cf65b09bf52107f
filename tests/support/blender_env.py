"""Headless Blender for tests: the ``bpy`` module, factory settings per test, and the
Portrait Rig extension loaded the way Blender loads it.

Blender imports an extension from a repository directory as the package
``bl_ext.<repository module>.<extension id>`` and enables it with ``addon_utils.enable`` (what
the checkbox in Preferences calls). The ``extension`` fixture does the same through the loader
the ``portrait-rig`` command uses (``portrait_rig_cli.extension``): a repository in a
temporary directory whose only entry, ``portrait_rig``, links to the repository root (the
extension root), registered in the preferences and enabled. So relative imports, the
preferences' ``bl_idname`` and ``register`` / ``unregister`` run exactly as in Blender.

Use from a test module::

    from tests.support.blender_env import bpy, blender, extension  # noqa: F401 (fixtures)

    def test_something(extension):
        live_link = extension.module("blender_rig.live_link")

Timers and modal operators need Blender's event loop, which the module does not run: tests call
the timer functions themselves (see ``pump``). ``render_server`` is the real render server
(``tests/support/server_process.py``) on an ephemeral port, one per test session.

Blender 4.2 as a module crashes after Python has finalised once an add-on registered
callbacks (``portrait_rig_cli.extension.exit_status``): there the test process ends with
pytest's own status after pytest has cleaned up.
"""

from __future__ import annotations

import atexit
import importlib
import time
from pathlib import Path

import pytest

bpy = pytest.importorskip("bpy")

from portrait_rig_cli import extension as loader  # noqa: E402  (needs bpy to enable)

REPO_ROOT = Path(__file__).resolve().parents[2]
REPOSITORY_MODULE = "portrait_rig_tests"
EXTENSION_ID = loader.EXTENSION_ID
PACKAGE = loader.package_name(REPOSITORY_MODULE)


def factory_reset() -> None:
    """Factory startup file and preferences, no objects. Also disables every add-on."""
    bpy.ops.wm.read_factory_settings(use_empty=True)


class Extension:
    """The enabled extension: its package and handy access to its modules."""

    def __init__(self, package):
        self.package = package
        self.name = package.__name__

    def module(self, dotted: str):
        """``module("blender_rig.live_link")`` -> the extension's copy of that module."""
        return importlib.import_module(f"{self.name}.{dotted}")

    @property
    def preferences(self):
        return bpy.context.preferences.addons[self.name].preferences


def add_repository(directory: Path):
    """Register ``directory`` as a user extension repository (module REPOSITORY_MODULE)."""
    return loader.add_repository(directory, REPOSITORY_MODULE, "Portrait Rig tests")


def remove_repository() -> None:
    loader.remove_repository(REPOSITORY_MODULE)


def enable_extension(directory: Path) -> Extension:
    return Extension(loader.enable(directory, REPOSITORY_MODULE))


def disable_extension() -> None:
    loader.disable(REPOSITORY_MODULE)


class RecordingLayout:
    """Stands in for ``UILayout`` where no UI runs: every ``prop`` must name an RNA property
    of its data, every ``operator`` a registered operator and every icon a real one (Blender
    raises on these only while drawing), and the texts shown are recorded in ``texts``."""

    _ICONS = set(bpy.types.UILayout.bl_rna.functions["label"].parameters["icon"]
                 .enum_items.keys())

    def __init__(self, texts: list):
        object.__setattr__(self, "texts", texts)

    def __getattr__(self, name):              # row, column, box, split, grid_flow, ...
        return lambda *args, **kwargs: RecordingLayout(self.texts)

    def __setattr__(self, name, value):       # use_property_split, enabled, active, ...
        if name not in bpy.types.UILayout.bl_rna.properties:
            raise AttributeError(f"UILayout has no property {name!r}")

    def _icon(self, icon: str) -> None:
        if icon not in self._ICONS:
            raise ValueError(f"unknown icon {icon!r}")

    def label(self, *, text: str = "", icon: str = 'NONE', **_):
        self._icon(icon)
        self.texts.append(text)

    def prop(self, data, name: str, *, text: str | None = None, icon: str = 'NONE', **_):
        self._icon(icon)
        if name not in data.bl_rna.properties:
            raise AttributeError(f"{data.bl_rna.identifier} has no property {name!r}")
        self.texts.append(text if text is not None else data.bl_rna.properties[name].name)

    def operator(self, idname: str, *, text: str | None = None, icon: str = 'NONE', **_):
        self._icon(icon)
        module, _, name = idname.partition(".")
        op = getattr(getattr(bpy.ops, module), name)
        rna = op.get_rna_type()                   # raises for an unregistered operator
        self.texts.append(text if text is not None else rna.name)
        return _OperatorProperties(rna)


class _OperatorProperties:
    """What ``layout.operator`` returns: only the operator's own properties can be set."""

    def __init__(self, rna):
        object.__setattr__(self, "_rna", rna)

    def __setattr__(self, name, value):
        if name not in self._rna.properties:
            raise AttributeError(f"{self._rna.identifier} has no property {name!r}")


def draw(cls, context=None, data=None) -> list[str]:
    """Run ``cls.draw`` (a Panel, Menu or AddonPreferences class) against a
    ``RecordingLayout``; ``data`` is the instance for AddonPreferences. Returns the texts
    the layout would show. Panels whose ``poll`` fails are not drawn (returns None)."""
    context = context or bpy.context
    if hasattr(cls, "poll") and not cls.poll(context):
        return None
    texts: list[str] = []

    class Instance:
        layout = RecordingLayout(texts)

        def __getattr__(self, name):
            return getattr(data, name)

    instance = Instance()
    if hasattr(cls, "draw_header"):
        cls.draw_header(instance, context)
    cls.draw(instance, context)
    return texts


def pump(function, done, timeout: float = 10.0, interval: float = 0.005):
    """Call a timer ``function`` until ``done()`` is true, as Blender's event loop would;
    fails after ``timeout`` seconds. Returns what ``done()`` returned."""
    deadline = time.monotonic() + timeout
    while True:
        function()
        if result := done():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{getattr(function, '__name__', function)} did not reach the "
                                 f"expected state within {timeout:g} s")
        time.sleep(interval)


_shared_server = None


@pytest.fixture
def render_server(request):
    """A running render server (demo head, preview backend) shared by the whole session;
    it has ``host``, ``port`` and ``log()``. Tests that stop a server start their own."""
    global _shared_server
    if _shared_server is None or _shared_server.proc.poll() is not None:
        from tests.support.server_process import ServerProcess
        server = ServerProcess("--model", "demo", "--backend", "preview")
        server.__enter__()
        request.config.add_cleanup(lambda: server.__exit__(None, None, None))
        _shared_server = server
    return _shared_server


@pytest.fixture(scope="session")
def extension_repository(tmp_path_factory) -> Path:
    """A repository directory holding the extension (a link to the repository root)."""
    directory = tmp_path_factory.mktemp("extensions")
    loader.stage(directory)
    return directory


class _ExitStatus:
    """A pytest plugin that keeps the session's exit status for ``_exit``."""
    status: int | None = None

    def pytest_sessionfinish(self, session, exitstatus):
        self.status = int(exitstatus)


_EXIT_STATUS = _ExitStatus()


@atexit.register
def _exit() -> None:
    if _EXIT_STATUS.status is not None:
        loader.exit_status(_EXIT_STATUS.status)


@pytest.fixture
def blender(request):
    """``bpy`` with factory settings and an empty scene; reset again afterwards."""
    if not request.config.pluginmanager.is_registered(_EXIT_STATUS):
        request.config.pluginmanager.register(_EXIT_STATUS, "portrait-rig-exit-status")
    factory_reset()
    yield bpy
    factory_reset()


@pytest.fixture
def extension(blender, extension_repository):
    """The extension enabled in a factory-fresh Blender; disabled afterwards."""
    ext = enable_extension(extension_repository)
    try:
        yield ext
    finally:
        if ext.name in bpy.context.preferences.addons:
            disable_extension()
        # The repository goes with the factory reset of the ``blender`` fixture.
