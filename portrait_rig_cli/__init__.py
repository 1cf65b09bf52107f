"""``portrait-rig``: command-line tools that drive Blender (``bpy``) with the Portrait Rig
extension loaded as Blender loads it (``extension``), and a local render server as a
subprocess (``local_server``), so the ``bpy`` process never imports torch.

Commands: ``portrait-rig demo`` (``demo``) builds, renders and saves the demo performance;
``portrait-rig render`` (``render``) renders an exported shot file on a server or a cluster,
without Blender.
"""
