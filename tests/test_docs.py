"""The README's map of the code names every module there is, and none that is gone."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("prge", "models", "export", "runtime_driver")


def test_readme_layout_matches_the_tree():
    layout = (REPO / "README.md").read_text().split("## Layout", 1)[1]
    rows = {m.group(1).rstrip("/"): set(re.findall(r"`([\w/-]+\.py)`", m.group(2)))
            for m in re.finditer(r"^\| `([^`]+)` \| (.*) \|$", layout, re.M)}
    on_disk: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if path.name == "__init__.py":
                continue
            # Each module belongs to the deepest folder the layout has a row for.
            folder = max((f for f in rows if path.is_relative_to(REPO / f)), key=len)
            on_disk.setdefault(folder, set()).add(str(path.relative_to(REPO / folder)))
    for folder in sorted(set(on_disk) | {f for f in rows if f in PACKAGES or f.split("/")[0] in PACKAGES}):
        assert rows.get(folder, set()) == on_disk.get(folder, set()), f"README's Layout row for {folder}/"
