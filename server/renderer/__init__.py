"""Buffer renderer: posed meshes -> per-pixel mask, depth, normal, albedo, SH shading, rendered.

Split like nvdiffrast: ``cameras`` projects model-frame vertices to the screen; a visibility
kernel finds the nearest triangle per pixel (``raster_cpu``: numba on the CPU; ``raster_torch``:
torch on any device); ``buffers`` recomputes barycentrics in torch and interpolates and shades,
differentiably. ``BufferRenderer`` ties them together. Kernels load lazily: importing this
package does not compile anything.
"""

from server.renderer.buffers import Buffers, BufferRenderer, sh_basis, vertex_normals
from server.renderer.cameras import CameraBatch, project, screen_space

__all__ = ["Buffers", "BufferRenderer", "CameraBatch", "project", "screen_space", "sh_basis",
           "vertex_normals"]
