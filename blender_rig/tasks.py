"""Long operations without freezing Blender: one mechanism for every operator that talks to
the server or builds a lot (Add Portrait Rig, Fit Rig to Photo, and whatever comes next).

A task is a generator function run on the main thread in slices. It yields

* ``Progress(fraction, text)``: a slice ended here; Blender may redraw and handle events;
* ``Wait(function, *args)``: run ``function(*args)`` on a worker thread (it must not touch
  bpy: sockets, files, numpy) and resume the generator with its result, or raise its
  exception inside the generator. A cancelled task stops waiting at once; the worker ends
  on its own (its socket timeouts bound it) and its result is dropped;

and finally returns its result. bpy data held across a ``Wait`` may be gone when the task
resumes (the user kept working): look it up again by name after a wait.

``TaskOperator`` runs a task from an operator: ``invoke`` (buttons, menus, the file browser)
starts it modal - a window-manager timer steps it, the status bar shows its progress and Esc
(or the panel's Cancel) cancels it - while ``execute`` (scripts, ``blender -b``, the bpy
module, where no event loop runs) runs it to the end at once. ``Runner`` is the part without
the operator: tests and benchmarks drive it the way the timer does and read ``slices_ms``,
the main-thread time of every step.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

import bpy

TIMER_S = 0.02              # how often a running task is stepped
SLICE_S = 0.01              # a step starts no further slice once this much time has passed


@dataclass
class Progress:
    fraction: float
    text: str = ""


class Wait:
    """Run ``function(*args)`` on a worker thread; ``text`` says what is awaited."""

    def __init__(self, function: Callable, *args, text: str = ""):
        self.function, self.args, self.text = function, args, text


class Cancelled(Exception):
    """The task was cancelled (Esc or Cancel)."""


@dataclass
class _Pending:
    wait: Wait
    thread: threading.Thread
    outcome: list = field(default_factory=list)      # [result] or [None, exception]


class Runner:
    """Steps one task generator (see the module notes). ``step()`` returns True once the task
    is over; then ``result`` or ``error`` holds its outcome."""

    def __init__(self, generator: Generator, label: str):
        self.generator = generator
        self.label = label
        self.fraction, self.text = 0.0, "starting"
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.slices_ms: list[float] = []
        self._pending: _Pending | None = None
        self._send: tuple = (None, None)          # (value, exception) for the next resume
        self.started = time.perf_counter()

    @property
    def waiting(self) -> bool:
        """A worker thread is busy; nothing of the task runs on the main thread."""
        return self._pending is not None

    def status(self) -> str:
        seconds = time.perf_counter() - self.started
        return f"{self.label}: {self.text} ({self.fraction:.0%}, {seconds:.0f} s)"

    def step(self, budget_s: float = SLICE_S) -> bool:
        """Run the task on this (main) thread for about ``budget_s`` seconds at most, or
        until it waits for a worker. Returns ``done``."""
        start = time.perf_counter()
        try:
            while not self.done:
                if self._pending is not None:
                    if self._pending.thread.is_alive():
                        break
                    outcome, self._pending = self._pending.outcome, None
                    self._send = (outcome[0], outcome[1] if len(outcome) > 1 else None)
                self._resume()
                if self._pending is not None or time.perf_counter() - start > budget_s:
                    break
        finally:
            self.slices_ms.append((time.perf_counter() - start) * 1e3)
        return self.done

    def _resume(self) -> None:
        value, exception = self._send
        self._send = (None, None)
        try:
            item = (self.generator.throw(exception) if exception is not None
                    else self.generator.send(value))
        except StopIteration as stop:
            self.result, self.done = stop.value, True
            return
        except BaseException as exc:                 # noqa: BLE001 - the task's failure
            self.error, self.done = exc, True
            return
        if isinstance(item, Progress):
            self.fraction, self.text = item.fraction, item.text or self.text
        elif isinstance(item, Wait):
            self.text = item.text or self.text
            self._start(item)
        elif isinstance(item, tuple):               # (fraction, text), as rig_builder yields
            self.fraction, self.text = item[0], item[1] or self.text

    def _start(self, wait: Wait) -> None:
        pending = _Pending(wait, None)

        def work():
            try:
                pending.outcome[:] = [wait.function(*wait.args)]
            except BaseException as exc:            # noqa: BLE001 - handed to the task
                pending.outcome[:] = [None, exc]
        pending.thread = threading.Thread(target=work, name=f"Portrait Rig: {self.label}",
                                          daemon=True)
        self._pending = pending
        pending.thread.start()

    def cancel(self) -> None:
        """Stop the task: the generator is closed (its cleanup runs), a worker's result will
        be dropped, and ``error`` becomes ``Cancelled``."""
        if self.done:
            return
        self._pending = None
        self.generator.close()
        self.error, self.done = Cancelled(f"{self.label} cancelled"), True

    def run(self) -> Any:
        """Run to the end on this thread, waits included (no event loop needed). Returns the
        result or raises the task's exception."""
        while not self.step(budget_s=float("inf")):
            self._pending.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


# ------------------------------------------------------------------------------- operators

_running: list["TaskOperator"] = []


def running() -> list[Runner]:
    """The tasks running modal now (for the panel)."""
    return [op._runner for op in _running if op._runner is not None]


def cancel_all() -> None:
    for op in _running:
        op._cancel_requested = True


class TaskOperator:
    """Mixin for an operator whose work is ``task(context)`` (a generator, module notes);
    ``finish(context, result)`` reports the result and returns the operator's status. Failures
    of the types in ``errors`` are reported as errors, anything else propagates."""

    errors: tuple = (OSError, ValueError)
    _runner: Runner | None = None
    _timer = None
    _cancel_requested = False

    def task(self, context) -> Generator:
        raise NotImplementedError

    def finish(self, context, result) -> set:
        return {'FINISHED'}

    def execute(self, context):
        try:
            result = Runner(self.task(context), self.bl_label).run()
        except self.errors as exc:
            self.report({'ERROR'}, f"{self.bl_label}: {exc}")
            return {'CANCELLED'}
        return self.finish(context, result)

    def start_modal(self, context):
        """Run the task modal (from ``invoke``): returns {'RUNNING_MODAL'}."""
        if bpy.app.background or context.window is None:
            return self.execute(context)
        self._runner = Runner(self.task(context), self.bl_label)
        self._cancel_requested = False
        wm = context.window_manager
        self._timer = wm.event_timer_add(TIMER_S, window=context.window)
        wm.modal_handler_add(self)
        _running.append(self)
        self._show(context)
        return {'RUNNING_MODAL'}

    def modal(self, context, event):
        runner = self._runner
        if event.type == 'ESC' or self._cancel_requested:
            runner.cancel()
            return self._end(context)
        if event.type != 'TIMER':          # (any timer's event: an extra step is harmless)
            # While a worker waits the user keeps working; while the task edits data on
            # this thread, input waits for it (so nothing the task holds is undone).
            return {'PASS_THROUGH'} if runner.waiting else {'RUNNING_MODAL'}
        if runner.step():
            return self._end(context)
        self._show(context)
        return {'RUNNING_MODAL'}

    def cancel(self, context):                       # Blender ends the operator (file closed)
        if self._runner is not None:
            self._runner.cancel()
        self._cleanup(context)

    def _show(self, context) -> None:
        if context.workspace is not None:
            context.workspace.status_text_set(f"{self._runner.status()}  (Esc: cancel)")
        for area in context.screen.areas if context.screen else ():
            if area.type == 'VIEW_3D':
                area.tag_redraw()

    def _cleanup(self, context) -> None:
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None
        if self in _running:
            _running.remove(self)
        if context.workspace is not None:
            context.workspace.status_text_set(None)

    def _end(self, context):
        runner = self._runner
        self._cleanup(context)
        if isinstance(runner.error, Cancelled):
            self.report({'WARNING'}, str(runner.error))
            return {'CANCELLED'}
        if runner.error is not None:
            if not isinstance(runner.error, self.errors):
                raise runner.error
            self.report({'ERROR'}, f"{self.bl_label}: {runner.error}")
            return {'CANCELLED'}
        return self.finish(context, runner.result)
