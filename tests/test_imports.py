"""The package's import graph: no circle, and no lower layer importing a higher one.

Every import counts, module-level or inside a function (a lazy import is still a dependency; the
four circles this check was written against were all lazy), except those under
`if TYPE_CHECKING:`. The checker is tested on a small package with a circle in it, so a broken
checker cannot pass silently.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A module may import its own layer's modules (when no circle results) and lower layers.
LAYERS = (
    ("blues.common",),
    ("blues.config", "blues.vision.config"),
    ("blues.presets",),
    ("blues.data.sources",),
    ("blues.data", "blues.kernels"),
    ("blues.moe",),
    ("blues.attention", "blues.loss", "blues.model", "blues.generate", "blues.vision"),
    ("blues.hf",),
    ("blues.prune", "blues.upcycle"),
    ("blues.train",),
    ("blues.probe",),
    ("blues.slurm",),
    ("blues.cli",),
)


def package_modules(folder: str, package: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py under `folder` (installed as `package`)."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), folder)[:-3].replace(os.sep, ".")
                name = package if rel == "__init__" else f"{package}.{rel}"
                out[name.removesuffix(".__init__")] = os.path.join(d, f)
    return out


def imported_modules(path: str, name: str, known: set[str]) -> set[str]:
    """The known modules that the file `path` (module `name`) imports, anywhere in it."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    is_pkg = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if is_pkg else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            # `from pkg import x`: x may be a submodule (then that is the dependency) or a name in pkg
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                out.add(t)
                break
    return out


def import_graph(specs: list[tuple[str, str]]) -> dict[str, set[str]]:
    files = {}
    for folder, package in specs:
        files.update(package_modules(folder, package))
    known = set(files)
    return {m: imported_modules(p, m, known) for m, p in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    return level


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for m, deps in sorted(graph.items()):
        lm = layer_of(m)
        for d in sorted(deps):
            ld = layer_of(d)
            if lm is not None and ld is not None and ld > lm:
                out.append(f"{m} (layer {lm}) imports {d} (layer {ld})")
    return out


def blues_graph() -> dict[str, set[str]]:
    return import_graph([(os.path.join(REPO, "blues"), "blues"), (os.path.join(REPO, "kernels"), "blues.kernels")])


def test_the_package_has_no_import_circle():
    assert circles(blues_graph()) == []


def test_no_lower_layer_imports_a_higher_one():
    graph = blues_graph()
    unplaced = sorted(m for m in graph if layer_of(m) is None and m != "blues")
    assert unplaced == [], f"modules without a layer in LAYERS: {unplaced}"
    assert upward_imports(graph) == []


def test_data_sources_import_nothing_else_of_blues():
    assert blues_graph()["blues.data.sources"] == set()


def _fake_package(tmp_path, files: dict[str, str]) -> str:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return str(root)


def test_the_checker_finds_a_lazy_circle_and_ignores_type_checking(tmp_path):
    # a imports b at module level, b imports a inside a function: the kind of circle Blues had
    root = _fake_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import g\n",
        "b.py": "def g():\n    from pkg.a import f\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import x\n",
        "d.py": "from pkg import c\n",
        "sub/__init__.py": "from .e import h\n",
        "sub/e.py": "from .. import a\n",
    })
    graph = import_graph([(root, "pkg")])
    assert graph["pkg.sub"] == {"pkg.sub.e"}
    assert graph["pkg.sub.e"] == {"pkg.a"}
    assert graph["pkg.c"] == set()
    assert circles(graph) == [["pkg.a", "pkg.b"]]


def test_the_checker_fails_when_a_circle_is_added_to_blues(tmp_path):
    # A copy of blues/ with one line added to blues/config.py: config -> model -> config.
    import shutil
    copy = tmp_path / "blues"
    shutil.copytree(os.path.join(REPO, "blues"), copy, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    with open(copy / "config.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef _circle():\n    from blues.model import Blues  # noqa: F401\n")
    graph = import_graph([(str(copy), "blues"), (os.path.join(REPO, "kernels"), "blues.kernels")])
    found = circles(graph)
    assert any({"blues.config", "blues.model"} <= set(c) for c in found), found
    model_layer = next(i for i, layer in enumerate(LAYERS) if "blues.model" in layer)
    assert f"blues.config (layer 1) imports blues.model (layer {model_layer})" in upward_imports(graph)


@pytest.mark.parametrize("module", ["blues", "blues.common", "blues.config"])
def test_light_modules_do_not_import_torch(module):
    # `import blues` and the config are what a CLI's --help and launch/train.sh's inline python pay for.
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_public_face():
    import blues
    from blues import Blues, BluesConfig, default_tokenizer, get_preset, load_config  # noqa: F401
    assert blues.Blues is Blues and isinstance(get_preset("tiny"), BluesConfig)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        blues.nope  # noqa: B018
