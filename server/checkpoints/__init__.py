"""Checkpoint readers: NVIDIA network pickles (restricted unpickler, no embedded source run),
rosinality torch checkpoints and our safetensors export. Start at ``stylegan.load_generator``."""

from server.checkpoints.nvidia_pickle import UnsafePickleError, load_network_pickle
from server.checkpoints.stylegan import detect_format, load_generator, save_generator

__all__ = ["UnsafePickleError", "detect_format", "load_generator", "load_network_pickle",
           "save_generator"]
