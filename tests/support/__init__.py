"""Helpers the tests and benches share: fixtures in official formats, synthetic heads, headless
Blender, a render server subprocess. Imported as ``tests.support.<module>``."""
