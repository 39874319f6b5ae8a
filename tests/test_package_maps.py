"""Each package's docstring is its folder map: it names every module and subpackage in its folder, so a newcomer
finds any behaviour by reading one page per folder (and a new module cannot land unmentioned)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = [
    p.parent
    for p in sorted(REPO.glob("*/__init__.py")) + sorted(REPO.glob("*/*/__init__.py"))
    if p.parts[len(REPO.parts)] not in ("tests", "bench", "deploy", "docs", "configs", "requirements")
]


def _names(folder: Path) -> list[str]:
    mods = [p.stem for p in folder.glob("*.py") if p.stem != "__init__"]
    subs = [p.parent.name for p in folder.glob("*/__init__.py")]
    return sorted(mods + subs)


@pytest.mark.parametrize("folder", PACKAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_the_package_docstring_names_every_module_in_its_folder(folder: Path):
    doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
    missing = [n for n in _names(folder) if not re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", doc)]
    assert not missing, f"{folder.relative_to(REPO)}/__init__.py does not name {missing}"
