"""The layers hold: no other library's private attributes, a torch-free core (the CLI's quick answers load no
torch), no import cycle among the package's modules, migrations that never import live code, and each layer
of `tuner/` (core, engine, store, results, study, cli) importing only the layers below it.

Read from the source with `ast` (and, for the core, from a fresh interpreter's own import record), so a
change that breaks a layer fails here with the file, line and chain to fix."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tuner", "dashboards")
MIGRATIONS = ROOT / "tuner" / "store" / "migrations" / "versions"
# Private attributes of other libraries the code has reached for (Ray Tune's OptunaSearch, Optuna's trials,
# asyncore's socket map, tokenizers' wrapped tokenizer): found on any object, `self` of a subclass included.
DENIED = {"_ot_trials", "_ot_study", "_completed_trials", "_trial_id", "_map", "_tokenizer"}
HEAVY = ("torch", "transformers")


def sources(*packages: str) -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of every module in `packages`."""
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top not in PACKAGES and top not in sys.stdlib_module_names


def resolve_relative(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names, relative ones resolved against `module`."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts[: len(parts) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


# ---- (a) other libraries' private attributes ---------------------------------------------------------------

def private_uses(module: str, tree: ast.Module) -> list[str]:
    """Where `module` reads another library's private attribute: a denied name on any object, `x._name` on a
    name bound by importing a third-party module (or on an attribute chain rooted at one), or a private
    name imported from one. The package's own private names are its business and are not listed."""
    imported: set[str] = set()
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_third_party(alias.name):
                    imported.add(alias.asname or alias.name.split(".")[0])
                    if any(is_private(part) for part in alias.name.split(".")):
                        found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and is_third_party(node.module or ""):
            for alias in node.names:
                imported.add(alias.asname or alias.name)
                parts = (node.module or "").split(".") + [alias.name]
                if any(is_private(part) for part in parts):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if node.attr in DENIED:
            found.append((node.lineno, f".{node.attr}"))
            continue
        root: ast.expr = node
        chain = []
        while isinstance(root, ast.Attribute):
            chain.append(root.attr)
            root = root.value
        if isinstance(root, ast.Name) and root.id in imported and is_private(node.attr):
            found.append((node.lineno, f"{root.id}.{'.'.join(reversed(chain))}"))
    return [f"line {line}: {text}" for line, text in sorted(found)]


MODULES = dict(sources(*PACKAGES))


@pytest.mark.parametrize("module", list(MODULES))
def test_no_private_attributes_of_other_libraries(module):
    path = MODULES[module]
    found = private_uses(module, parse(path))
    assert not found, f"{path.relative_to(ROOT)} uses private attributes of other libraries: {'; '.join(found)}"


def test_the_private_attribute_check_tells_other_libraries_from_the_package():
    code = """
import optuna
import torch as T
from ray.tune.search.optuna import OptunaSearch
from torch.utils import _pytree
from tuner.engine import methods

class Search(OptunaSearch):
    def on_complete(self, trial_id):
        self._ot_trials.pop(trial_id)
        self._own = 1

def f(study):
    T.cuda._lazy_init()
    optuna.storages._rdb
    methods._discover()
    study._own_helper()
    return T.__version__
"""
    found = private_uses("tuner.example", ast.parse(code))
    assert [line.split(": ", 1)[1] for line in found] == [
        "from torch.utils import _pytree", "._ot_trials", "T.cuda._lazy_init", "optuna.storages._rdb"]


# ---- (b) a torch-free core ---------------------------------------------------------------------------------

def heavy_imports(code: str) -> list[str]:
    """The import chains by which `code`, run in a fresh interpreter on this checkout, loads torch or
    transformers (`-X importtime`: each module is reported after its imports, one indent deeper)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1]
            rows.append((len(name) - len(name.lstrip()), name.strip()))
    chains = []
    for i, (depth, name) in enumerate(rows):
        if name in HEAVY:
            chain, level = [name], depth
            for later_depth, later in rows[i + 1:]:
                if later_depth < level:
                    chain.append(later)
                    level = later_depth
            chains.append(" <- ".join(chain))
    return chains


CORE = {
    "import tuner.study.spec": "import tuner.study.spec",
    "import tuner.core.hparams": "import tuner.core.hparams",
    "import tuner.engine.methods (and every method)": "import tuner.engine.methods; tuner.engine.methods.available()",
    "tuner --help": "import sys; from tuner.cli import main; sys.argv = ['tuner', '--help']; main()",
    "tuner methods": "from tuner.cli import main; main(['methods'])",
    "tuner study validate (testbed)": "from tuner.cli import main; main(['study', 'validate', "
                                      "'studies/quickstart.yaml'])",
}


@pytest.mark.parametrize("what", list(CORE))
def test_the_core_loads_no_torch(what):
    code = CORE[what]
    if what == "tuner --help":
        code = f"try:\n    {code}\nexcept SystemExit:\n    pass"
    chains = heavy_imports(code)
    assert not chains, f"{what} loads {', '.join(chains)}: import torch where it is used (see tuner/engine/methods/base.py)"


# ---- (c) no import cycle -----------------------------------------------------------------------------------

def top_level_imports(module: str, is_package: bool, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules `module` imports when it is imported: statements at module level (inside
    `if`/`try` too), not in functions and not under `if TYPE_CHECKING:`."""
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.update(alias.name for alias in node.names if alias.name in known)
            elif isinstance(node, ast.ImportFrom):
                base = resolve_relative(module, is_package, node)
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    out.add(target if target in known else base)
            elif isinstance(node, ast.If):
                test = node.test
                if not (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
                        or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(part)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return {m for m in out if m in known and m != module}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan), as the chain of imports around it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for group in groups:  # walk from the group's first module back to itself, inside the group
        members, start = set(group), min(group)
        path, seen = [start], {start}
        while True:
            nxt = sorted(w for w in graph[path[-1]] if w in members)
            back = start in nxt
            if back:
                cycles.append(path + [start])
                break
            step = next((w for w in nxt if w not in seen), None)
            if step is None:
                cycles.append(sorted(group))
                break
            path.append(step)
            seen.add(step)
    return cycles


def test_no_import_cycle_among_the_packages_modules():
    known = set(MODULES)
    graph = {module: top_level_imports(module, path.name == "__init__.py", parse(path), known)
             for module, path in MODULES.items()}
    # the graph sees what a module imports
    assert graph["tuner.study.spec"] >= {"tuner.engine.methods", "tuner.core.settings"}
    cycles = import_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def imports_anywhere(module: str, is_package: bool, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules `module` imports anywhere in the file, inside functions too (a lazy import is still
    a dependency: two modules that import each other lazily are one module split in two), not under
    `if TYPE_CHECKING:`."""
    out: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if not (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
                    or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                self.generic_visit(node)
            else:
                for child in node.orelse:
                    self.visit(child)

        def visit_Import(self, node: ast.Import) -> None:
            out.update(alias.name for alias in node.names if alias.name in known)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            base = resolve_relative(module, is_package, node)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                out.add(target if target in known else base)

    Visitor().visit(tree)
    return {m for m in out if m in known and m != module}


def test_no_import_cycle_even_through_imports_inside_functions():
    known = set(MODULES)
    graph = {module: imports_anywhere(module, path.name == "__init__.py", parse(path), known)
             for module, path in MODULES.items()}
    assert "tuner.engine.models" in graph["tuner.engine.memory"]  # the graph sees a lazy import
    cycles = import_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]


# ---- (d) migrations never import live code -----------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(MIGRATIONS.glob("0*.py")), ids=lambda p: p.name)
def test_migrations_import_no_package_code(path):
    """A migration means the same on every store it ever upgrades: what it needs of the package's code is
    copied into it as it was, never imported (anywhere in the file, functions included)."""
    found = []
    for node in ast.walk(parse(path)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        found += [f"line {node.lineno}: {n}" for n in names if n.split(".")[0] in PACKAGES]
        if isinstance(node, ast.ImportFrom) and node.level:
            found.append(f"line {node.lineno}: a relative import")
    assert not found, f"{path.name} imports the package's code: {'; '.join(found)}"


# ---- (e) each layer imports only the layers below it -------------------------------------------------------

# tuner's layers, lowest first; the package's own `__init__` (its version) is below them all, and the
# dashboards are views beside the CLI (which starts their server)
LAYERS = ("core", "engine", "store", "results", "study", "cli")


def rank(module: str) -> int:
    parts = module.split(".")
    if parts[0] == "dashboards":
        return LAYERS.index("cli")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def upward_imports(module: str, is_package: bool, tree: ast.Module) -> list[str]:
    """Imports of the package's modules from a higher layer than `module`'s, anywhere in the file (inside
    functions too: a lazy import is still a dependency)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [resolve_relative(module, is_package, node)]
        else:
            continue
        found += [f"line {node.lineno}: {name}" for name in names
                  if name.split(".")[0] in PACKAGES and rank(name) > rank(module)]
    return found


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("tuner.")])
def test_each_layer_imports_only_the_layers_below(module):
    path = MODULES[module]
    found = upward_imports(module, path.name == "__init__.py", parse(path))
    assert not found, f"{path.relative_to(ROOT)} ({LAYERS[rank(module)]}) imports a higher layer: {'; '.join(found)}"


def test_every_module_is_in_a_layer_that_says_what_it_may_import():
    loose = [m for m in MODULES if m.startswith("tuner.") and rank(m) < 0]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"
    for layer in LAYERS:
        doc = ast.get_docstring(parse(ROOT / "tuner" / layer / "__init__.py")) or ""
        assert "import" in doc, f"tuner/{layer}/__init__.py does not say what the layer may import"


def test_the_layer_check_finds_an_upward_import():
    code = ("from tuner.study.spec import StudySpec\n\n"
            "def f():\n    from tuner.cli import main\n    import tuner.core.errors\n")
    assert upward_imports("tuner.results.export", False, ast.parse(code)) == [
        "line 1: tuner.study.spec", "line 4: tuner.cli"]
