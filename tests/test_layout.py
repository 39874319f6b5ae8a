"""The layout tells the architecture: one installed top-level package, imports that only point down, a
storage tier free of vLLM and torch, no module over the size limit."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Installed subpackage -> the folder it is built from (pyproject's package-dir).
FOLDERS = {
    "pdmesh.router": "router",
    "pdmesh.connector": "connector",
    "pdmesh.prefiller": "prefiller",
    "pdmesh.decoder": "decoder",
    "pdmesh.kvcache": "kvcache",
    "pdmesh.transfer": "transfer",
    "pdmesh.kernels": "kernels",
}
# Layers, lowest first: a module may import its own layer or a lower one, never a higher one.
FOUNDATION = (
    "pdmesh.security",
    "pdmesh.procs",
    "pdmesh.frames",
    "pdmesh.breaker",
    "pdmesh.http_guard",
    "pdmesh.failpoints",
    "pdmesh.restart_policy",
)
LAYERS = [
    FOUNDATION,
    ("pdmesh.kernels", "pdmesh.transfer"),
    ("pdmesh.kvcache",),
    ("pdmesh.prefiller", "pdmesh.decoder"),
    ("pdmesh.connector",),
    ("pdmesh.router",),
    ("pdmesh.worker", "pdmesh.cluster", "pdmesh.cli", "pdmesh.modelgen", "pdmesh"),
]
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg, folder in {"pdmesh": "pdmesh", **FOLDERS}.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = i, len(name)
    assert best is not None, f"{module} is in no layer"
    return best


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(n, node.lineno) for n in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return found


def test_imports_only_point_down_and_never_use_bare_folder_names():
    modules = _modules()
    bare = tuple(set(FOLDERS.values()))
    wrong = []
    for mod, path in modules.items():
        mine = _layer(mod)
        for name, line in _imports(path):
            top = name.split(".")[0]
            if top in bare:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports bare {name!r} (use pdmesh.{name})")
            if top != "pdmesh":
                continue
            # "from pdmesh.x import y" yields pdmesh.x.y: y is a module or a name in pdmesh.x
            target = name if name in modules else name.rsplit(".", 1)[0]
            if target in modules and _layer(target) > mine:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({mod}) imports {target}, a higher layer")
    assert not wrong, "\n".join(wrong)


def test_tests_and_benchmarks_use_the_installed_names():
    bare = tuple(set(FOLDERS.values()))
    wrong = []
    for folder in ("tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for name, line in _imports(path):
                if name.split(".")[0] in bare:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports bare {name!r}")
    assert not wrong, "\n".join(wrong)


def test_kvcache_transfer_and_roles_import_neither_vllm_nor_torch():
    mods = sorted(
        m
        for m in _modules()
        if m.startswith(("pdmesh.kvcache", "pdmesh.transfer", "pdmesh.prefiller", "pdmesh.decoder"))
        or m in FOUNDATION
    )
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('vllm', 'torch', 'triton'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"these layers pulled in {out.stdout.strip()}"


def test_no_module_over_the_size_limit():
    big = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for p in _modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert not big, "split these along a seam: " + ", ".join(big)


def test_every_package_says_what_it_holds():
    for path in _modules().values():
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert len(doc) > 80, f"{path.relative_to(ROOT)}: the package docstring should map the folder"


def test_the_wheel_installs_one_top_level_package(tmp_path: Path):
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in this environment")
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("pdmesh", *FOLDERS.values()):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        ".",
    ]
    out = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("pdmesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"pdmesh"}, tops
    for sub in FOLDERS:
        path = sub.replace(".", "/") + "/__init__.py"
        assert path in names, f"{path} missing from the wheel"
    assert "pdmesh/connector/vllm_connector.py" in names
    assert "pdmesh/worker/agent.py" in names
