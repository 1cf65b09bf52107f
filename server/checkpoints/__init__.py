"""File formats only: NVIDIA network pickles (restricted unpickler, no embedded source run),
StyleGAN files (``stylegan.load_generator``: NVIDIA, rosinality, our safetensors), DiffusionRig
checkpoints, DECA's model, our RigNet/DFR files; ``torch_file`` reads any torch file safely
and ``identify`` tells what a file is."""

from server.checkpoints.nvidia_pickle import UnsafePickleError, load_network_pickle
from server.checkpoints.stylegan import detect_format, load_generator, save_generator

__all__ = ["UnsafePickleError", "detect_format", "load_generator", "load_network_pickle",
           "save_generator"]
