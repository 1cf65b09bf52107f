"""Modules that exist only while a fixture is pickled, so the pickle names the globals an
official file names (chumpy's and scipy's classes, NVIDIA's ``torch_utils`` and ``dnnlib``)."""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator


@contextlib.contextmanager
def stand_in_modules(modules: dict[str, dict]) -> Iterator[dict[str, types.ModuleType]]:
    """A new module per name in ``modules`` holding the given attributes, in ``sys.modules``
    for the duration; a module of that name that already exists comes back afterwards."""
    saved = {name: sys.modules.get(name) for name in modules}
    try:
        for name, attributes in modules.items():
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            sys.modules[name] = module
        yield {name: sys.modules[name] for name in modules}
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
