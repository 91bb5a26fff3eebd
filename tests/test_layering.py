"""Package edges, read from the source with ``ast``: who may import whom, no cycle, the store's on-disk
names only inside the store; and the built wheel puts exactly one name, ``featurestore``, on the path.

The folders map to import names as pyproject's ``package-dir`` says (``cli/`` is ``featurestore.cli``...).
A package here is ``featurestore.<name>``: a subpackage (``featurestore.store``) or a top-level module
(``featurestore.devices``); ``featurestore`` alone is the root ``__init__``.
"""

from __future__ import annotations

import ast
import configparser
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from featurestore.schemas import FREE_TABLES, TABLES
from featurestore.store import _layout
from featurestore.store._maintenance import SUPERSEDED
from featurestore.store._snapshot import CHECKPOINT_FILE

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
TOP = "featurestore"


def pkg(name: str) -> str:
    return f"{TOP}.{name}"


SCHEMAS, STORE, INDEX, SLIDES, ENCODERS = pkg("schemas"), pkg("store"), pkg("index"), pkg("slides"), pkg("encoders")
DISTILL, PIPELINES, CLI, VIEWER = pkg("distill"), pkg("pipelines"), pkg("cli"), pkg("viewer")

ONLY: dict[str, set[str]] = {SCHEMAS: set(), STORE: {SCHEMAS}, INDEX: {STORE, SCHEMAS},
                             VIEWER: {SCHEMAS, STORE, INDEX, SLIDES, ENCODERS}}
"""Packages that may import these project packages and no others."""

NEVER: dict[str, set[str]] = {
    SLIDES: {STORE, INDEX, DISTILL, PIPELINES, CLI},
    ENCODERS: {STORE, INDEX, DISTILL, PIPELINES, CLI},
    DISTILL: {PIPELINES, CLI},
}
"""Packages that must not import these."""

STORE_NAMES = {_layout.MARKER, _layout.COMMITS, _layout.STAGING, _layout.LOG, _layout.CHECKPOINTS, _layout.PARTS,
               _layout.LAST_CHECKPOINT, _layout.MANIFEST, _layout.GENESIS, CHECKPOINT_FILE, SUPERSEDED,
               *(f"{table}.parquet" for table in [*TABLES, *FREE_TABLES])}
"""File and directory names of the store's layout: only featurestore.store may spell them."""

RUN_DIR_NAMES = {_layout.CHECKPOINTS, "predictions.parquet"}
"""A training run directory (``fs train --out``) also has a ``checkpoints/`` folder and a
``predictions.parquet`` file; those are the run's own names, which featurestore.distill writes and reads."""


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def package(self) -> str:
        return package_of(self.name)


@dataclass(frozen=True)
class Edge:
    module: str
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def module_name(package: str, folder: Path, path: Path) -> str:
    parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
    return ".".join([package, *parts])


@cache
def modules() -> tuple[Module, ...]:
    found = []
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            found.append(Module(module_name(package, ROOT / folder, path), path, ast.parse(path.read_text(), path)))
    return tuple(found)


@cache
def subpackages() -> frozenset[str]:
    return frozenset(m.name.split(".")[1] for m in modules() if m.name != TOP)


def package_of(name: str) -> str:
    """``featurestore.store._log`` → ``featurestore.store``; a name the root package defines → ``featurestore``."""
    parts = name.split(".")
    return pkg(parts[1]) if len(parts) > 1 and parts[1] in subpackages() else TOP


def imported_names(module: Module) -> list[tuple[int, str]]:
    """Every project module or name ``module`` imports (at any depth: lazy imports count), with its line;
    ``module:function`` strings count too, as entry points loaded by ``importlib``."""
    names = []
    package = module.name if module.path.name == "__init__.py" else module.name.rpartition(".")[0]
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from featurestore import store` needs featurestore.store, `from featurestore import Store` the root.
            names += [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            ref = re.fullmatch(rf"({TOP}(?:\.\w+)+):\w+", node.value)
            if ref:
                names.append((node.lineno, ref.group(1)))
    return [(line, name) for line, name in names if name == TOP or name.startswith(TOP + ".")]


@cache
def edges() -> tuple[Edge, ...]:
    """Imports that cross from one package into another."""
    found = []
    for m in modules():
        for line, name in imported_names(m):
            target = package_of(name)
            if target != m.package:
                found.append(Edge(m.name, line, target))
    return tuple(dict.fromkeys(found))


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = defaultdict(set)
    for e in edges():
        g[package_of(e.module)].add(e.target)
    return g


def test_the_source_tree_is_read():
    names = {m.name for m in modules()}
    assert {f"{STORE}._layout", f"{CLI}.main", f"{SCHEMAS}.records", f"{DISTILL}.kd", f"{INDEX}._build"} <= names
    assert {SCHEMAS, STORE, INDEX, SLIDES, ENCODERS, DISTILL, PIPELINES, CLI} <= {m.package for m in modules()}
    assert STORE in graph()[INDEX] and SCHEMAS in graph()[STORE], "known edges are found"


@pytest.mark.parametrize("package", sorted(ONLY))
def test_packages_import_only_what_they_may(package):
    allowed = ONLY[package]
    bad = [str(e) for e in edges() if package_of(e.module) == package and e.target not in allowed]
    assert not bad, f"{package} may import only {sorted(allowed) or 'no other project package'}:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", sorted(NEVER))
def test_packages_do_not_import_what_sits_above_them(package):
    forbidden = NEVER[package]
    bad = [str(e) for e in edges() if package_of(e.module) == package and e.target in forbidden]
    assert not bad, f"{package} must not import {sorted(forbidden)}:\n" + "\n".join(bad)


def test_only_the_cli_imports_the_viewer():
    bad = [str(e) for e in edges() if e.target == VIEWER and package_of(e.module) != CLI]
    assert not bad, "featurestore.viewer is an application that fs view serves; nothing else imports it:\n" + \
        "\n".join(bad)


def test_nothing_imports_the_cli():
    bad = [str(e) for e in edges() if e.target == CLI]
    assert not bad, "featurestore.cli parses and prints; library code must not import it:\n" + "\n".join(bad)


def test_the_package_graph_has_no_cycle():
    g = graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(g.get(node, ())):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(g):
        cycle = visit(start, [])
        assert cycle is None, "import cycle: " + " → ".join(cycle) + "\n" + "\n".join(
            str(e) for e in edges() if (package_of(e.module), e.target) in set(zip(cycle, cycle[1:], strict=False)))


def docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring nodes of a module, its classes and functions (prose, not paths the code opens)."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)):
            found.add(id(body[0].value))
    return found


def store_names_in(tree: ast.Module, allowed: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each store name that a string literal holds, whole or as a path component."""
    skip = docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            found += [(node.lineno, n) for n in (set(re.split(r"[/\\]", node.value)) & STORE_NAMES) - allowed]
    return sorted(found)


def test_the_store_names_check_sees_paths_and_skips_prose():
    source = ('"""Reads commits/ and log/ of a store."""\n'
              'p = root / "commits" / cid / "tiles.parquet"\n'
              'q = f"{root}/log/{v}.json"\n'
              'r = "catalog", "logs", "the commit log"\n')
    assert store_names_in(ast.parse(source), set()) == [(2, "commits"), (2, "tiles.parquet"), (3, "log")]
    assert store_names_in(ast.parse(source), {"log"}) == [(2, "commits"), (2, "tiles.parquet")]


def test_only_the_store_spells_its_on_disk_names():
    bad = [f"{m.name}:{line}: {name!r}" for m in modules() if m.package != STORE
           for line, name in store_names_in(m.tree, RUN_DIR_NAMES if m.package == DISTILL else set())]
    assert not bad, ("only featurestore.store knows its layout; ask it (Store/Snapshot methods) instead:\n"
                     + "\n".join(bad))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the checkout (so no build/ or egg-info lands in the working tree)."""
    src = tmp_path_factory.mktemp("src") / "repo"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "demo",
                                                             "bench-results"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True)
    (found,) = out.glob("*.whl")
    return found


def test_the_wheel_installs_one_import_root(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    assert {n.split("/")[0] for n in names} == {TOP, dist_info}
    assert f"{TOP}/cli/main.py" in names and f"{TOP}/schemas/records.py" in names, "package-dir folders are inside"


def test_the_fs_script_points_into_featurestore(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = configparser.ConfigParser()
        entry_points.read_string(z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode())
        module, _, attr = entry_points["console_scripts"]["fs"].partition(":")
        source = z.read(module.replace(".", "/") + ".py").decode()
    assert module.split(".")[0] == TOP
    assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == attr for t in n.targets)
               for n in ast.parse(source).body), f"{module} defines no {attr}"
