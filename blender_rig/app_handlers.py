"""The add-on's callbacks in ``bpy.app.handlers``: added once, removed wherever they are."""

from __future__ import annotations


def add(pairs) -> None:
    """Append each ``(handler list, function)`` pair's function unless the list has it."""
    for handlers, function in pairs:
        if function not in handlers:
            handlers.append(function)


def remove(pairs) -> None:
    """Remove every occurrence of each pair's function from its handler list."""
    for handlers, function in pairs:
        while function in handlers:
            handlers.remove(function)
