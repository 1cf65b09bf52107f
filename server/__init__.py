"""Portrait Rig render server, in layers (docs/architecture.md): ``service`` (the asyncio
front end speaking docs/protocol.md), ``backends``, ``renderer``, ``models`` (nn.Modules),
``checkpoints`` (file formats), ``diffusion``, ``photo``, ``training``. Never imports bpy."""
