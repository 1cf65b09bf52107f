"""Portrait Rig core: what the Blender add-on and the render server share.

Standard library and numpy only, so Blender's bundled Python imports it as is:
``params`` (the rig parameter schema), ``sh`` (spherical-harmonics lighting), ``face_data``
(the face model's arrays), ``flame_file`` (FLAME .pkl reader), ``demo_head`` (the shipped
demo face), ``protocol`` and ``client`` (the wire protocol).
"""

__version__ = "0.1.0"
