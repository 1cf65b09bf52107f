"""docs/architecture.md lists every package of the tree: a folder added without a line in the
folder table fails here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def listed_folders() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("## Folders"):text.index("## Provenance")]
    return set(re.findall(r"^\| `([\w/]+/)`", table, flags=re.M))


def test_every_top_level_package_and_server_layer_is_documented():
    top = {f"{p.name}/" for p in ROOT.iterdir()
           if p.is_dir() and (p / "__init__.py").is_file() and p.name != "tests"}
    layers = {f"server/{p.name}/" for p in (ROOT / "server").iterdir()
              if p.is_dir() and (p / "__init__.py").is_file()}
    missing = (top | layers) - listed_folders()
    assert not missing, f"docs/architecture.md does not list {sorted(missing)}"
    assert top >= {"portrait_rig/", "server/", "blender_rig/"}
    assert len(layers) >= 8
