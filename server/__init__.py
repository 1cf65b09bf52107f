"""Portrait Rig render server: face model skinning, the buffer renderer, the backends and the
asyncio server that speaks the wire protocol (docs/protocol.md). Never imports bpy."""
