"""Load the Portrait Rig extension into ``bpy`` exactly as Blender loads it (for the
``portrait-rig`` command, tests and benchmarks).

Blender imports an extension from a repository directory as the package
``bl_ext.<repository module>.<extension id>`` and enables it with ``addon_utils.enable`` (what
the checkbox in Preferences calls). ``enable`` does the same: it puts the extension into a
repository directory, registers that directory as a user repository and enables the
extension, so relative imports (``blender_rig`` imports ``..portrait_rig``), the preferences'
``bl_idname`` and ``register`` / ``unregister`` run as they do in Blender.

Where the extension comes from: the directory holding the ``blender_rig`` and ``portrait_rig``
packages. In a source checkout or an editable install that is the repository root, which is
the extension root (entry ``__init__.py`` and ``blender_manifest.toml``) and is linked as is.
A regular install puts the two packages into site-packages without the root entry module;
the extension is then assembled from links to them and an entry module that delegates to
``blender_rig``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

EXTENSION_ID = "portrait_rig"
PACKAGES = ("blender_rig", "portrait_rig")
ENTRY_MODULE = '''"""Portrait Rig (assembled from the installed packages)."""

from .blender_rig import register, unregister  # noqa: F401
'''


def source_root() -> Path:
    """The directory that holds the ``blender_rig`` and ``portrait_rig`` packages."""
    roots = set()
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)   # locates without importing (no bpy needed)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"the {package!r} package is not installed (pip install "
                              "portrait-rig, or run from the repository root)")
        roots.add(Path(next(iter(spec.submodule_search_locations))).resolve().parent)
    if len(roots) != 1:
        raise ImportError(f"blender_rig and portrait_rig are installed in different places: "
                          f"{sorted(map(str, roots))}")
    return roots.pop()


def _link(source: Path, target: Path) -> None:
    try:
        os.symlink(source, target, target_is_directory=source.is_dir())
    except OSError:                                 # no symlinks (e.g. Windows without rights)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)


def stage(directory: Path) -> Path:
    """Put the extension into the repository directory ``directory`` as ``EXTENSION_ID``
    (see the module notes); returns the extension's directory."""
    root = source_root()
    target = Path(directory) / EXTENSION_ID
    if target.exists() or target.is_symlink():
        return target
    if (root / "__init__.py").is_file() and (root / "blender_manifest.toml").is_file():
        _link(root, target)
    else:
        target.mkdir(parents=True)
        for package in PACKAGES:
            _link(root / package, target / package)
        (target / "__init__.py").write_text(ENTRY_MODULE)
    return target


def package_name(repository_module: str) -> str:
    """The extension's import name in a repository with module name ``repository_module``."""
    return f"bl_ext.{repository_module}.{EXTENSION_ID}"


def add_repository(directory: Path, repository_module: str, name: str = "Portrait Rig"):
    """Register ``directory`` as a user extension repository (idempotent)."""
    import bpy
    repos = bpy.context.preferences.extensions.repos
    for repo in repos:
        if repo.module == repository_module:
            return repo
    return repos.new(name=name, module=repository_module, custom_directory=str(directory),
                     source='USER')


def remove_repository(repository_module: str) -> None:
    import bpy
    repos = bpy.context.preferences.extensions.repos
    for repo in list(repos):
        if repo.module == repository_module:
            repos.remove(repo)


def _raise(exc: BaseException) -> None:
    raise exc


def enable(directory: Path, repository_module: str):
    """Stage the extension in ``directory``, register the repository and enable the
    extension; returns its package (``bl_ext.<repository_module>.portrait_rig``)."""
    import addon_utils
    stage(directory)
    add_repository(directory, repository_module)
    name = package_name(repository_module)
    package = addon_utils.enable(name, default_set=True, handle_error=_raise)
    if package is None:
        raise RuntimeError(f"Blender could not enable {name}")
    return package


def disable(repository_module: str) -> None:
    import addon_utils
    addon_utils.disable(package_name(repository_module), default_set=True,
                        handle_error=_raise)


def exit_status(code: int) -> int:
    """``code``, for a process that imported ``bpy`` to exit with once it is done with
    Blender. Blender 4.2 as a module frees its editor types in C++ exit-time destructors,
    after Python has finalised; once an add-on has registered a property with a Python
    callback (ours do, and disabling them does not release all of them there) that crashes
    with SIGSEGV and the status is lost. There this ends the process at once, after flushing
    the output and removing Blender's temporary folder; 4.5 and 5.0 shut down cleanly and
    get ``code`` back."""
    bpy = sys.modules.get("bpy")
    if bpy is None or bpy.app.version >= (4, 5, 0):
        return code
    tempdir = bpy.app.tempdir
    sys.stdout.flush()
    sys.stderr.flush()
    if tempdir:
        shutil.rmtree(tempdir, ignore_errors=True)
    os._exit(code)


def blender_extension_tool() -> tuple[Path, Path]:
    """Blender's own extension command-line tool (what ``blender --command extension`` runs)
    and its list of valid tags, from the ``bpy`` module's scripts."""
    import bpy
    scripts = Path(bpy.utils.system_resource('SCRIPTS'))
    return (scripts / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py",
            scripts / "modules" / "_bpy_internal" / "extensions" / "tags.py")


def build(output_dir: Path, source: Path | None = None) -> Path:
    """Validate the manifest and build the extension zip into ``output_dir`` with Blender's
    tool (the zip holds what ``[build]`` keeps: the entry point, ``blender_rig`` and
    ``portrait_rig``). Returns the zip's path; raises RuntimeError with the tool's output."""
    source = Path(source or source_root())
    tool, tags = blender_extension_tool()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for command in (["validate", str(source)],
                    ["build", "--source-dir", str(source), "--output-dir", str(output_dir)]):
        run = subprocess.run([sys.executable, str(tool), *command, "--valid-tags", str(tags)],
                             capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise RuntimeError(f"extension {command[0]} failed:\n{run.stdout}{run.stderr}")
    version = _manifest(source)["version"]
    return output_dir / f"{EXTENSION_ID}-{version}.zip"


def _manifest(source: Path) -> dict:
    import tomllib
    with open(source / "blender_manifest.toml", "rb") as fh:
        return tomllib.load(fh)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m portrait_rig_cli.extension",
                                 description="Build the Portrait Rig extension zip that users "
                                             "drag onto Blender (4.2 or newer)")
    ap.add_argument("--out", default="dist", help="output folder (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        path = build(Path(args.out))
    except (RuntimeError, OSError) as exc:
        print(exc, file=sys.stderr)
        return exit_status(1)
    print(path)
    return exit_status(0)


if __name__ == "__main__":
    sys.exit(main())
