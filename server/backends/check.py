"""What each backend can do with the files and options it was given: checked at start, shown
by ``portrait-rig-server --check`` and carried in the hello (``backends[*].state``).

A backend is ``ready`` when its options parse and every file it needs exists and is of the
right kind (``server.checkpoints.identify``: the bytes and names are read, the weights are
not loaded); ``unavailable`` with a ``reason`` that says what to do otherwise. The server
adds ``loading`` while it builds a backend on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from server.backends import backend_options, spec
from server.checkpoints.identify import describe, identify
from server.paths import FileNeed, home


@dataclass
class FileReport:
    need: FileNeed
    found: bool
    kind: str | None = None
    problem: str | None = None


@dataclass
class BackendState:
    name: str
    state: str                      # "ready", "unavailable" or "loading"
    reason: str | None = None
    files: list[FileReport] = field(default_factory=list)

    def to_wire(self) -> dict:
        entry = {"state": self.state}
        if self.reason:
            entry["reason"] = self.reason
        return entry


def shown(path) -> str:
    """``path`` relative to the model folder when it lies inside it (what users see)."""
    try:
        return f"$PORTRAIT_RIG_HOME/{path.resolve().relative_to(home().resolve())}"
    except (ValueError, OSError):
        return str(path)


def check_file(need: FileNeed) -> FileReport:
    if not need.path.is_file():
        hint = f"place it there or pass --option {need.option}=FILE"
        if not need.required and need.option == "stylerig.rignet":
            hint = "optional: without it portraits follow the identity only"
        problem = f"{need.role} not found at {shown(need.path)} ({hint})"
        if need.source:
            problem += f"; where to get it: {need.source}"
        return FileReport(need, False, problem=problem)
    try:
        kind = identify(need.path)
    except OSError as exc:
        return FileReport(need, True, problem=f"{shown(need.path)}: cannot read: "
                                             f"{exc.strerror or exc}")
    if kind != need.kind:
        problem = f"{shown(need.path)} is {describe(kind)}, not {describe(need.kind)}"
        if not need.required:
            problem += f" (pass --option {need.option}=none to run without it)"
        return FileReport(need, True, kind, problem)
    return FileReport(need, True, kind)


def check_backend(name: str, given: Mapping[str, Any] | None = None) -> BackendState:
    """The state of backend ``name`` with options ``given`` (strings or values)."""
    try:
        options = backend_options(name, given)
    except ValueError as exc:
        return BackendState(name, "unavailable", str(exc))
    reports = [check_file(need) for need in spec(name).files(options)]
    # A missing optional file is fine; an optional file of the wrong kind is not.
    problems = [r.problem for r in reports if r.problem and (r.need.required or r.found)]
    return BackendState(name, "unavailable" if problems else "ready",
                        "; ".join(problems) or None, reports)
