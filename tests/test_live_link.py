"""Live link: scene changes -> render server -> the "Portrait Rig" image, against the real
server subprocess. Timers do not run in the bpy module, so the tests drive the same drain
function the timer calls (``blender_env.pump``)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from portrait_rig.colour import srgb_to_linear

from tests.support.blender_env import (blender, bpy, draw, extension,  # noqa: F401
                                       extension_repository, pump, render_server)

pytestmark = pytest.mark.blender

SIZE = 96


def stage():
    """A camera 1.2 m in front of the face (the rig faces Blender's -Y) and a grey World."""
    world = bpy.data.worlds.new("World")
    world.color = (0.8, 0.8, 0.8)
    bpy.context.scene.world = world
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    cam.location = (0.0, -1.2, 0.0)
    cam.rotation_euler = (math.pi / 2, 0.0, 0.0)
    bpy.context.scene.collection.objects.link(cam)
    bpy.context.scene.camera = cam
    return cam


def go_live(extension, server):
    """A rig fetched from ``server`` in a scene with a camera, streaming live."""
    prefs = extension.preferences
    prefs.server_host, prefs.server_port = server.host, server.port
    prefs.face_source = 'SERVER'
    stage()
    assert bpy.ops.portrait_rig.add_rig() == {'FINISHED'}
    settings = bpy.context.scene.portrait_rig
    settings.width = settings.height = SIZE
    bpy.context.view_layer.update()            # pose matrices evaluated, as after any edit
    settings.live = True                       # connects (worker thread) and sends the scene
    return settings.rig


def image_pixels() -> np.ndarray:
    image = bpy.data.images["Portrait Rig"]
    pixels = np.empty(len(image.pixels), np.float32)
    image.pixels.foreach_get(pixels)
    return pixels.reshape(image.size[1], image.size[0], 4)


def frames_shown(live_link, count: int):
    return lambda: live_link.status()["frames"] >= count


def linear_to_srgb_bytes(image_output, linear: np.ndarray) -> np.ndarray:
    """Inverse of the add-on's decoding table: nearest table entry."""
    lut = image_output.SRGB_TO_LINEAR_LUT
    index = np.clip(np.searchsorted(lut, linear), 1, 255)
    return np.where(np.abs(lut[index - 1] - linear) <= np.abs(lut[index] - linear),
                    index - 1, index).astype(np.uint8)


def server_frame(server, scene_reader, rig, width=SIZE, height=SIZE) -> np.ndarray:
    """What the server renders for the scene as it is now: sRGB bytes [H, W, 3], top row first."""
    from portrait_rig.client import Client
    params = scene_reader.read_params(rig, bpy.context.scene,
                                      appearance=rig.portrait_rig.to_dict())
    with Client(server.host, server.port) as client:
        frame = client.render(params.to_dict(), width, height)
    return np.frombuffer(frame.pixels, np.uint8).reshape(height, width, 3)


def shown_frame(image_output) -> np.ndarray:
    """The "Portrait Rig" image back as sRGB bytes, top row first."""
    pixels = image_pixels()
    assert (pixels[..., 3] == 1.0).all()
    return linear_to_srgb_bytes(image_output, pixels[::-1, :, :3])


def test_scene_changes_stream_to_the_image(extension, render_server):
    live_link = extension.module("blender_rig.live_link")
    image_output = extension.module("blender_rig.image_output")
    scene_reader = extension.module("blender_rig.scene_reader")
    rig_builder = extension.module("blender_rig.rig_builder")
    rig = go_live(extension, render_server)
    assert live_link.is_running()

    pump(live_link.drain_frames, frames_shown(live_link, 1))
    image = bpy.data.images["Portrait Rig"]
    assert tuple(image.size) == (SIZE, SIZE) and image.is_float
    assert image.colorspace_settings.name == "Linear Rec.709"
    assert live_link.status()["state"] == live_link.CONNECTED
    # The image holds exactly the server's frame for the scene (decoded, rows flipped).
    neutral = shown_frame(image_output)
    np.testing.assert_array_equal(neutral, server_frame(render_server, scene_reader, rig))

    # A shape-key change reaches the server through the depsgraph handler.
    key = rig_builder.rig_mesh(rig).data.shape_keys
    smile = next(n for n, display in key["portrait_rig_component_names"].items()
                 if display == "smile")
    key.key_blocks[smile].value = 3.0
    bpy.context.view_layer.update()
    pump(live_link.drain_frames, frames_shown(live_link, 2))
    smiling = shown_frame(image_output)
    assert (smiling != neutral).any(axis=2).sum() > 20
    np.testing.assert_array_equal(smiling, server_frame(render_server, scene_reader, rig))

    panel = extension.module("blender_rig.panel")
    shown = " ".join(draw(panel.VIEW3D_PT_portrait_rig_connection))
    assert f"Connected: {render_server.host}:{render_server.port}" in shown
    assert "fps" in shown and "last frame" in shown

    # Nothing changed: no new request (the handler compares parameters).
    sent = live_link._session.last_key
    bpy.context.view_layer.update()
    live_link.on_frame_change_post(bpy.context.scene)
    assert live_link._session.last_key is sent
    assert live_link._session.worker.slot.take() is None

    # A frame change re-reads the scene too (animation playback, scrubbing).
    key.key_blocks[smile].keyframe_insert("value", frame=1)
    key.key_blocks[smile].value = 0.0
    key.key_blocks[smile].keyframe_insert("value", frame=10)
    bpy.context.scene.frame_set(10)
    pump(live_link.drain_frames, frames_shown(live_link, 3))
    np.testing.assert_array_equal(shown_frame(image_output), neutral)

    # The frame size is a scene setting.
    bpy.context.scene.portrait_rig.width = 64
    pump(live_link.drain_frames, lambda: tuple(bpy.data.images["Portrait Rig"].size) == (64, SIZE))

    assert bpy.ops.portrait_rig.disconnect() == {'FINISHED'}
    assert not live_link.is_running()
    assert not bpy.app.timers.is_registered(live_link.drain_frames)


def test_backends_come_from_the_server_hello(extension, render_server):
    live_link = extension.module("blender_rig.live_link")
    go_live(extension, render_server)
    pump(live_link.drain_frames, lambda: live_link.backends())
    from portrait_rig.client import Client
    client = Client(render_server.host, render_server.port)
    try:
        offered = [b["name"] for b in client.connect()["backends"]]
    finally:
        client.close()
    assert "preview" in offered
    assert [name for name, _ in live_link.backends()] == offered
    settings = bpy.context.scene.portrait_rig
    assert settings.backend_menu == ""                    # the server's default
    settings.backend_menu = "preview"
    assert settings.backend == "preview"
    pump(live_link.drain_frames, frames_shown(live_link, 1))
    settings.backend = "no_such_backend"                  # the server names the problem
    pump(live_link.drain_frames, lambda: "no_such_backend" in live_link.status()["error"])
    assert live_link.status()["state"] == live_link.CONNECTED   # the connection survives


def test_dead_server_never_blocks_blender(extension, tmp_path):
    from tests.support.server_process import ServerProcess
    live_link = extension.module("blender_rig.live_link")
    rig_builder = extension.module("blender_rig.rig_builder")
    with ServerProcess("--model", "demo", "--backend", "preview", "--quiet") as server:
        rig = go_live(extension, server)
        pump(live_link.drain_frames, frames_shown(live_link, 1))
        server.proc.kill()
        server.proc.wait()

    pump(live_link.drain_frames, lambda: live_link.status()["state"] == live_link.ERROR)
    error = live_link.status()["error"]
    assert "refused" in error or "closed" in error
    shown = " ".join(draw(extension.module("blender_rig.panel").VIEW3D_PT_portrait_rig_connection))
    assert shown.startswith("Error: ") and error.split()[0] in shown

    # The handlers keep handing over parameters while the worker keeps retrying: they never
    # wait for the socket (bench/bench_handlers.py measures their cost).
    key = rig_builder.rig_mesh(rig).data.shape_keys.key_blocks["Exp000"]
    for value in (0.5, 1.0, 1.5):
        key.value = value
        bpy.context.view_layer.update()                    # runs the depsgraph handler
        assert live_link._session.worker.slot.take() is not None
        key.value = value + 0.1
        live_link.on_frame_change_post(bpy.context.scene)   # read, compare, hand over
        assert live_link._session.worker.slot.take() is not None
        live_link.drain_frames()

    worker = live_link._session.worker
    assert worker.is_alive()
    assert bpy.ops.portrait_rig.disconnect() == {'FINISHED'}
    assert not live_link.is_running()                     # returned without joining it
    worker.join(live_link.CONNECT_TIMEOUT_S + 1.0)
    assert not worker.is_alive()


def test_missing_camera_is_reported_not_raised(extension, render_server):
    live_link = extension.module("blender_rig.live_link")
    rig = go_live(extension, render_server)
    bpy.data.objects.remove(bpy.context.scene.camera)
    rig.location.x += 0.1
    bpy.context.view_layer.update()
    assert "no active camera" in live_link.status()["error"]


def test_frames_keep_their_colours_and_orientation(extension, tmp_path):
    """Display-referred sRGB bytes in, the same bytes out of Blender's colour management
    (the Image Editor shows non-render images with the Standard view), top row on top."""
    image_output = extension.module("blender_rig.image_output")
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = np.arange(256).reshape(16, 16)            # every code value once
    rgb[..., 1] = 255 - rgb[..., 0]
    rgb[..., 2] = np.arange(16)[:, None] * 17               # rows tell top from bottom
    frame = SimpleNamespace(width=16, height=16, format="rgb8",
                            pixels=memoryview(rgb.tobytes()))
    image = image_output.write_frame(frame)
    assert not image.use_view_as_render

    top_row = image_pixels()[-1, :, :3]                     # Blender stores bottom-up
    np.testing.assert_allclose(top_row, srgb_to_linear(rgb[0] / 255.0), atol=1e-6)

    scene = bpy.context.scene
    scene.display_settings.display_device = "sRGB"
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure, scene.view_settings.gamma = 0.0, 1.0
    path = tmp_path / "shown.png"
    image.save_render(filepath=str(path), scene=scene)
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), rgb)

    shown = image_pixels().copy()
    rgba = np.concatenate([rgb, np.full((16, 16, 1), 128, np.uint8)], axis=2)
    image_output.write_frame(SimpleNamespace(width=16, height=16, format="rgba8",
                                             pixels=memoryview(rgba.tobytes())))
    np.testing.assert_array_equal(image_pixels(), shown)     # the mask is not shown: opaque
    with pytest.raises(ValueError, match="expected 16x16x4"):
        image_output.write_frame(SimpleNamespace(width=16, height=16, format="rgba8",
                                                 pixels=memoryview(rgb.tobytes())))
    with pytest.raises(ValueError, match="'jpeg' cannot be shown"):
        image_output.write_frame(SimpleNamespace(width=16, height=16, format="jpeg",
                                                 pixels=b""))


def test_a_progressive_backend_streams_previews_into_the_image(extension, tmp_path):
    """With a diffusion backend the artist sees the model's x0 estimate after the first
    sampler step: the link asks for previews (the hello says the backend streams them), shows
    them, and the request's frame still follows."""
    from tests.support.diffusionrig_fixtures import write_checkpoint
    from tests.support.server_process import ServerProcess
    live_link = extension.module("blender_rig.live_link")
    write_checkpoint(tmp_path / "diffusionrig" / "model.safetensors")
    latent = tmp_path / "latents" / "latent.npy"          # in the data folder's latents/
    latent.parent.mkdir()
    np.save(latent, np.random.default_rng(0).normal(size=64).astype(np.float32))
    with ServerProcess("--model", "demo", "--backend", "diffusionrig", "--quiet",
                       "--option", "diffusionrig.resolution=16",
                       "--option", "diffusionrig.steps=4",
                       env={"PORTRAIT_RIG_HOME": str(tmp_path)}) as server:
        rig = go_live(extension, server)
        received = []
        frames = live_link._session.worker.frames
        put = frames.put
        frames.put = lambda item, *args, **kw: (received.append(item[0]), put(item, *args, **kw))
        rig.portrait_rig.latent_file = str(latent)            # the appearance: a new request
        bpy.context.view_layer.update()
        finals = lambda: [r for r in received if type(r).__name__ == "Frame"]  # noqa: E731
        pump(live_link.drain_frames, finals, timeout=60)
        request = finals()[0].id
        steps = [r.step for r in received if type(r).__name__ == "Preview" and r.id == request]
        assert steps == [1, 2, 3]
        assert live_link.status()["frames"] >= 1
        live_link.stop()
