"""Read NVIDIA network pickles (stylegan2-ada-pytorch, stylegan3) without their source code.

A snapshot ``.pkl`` is ``pickle.dump(dict(G=..., D=..., G_ema=..., ...))``. Every network
object is reduced by ``torch_utils.persistence`` to ``_reconstruct_persistent_obj(meta)``
with meta = {type: 'class', version, module_src, class_name, state}; unpickling it the
normal way ``exec``s ``module_src`` and imports the repository's packages. Here the
unpickler resolves only an allow-list of globals:

- ``_reconstruct_persistent_obj`` -> ``PersistentObject`` records (class name + state;
  module_src is dropped unread), ``dnnlib.util.EasyDict`` -> dict;
- tensor and parameter rebuild functions, whose storages are decoded by
  ``torch.load(weights_only=True)`` instead of ``torch.storage._load_from_bytes``;
- plain containers (OrderedDict, set, frozenset) and NumPy arrays / scalars (the modules
  keep NumPy scalars such as filter cutoffs as attributes).

Anything else, e.g. ``os.system`` or ``builtins.exec``, raises ``UnsafePickleError`` naming
the callable before anything is called.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from os import PathLike
from typing import BinaryIO

import numpy as np
import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list."""


class PersistentObject:
    """A ``torch_utils.persistence`` object: ``class_name`` (e.g. 'Generator'), ``version`` and
    ``state`` (the module's ``__dict__``: '_parameters', '_buffers', '_modules', init
    arguments in '_init_kwargs', and plain attributes)."""

    __slots__ = ("class_name", "version", "state")

    def __init__(self, class_name: str, version, state: dict):
        self.class_name, self.version, self.state = class_name, version, state

    def __repr__(self):
        return f"PersistentObject({self.class_name!r})"

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs") or {})


def _reconstruct_persistent_obj(meta):
    state = meta.get("state") if isinstance(meta, dict) else None
    if not isinstance(state, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("malformed persistent object record (expected a meta dict "
                                     "with type 'class' and a state dict)")
    return PersistentObject(str(meta.get("class_name")), meta.get("version"), state)


def _load_storage(data: bytes):
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("tensor storage record is not bytes")
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"tensor storage record refused by torch.load(weights_only=True): "
                                f"{e}") from None
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"tensor storage record decoded to {type(storage).__name__}, "
                                     "not a storage")
    return storage


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    if not isinstance(storage, torch.TypedStorage) or backward_hooks or metadata:
        raise pickle.UnpicklingError("unexpected tensor record (storage type, hooks or metadata)")
    return torch._utils._rebuild_tensor_v2(storage, int(offset), tuple(size), tuple(stride), False,
                                           OrderedDict())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter record does not hold a tensor")
    return data


# NumPy pickles arrays and scalars through these (module renamed numpy._core in NumPy 2).
_NUMPY = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _NUMPY[(_mod, "_reconstruct")] = np.ndarray.__reduce__(np.zeros(0))[0]
    _NUMPY[(_mod, "scalar")] = np.float64(0).__reduce__()[0]

ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **_NUMPY,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` resolving only ``ALLOWED_GLOBALS`` (see module docstring)."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}': a network pickle may only reference "
                "tensors, storages, plain containers, NumPy arrays and torch_utils "
                "persistent-object records") from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r}: not used by network pickles")


def load_network_pickle(source: str | PathLike | BinaryIO) -> dict:
    """Unpickle a network snapshot safely. Returns its top-level dict; networks appear as
    ``PersistentObject`` records, tensors as CPU tensors."""
    if hasattr(source, "read"):
        data = RestrictedUnpickler(source).load()
    else:
        with open(source, "rb") as f:
            data = RestrictedUnpickler(f).load()
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a network pickle holding a dict, "
                         f"got {type(data).__name__}")
    return data


def module_state_dict(obj: PersistentObject, prefix: str = "") -> OrderedDict[str, torch.Tensor]:
    """Flatten a persistent module record into ``{name: tensor}`` exactly as
    ``torch.nn.Module.state_dict()`` names them: parameters, persistent buffers, then
    submodules recursively ('a.b.weight'). None entries are skipped, as torch does."""
    if not isinstance(obj, PersistentObject):
        raise TypeError(f"{prefix or 'network'}: expected a persistent module record, "
                        f"got {type(obj).__name__}")
    state = obj.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    out = OrderedDict()
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{prefix}{name}: expected a tensor, got {type(tensor).__name__}")
            out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


def submodule(obj: PersistentObject, path: str) -> PersistentObject:
    """The record of submodule ``path`` ('synthesis.b4'), or KeyError naming the missing part."""
    for part in path.split(".") if path else ():
        children = obj.state.get("_modules") or {}
        if not isinstance(children.get(part), PersistentObject):
            raise KeyError(f"{obj.class_name} has no submodule {part!r} (looking for {path!r})")
        obj = children[part]
    return obj
