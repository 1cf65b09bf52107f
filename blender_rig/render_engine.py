"""The "Portrait Rig" render engine: F12, Ctrl+F12 and ``blender -b scene.blend -a`` render the
scene's rig on the render server.

Each frame is one server frame at the scene's resolution and percentage (``sequence`` sends
the requests, ahead of time in animations). The engine's ``render()`` either writes that frame
or reports an error, which makes Blender discard the frame and stop: a dead or failing
server, a timeout or Esc never leave a black or half-written file behind.

Passes. Combined is the server's frame. View Layer Properties > Portrait Rig Passes adds
Normal (world-space unit normals), Albedo and Shading (linear) and Mask (face coverage),
registered for the compositor (``update_render_passes``) and written into the render result.

Colour. The server sends display-referred sRGB; Combined is scene-linear, so each pixel is
decoded with the exact sRGB transfer function (and mapped from linear Rec.709 into the
blend file's working space when that is not Rec.709). Under the Standard view transform the
render window and the written 8-bit files then show the server's values again; other view
transforms (Blender's default is AgX) restyle them, which the engine warns about once per
render. A transparent film gets alpha = face coverage, colours premultiplied.
"""

from __future__ import annotations

import time
import traceback

import bpy
import numpy as np
from bpy.props import BoolProperty, FloatProperty, IntProperty, PointerProperty

from . import image_output, preferences, sequence
from .transforms import as_matrix, rotation_part

ENGINE_ID = sequence.ENGINE_ID


# ----------------------------------------------------------------------------- pixels

def working_space_matrix() -> np.ndarray | None:
    """[3, 3] from linear Rec.709 to the scene-linear working space, None when they agree."""
    from mathutils import Color
    columns = [tuple(Color(axis).from_rec709_linear_to_scene_linear())
               for axis in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))]
    matrix = np.array(columns, dtype=np.float64).T
    return None if np.allclose(matrix, np.eye(3), atol=1e-6) else matrix


def combined_pixels(frame, to_working_space: np.ndarray | None = None) -> np.ndarray:
    """A server frame (rgb8 / rgba8 sRGB, rows top to bottom) as Combined: scene-linear
    float32 RGBA [H, W, 4], rows bottom to top, premultiplied by the alpha (1 for rgb8)."""
    channels = 4 if frame.format == "rgba8" else 3
    src = np.frombuffer(frame.pixels, dtype=np.uint8)
    if src.size != frame.width * frame.height * channels:
        raise sequence.RenderFailure(f"the server sent {src.size} bytes for a "
                                     f"{frame.width}x{frame.height} {frame.format} frame")
    src = src.reshape(frame.height, frame.width, channels)[::-1]
    # Decode interleaved RGBA codes in one contiguous table lookup (several times faster
    # than writing the lookup into a strided view); code 255 decodes to exactly 1.0.
    codes = np.empty((frame.height, frame.width, 4), dtype=np.uint8)
    codes[..., :3] = src[..., :3]
    codes[..., 3] = 255
    rgba = np.take(image_output.SRGB_TO_LINEAR_LUT, codes.reshape(-1), mode="clip")
    rgba = rgba.reshape(frame.height, frame.width, 4)
    if to_working_space is not None:
        rgba[..., :3] = rgba[..., :3] @ to_working_space.T.astype(np.float32)
    if channels == 4:                              # alpha is linear coverage, not sRGB
        np.multiply(src[..., 3], np.float32(1.0 / 255.0), out=rgba[..., 3])
        rgba[..., :3] *= rgba[..., 3:]
    return rgba


def pass_pixels(frame, info: sequence.PassInfo, camera_rotation: np.ndarray) -> np.ndarray:
    """A pass of a server frame as Blender wants it: float32 [H, W, C], rows bottom to top.
    The server's normals are in its camera frame (OpenGL axes, like a Blender camera's
    local frame); ``camera_rotation`` [3, 3] turns them into world space, as Cycles' Normal."""
    channels, floats = frame.passes[info.wire]
    data = np.frombuffer(floats, dtype=np.float32).reshape(frame.height, frame.width,
                                                           channels)[::-1]
    if info.wire == "normal":
        data = data @ camera_rotation.T.astype(np.float32)
    return data


def colour_management_issues(scene) -> list[str]:
    """Scene colour settings under which a frame does not look as the server drew it."""
    view, issues = scene.view_settings, []
    if view.view_transform != 'Standard':
        issues.append(f"view transform '{view.view_transform}'")
    if view.look not in ('None', ''):
        issues.append(f"look '{view.look}'")
    if view.exposure != 0.0 or view.gamma != 1.0:
        issues.append("exposure / gamma")
    if view.use_curve_mapping or getattr(view, "use_white_balance", False):
        issues.append("curves / white balance")
    if scene.display_settings.display_device != 'sRGB':
        issues.append(f"display '{scene.display_settings.display_device}'")
    return issues


# ----------------------------------------------------------------------------- engine

class PortraitRigRenderEngine(bpy.types.RenderEngine):
    """Renders the scene's Portrait Rig on the render server (see the module notes)."""
    bl_idname = ENGINE_ID
    bl_label = "Portrait Rig"
    bl_use_preview = False             # material previews would need a server round trip each
    bl_use_postprocess = True          # compositor and sequencer run on our passes
    bl_use_eevee_viewport = True       # Rendered viewport shading: EEVEE (the live link shows
                                       # the server's view in the "Portrait Rig" image)

    def update_render_passes(self, scene=None, renderlayer=None):
        self.register_pass(scene, renderlayer, "Combined", 4, "RGBA", 'COLOR')
        for info in sequence.enabled_passes(renderlayer):
            self.register_pass(scene, renderlayer, info.name, info.channels, info.chan_id,
                               info.kind)

    def render(self, depsgraph):
        scene = depsgraph.scene
        frame = scene.frame_current
        job = sequence.job_for(scene)
        try:
            self._check_supported(scene)
            self._warn_once(job, scene)
            start = time.perf_counter()
            spec = sequence.read_spec(scene, depsgraph, depsgraph.view_layer)
            start = job.timed("read", start)
            self.update_stats("", f"Portrait Rig | frame {frame}: waiting for the server")
            reply = job.render(scene, spec, self.should_stop)
            start = job.timed("wait", start)
            self._write(reply, depsgraph)
            job.timed("write", start)
            self.update_progress(1.0)
            self.update_stats("", f"Portrait Rig | frame {frame}: server "
                                  f"{reply.timings.get('total', 0.0):.0f} ms")
        except sequence.UserCancelled:
            job.cancelled = True
            job.close()
            self.report({'ERROR'}, f"Portrait Rig: render cancelled at frame {frame}")
        except sequence.RenderFailure as exc:
            self._fail(job, f"frame {frame}: {exc}")
        except Exception as exc:  # noqa: BLE001 - an unwritten frame must be an error
            traceback.print_exc()
            self._fail(job, f"frame {frame} failed: {type(exc).__name__}: {exc}")

    def should_stop(self) -> bool:
        """The engine's break check while it waits for the server: Esc (``test_break``)."""
        return self.test_break()

    def _fail(self, job, message: str) -> None:
        job.failure = job.failure or message
        job.close()
        self.report({'ERROR'}, f"Portrait Rig: {message}")

    def _check_supported(self, scene) -> None:
        render = scene.render
        if render.use_border:
            raise sequence.RenderFailure("Render Region is not supported: the server renders "
                                         "whole frames (Output > Format > Render Region)")
        if render.use_multiview:
            raise sequence.RenderFailure("Stereoscopy / multi-view is not supported")

    def _warn_once(self, job, scene) -> None:
        issues = colour_management_issues(scene)
        if issues and "colour" not in job.warned:
            job.warned.add("colour")
            self.report({'WARNING'}, f"Portrait Rig: colour management ({', '.join(issues)}) "
                                     "restyles the server's frames; View Transform 'Standard' "
                                     "shows and saves them as rendered")

    def _write(self, reply, depsgraph) -> None:
        width, height = self.resolution_x, self.resolution_y
        if (reply.width, reply.height) != (width, height):
            raise sequence.RenderFailure(f"the server sent {reply.width}x{reply.height} for a "
                                         f"{width}x{height} render")
        combined = combined_pixels(reply, working_space_matrix())
        camera = depsgraph.scene_eval.camera
        camera_rotation = rotation_part(as_matrix(camera.matrix_world))
        wanted = sequence.enabled_passes(depsgraph.view_layer)
        if missing := [info.wire for info in wanted if info.wire not in reply.passes]:
            raise sequence.RenderFailure(f"the server sent no {', '.join(missing)} pass")
        result = self.begin_result(0, 0, width, height, layer=depsgraph.view_layer.name)
        try:
            layer = result.layers[0]
            layer.passes["Combined"].rect.foreach_set(combined.ravel())
            for info in wanted:
                data = pass_pixels(reply, info, camera_rotation)
                layer.passes[info.name].rect.foreach_set(
                    np.ascontiguousarray(data, dtype=np.float32).ravel())
        except BaseException:
            self.end_result(result, cancel=True)
            raise
        self.end_result(result)


# ----------------------------------------------------------------------------- settings

def _passes_changed(self, context) -> None:
    for layer in self.id_data.view_layers:            # self lives on one of the scene's layers
        if layer.portrait_rig_passes == self:
            layer.update_render_passes()              # refresh the compositor's sockets


class PortraitRigRenderSettings(bpy.types.PropertyGroup):
    """Scene.portrait_rig_render: how the engine renders sequences."""
    seed: IntProperty(
        name="Noise Seed", default=0, min=0, max=2**31 - 1,
        description="Noise seed of the shot: diffusion backends draw every frame of a shot "
                    "from the same noise, so frames change only where the rig moves")
    smooth: BoolProperty(
        name="Smooth Latents", default=False,
        description="StyleGAN backends blend each frame's latent with two frames either side "
                    "(of the same camera) against flicker. Needs a background render "
                    "(blender -b ... -a) to see the coming frames")
    lookahead: IntProperty(
        name="Frames Ahead", default=16, min=0, max=60,
        description="Animation frames requested ahead so the server renders while Blender "
                    "writes files (background renders; 0: one frame at a time)")
    timeout: FloatProperty(
        name="Timeout", default=300.0, min=1.0, soft_max=3600.0, unit='TIME_ABSOLUTE',
        description="Give up when the server sends nothing for this long while a frame is "
                    "due")


class PortraitRigPassSettings(bpy.types.PropertyGroup):
    """ViewLayer.portrait_rig_passes: the extra passes the server sends."""
    use_pass_normal: BoolProperty(
        name="Normal", default=False, update=_passes_changed,
        description="World-space unit normals of the face (0 off the face)")
    use_pass_albedo: BoolProperty(
        name="Albedo", default=False, update=_passes_changed,
        description="Linear surface colour of the face, before lighting")
    use_pass_shading: BoolProperty(
        name="Shading", default=False, update=_passes_changed,
        description="Linear irradiance of the spherical-harmonics light on the face")
    use_pass_mask: BoolProperty(
        name="Mask", default=False, update=_passes_changed,
        description="Face coverage in [0, 1]")


# ----------------------------------------------------------------------------- panels

class _EnginePanel:
    bl_space_type = 'PROPERTIES'
    bl_region_type = 'WINDOW'
    COMPAT_ENGINES = {ENGINE_ID}

    @classmethod
    def poll(cls, context):
        return context.engine in cls.COMPAT_ENGINES


class RENDER_PT_portrait_rig(_EnginePanel, bpy.types.Panel):
    bl_label = "Portrait Rig"
    bl_context = "render"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        scene = context.scene
        host, port = preferences.get().server_address()
        layout.label(text=f"Server {host}:{port} (Preferences > Add-ons)", icon='URL')
        settings = scene.portrait_rig
        layout.prop(settings, "rig", text="Rig")
        layout.prop(settings, "backend", text="Backend")
        layout.prop(settings, "lighting")
        options = scene.portrait_rig_render
        col = layout.column(heading="Sequence")
        col.prop(options, "seed")
        col.prop(options, "smooth")
        col.prop(options, "lookahead")
        col.prop(options, "timeout")
        if issues := colour_management_issues(scene):
            layout.label(text=f"Colour: {', '.join(issues)} restyles frames", icon='ERROR')


class VIEWLAYER_PT_portrait_rig_passes(_EnginePanel, bpy.types.Panel):
    bl_label = "Portrait Rig Passes"
    bl_context = "view_layer"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        col = layout.column(heading="Include", align=True)
        settings = context.view_layer.portrait_rig_passes
        for info in sequence.PASSES:
            col.prop(settings, info.prop)


def _standard_panels() -> list:
    """Blender's panels that any engine may show (their COMPAT_ENGINES list the generic
    'BLENDER_RENDER'): output, colour management, shape keys, lights ... Without our id
    they hide while Portrait Rig is the render engine."""
    return [panel for panel in bpy.types.Panel.__subclasses__()
            if isinstance(getattr(panel, "COMPAT_ENGINES", None), set)
            and 'BLENDER_RENDER' in panel.COMPAT_ENGINES]


CLASSES = (PortraitRigRenderSettings, PortraitRigPassSettings, PortraitRigRenderEngine,
           RENDER_PT_portrait_rig, VIEWLAYER_PT_portrait_rig_passes)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.portrait_rig_render = PointerProperty(type=PortraitRigRenderSettings)
    bpy.types.ViewLayer.portrait_rig_passes = PointerProperty(type=PortraitRigPassSettings)
    for panel in _standard_panels():
        panel.COMPAT_ENGINES.add(ENGINE_ID)
    sequence.register()


def unregister():
    sequence.unregister()
    for panel in _standard_panels():
        panel.COMPAT_ENGINES.discard(ENGINE_ID)
    del bpy.types.ViewLayer.portrait_rig_passes
    del bpy.types.Scene.portrait_rig_render
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
