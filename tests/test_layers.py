"""The layers of trainer/ and agentd/, kept by parsing every import (function-local ones too) with `ast`.

Fails, naming the cycle's modules or the offending file:line, on:
- an import cycle inside trainer/ or inside agentd/ (`from pkg import x` counts as importing `pkg` too:
  Python runs pkg/__init__.py first);
- trainer/ importing agentd/ (the trainer is a library; agentd is one of its users);
- agentd importing a trainer module other than the door and the vocabulary (AGENTD_MAY_IMPORT);
- production code (trainer/ outside trainer/dev, and agentd/) importing trainer.dev (DEV_ENTRY_POINTS
  are the exceptions);
- a trainer layer importing a layer above it (LAYERS, top to bottom, as the folders' docstrings say).

The checker itself is tested on small synthetic package trees, so it is shown to fail.
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The trainer's layers, top to bottom: a module may import its own layer and the layers below it. A module
# belongs to the longest prefix listed. The vocabulary (the root modules every layer may import) is last.
LAYERS = [
    ("face", ("trainer.cli", "trainer.api")),
    ("dev", ("trainer.dev",)),
    ("training", ("trainer.training",)),
    ("checks", ("trainer.checks",)),
    ("eval", ("trainer.eval",)),
    ("families", ("trainer.families",)),
    ("runs", ("trainer.runs",)),
    ("data", ("trainer.data",)),
    ("vocabulary", ("trainer", "trainer.config", "trainer.errors", "trainer.events", "trainer.yaml_schema",
                    "trainer.quiet", "trainer.gpus", "trainer.console")),
]
# What agentd may import of the trainer: the one door and the shared vocabulary.
AGENTD_MAY_IMPORT = ("trainer.api", "trainer.config", "trainer.errors", "trainer.events", "trainer.yaml_schema",
                     "trainer.gpus", "trainer.console")
# The dev entry points, which build the tiny demo: `agentd demo` and `lora-train make-demo` ARE trainer.dev's
# front doors, so they may import it (and agentd demo may, beside the door).
DEV_ENTRY_POINTS = ("agentd.commands.demo", "trainer.cli")


@dataclass(frozen=True)
class Import:
    importer: str   # dotted module name
    target: str     # dotted module name, resolved to a module of the scanned packages
    where: str      # file:line

    def __str__(self) -> str:
        return f"{self.where}: {self.importer} imports {self.target}"


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages under `root`."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(root: Path, packages: tuple[str, ...]) -> list[Import]:
    """Every import (module level, inside functions, under TYPE_CHECKING) of the packages' modules that
    names a module of the packages. `from a.b import c` imports a.b, and a.b.c when that is a module;
    relative imports are resolved against the importing module."""
    known = modules(root, packages)

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found = []
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            where = f"{path.relative_to(root)}:{node.lineno}"
            for target in dict.fromkeys(filter(None, map(resolve, names))):
                if target != module:
                    found.append(Import(module, target, where))
    return found


def cycles(edges: list[Import], package: str) -> list[list[str]]:
    """The import cycles among the modules of `package` (strongly connected components, Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if _inside(e.importer, package) and _inside(e.target, package):
            graph.setdefault(e.importer, set()).add(e.target)
            graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_of(module: str) -> tuple[int, str]:
    """(rank from the bottom, name) of a trainer module's layer: the longest LAYERS prefix it falls under."""
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if _inside(module, prefix)), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it to the table (and its folder's docstring)")
    i = best[1]
    return len(LAYERS) - 1 - i, LAYERS[i][0]


def problems(root: Path) -> list[str]:
    """Every layering rule broken under `root` (holding trainer/ and agentd/), one readable line each."""
    edges = imports(root, ("trainer", "agentd"))
    out = [f"import cycle in {package}/: {' -> '.join(c)}" for package in ("trainer", "agentd")
           for c in cycles(edges, package)]
    for e in edges:
        if _inside(e.importer, "trainer") and _inside(e.target, "agentd"):
            out.append(f"{e}: the trainer must not import agentd")
        if _inside(e.importer, "agentd") and _inside(e.target, "trainer") and e.target != "trainer" \
                and not any(_inside(e.target, m) for m in AGENTD_MAY_IMPORT) \
                and not (_inside(e.target, "trainer.dev") and e.importer in DEV_ENTRY_POINTS):
            out.append(f"{e}: agentd may import only {', '.join(AGENTD_MAY_IMPORT)} of the trainer")
        if _inside(e.target, "trainer.dev") and not _inside(e.importer, "trainer.dev") \
                and e.importer not in DEV_ENTRY_POINTS:
            out.append(f"{e}: production code must not import trainer.dev (tiny models and the demo)")
        if _inside(e.importer, "trainer") and _inside(e.target, "trainer"):
            (low, low_name), (high, high_name) = layer_of(e.importer), layer_of(e.target)
            if high > low:
                out.append(f"{e}: layer {low_name} imports layer {high_name}, which is above it")
    return out


def test_trainer_and_agentd_keep_their_layers():
    found = problems(ROOT)
    assert not found, "layering broken:\n" + "\n".join(found)


def test_every_trainer_module_is_in_a_layer():
    for module in modules(ROOT, ("trainer",)):
        layer_of(module)  # raises naming the module


# --- the checker on synthetic trees ------------------------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


CLEAN = {
    "trainer/__init__.py": "",
    "trainer/config.py": "from trainer.errors import Problem\n",
    "trainer/errors.py": "Problem = object\n",
    "trainer/data/__init__.py": "",
    "trainer/data/images.py": "from trainer.config import Problem\n",
    "trainer/families/__init__.py": "from trainer.families import sd\n",
    "trainer/families/sd.py": """\
        from trainer.data.images import Problem


        def load():
            from .sd_task import load  # a relative, function-local import of the heavy half
        """,
    "trainer/families/sd_task.py": "from trainer.families.lora import x\n\n\ndef load():\n    pass\n",
    "trainer/families/lora.py": "x = 1\n",
    "trainer/dev/__init__.py": "",
    "trainer/dev/tiny.py": "from trainer.config import Problem\n\nx = 1\n",
    "agentd/__init__.py": "",
    "agentd/scheduler.py": "from trainer.config import Problem\nfrom agentd import gate\n",
    "agentd/gate.py": "",
    "agentd/commands/__init__.py": "",
    "agentd/commands/demo.py": "def main():\n    from trainer.dev.tiny import x\n",
}


def test_checker_passes_a_clean_tree(tmp_path):
    assert problems(write_tree(tmp_path, CLEAN)) == []


def test_checker_finds_a_function_local_cycle(tmp_path):
    tree = write_tree(tmp_path, {**CLEAN, "trainer/families/lora.py": """\
        x = 1


        def f():
            from trainer.families.sd_task import y  # closes lora -> sd_task -> lora
        """})
    found = problems(tree)
    assert found == ["import cycle in trainer/: trainer.families.lora -> trainer.families.sd_task"], found


def test_checker_finds_a_cycle_through_a_package_init(tmp_path):
    """`from trainer.families import lora` in sd_task runs trainer/families/__init__.py, which imports sd."""
    tree = write_tree(tmp_path, {**CLEAN, "trainer/families/sd_task.py": "from trainer.families import lora\n"})
    found = problems(tree)
    assert found == ["import cycle in trainer/: trainer.families -> trainer.families.sd -> trainer.families.sd_task"], \
        found


def test_checker_finds_a_cycle_in_agentd(tmp_path):
    tree = write_tree(tmp_path, {**CLEAN, "agentd/gate.py": "import agentd.scheduler\n"})
    assert problems(tree) == ["import cycle in agentd/: agentd.gate -> agentd.scheduler"]


def test_checker_finds_an_upward_import_with_its_file_and_line(tmp_path):
    tree = write_tree(tmp_path, {**CLEAN, "trainer/data/images.py": """\
        from trainer.config import Problem


        def scan():
            from trainer.families.lora import x
        """})
    assert problems(tree) == ["trainer/data/images.py:5: trainer.data.images imports trainer.families.lora: "
                              "layer data imports layer families, which is above it"]


def test_checker_finds_the_trainer_importing_agentd_and_agentd_past_the_door(tmp_path):
    tree = write_tree(tmp_path, {**CLEAN, "trainer/config.py": "from trainer.errors import Problem\nimport agentd.gate\n",
                                 "agentd/gate.py": "from trainer.families import sd\n"})
    assert problems(tree) == [
        "trainer/config.py:2: trainer.config imports agentd.gate: the trainer must not import agentd",
        "agentd/gate.py:1: agentd.gate imports trainer.families: agentd may import only " + ", ".join(AGENTD_MAY_IMPORT)
        + " of the trainer",
        "agentd/gate.py:1: agentd.gate imports trainer.families.sd: agentd may import only "
        + ", ".join(AGENTD_MAY_IMPORT) + " of the trainer"]


def test_checker_finds_production_code_importing_dev(tmp_path):
    tree = write_tree(tmp_path, {**CLEAN, "trainer/families/lora.py": "from trainer.dev.tiny import x\n",
                                 "agentd/scheduler.py": "from trainer.config import Problem\nimport trainer.dev.tiny\n"})
    assert problems(tree) == [
        "trainer/families/lora.py:1: trainer.families.lora imports trainer.dev.tiny: production code must not "
        "import trainer.dev (tiny models and the demo)",
        "trainer/families/lora.py:1: trainer.families.lora imports trainer.dev.tiny: layer families imports "
        "layer dev, which is above it",
        "agentd/scheduler.py:2: agentd.scheduler imports trainer.dev.tiny: agentd may import only "
        + ", ".join(AGENTD_MAY_IMPORT) + " of the trainer",
        "agentd/scheduler.py:2: agentd.scheduler imports trainer.dev.tiny: production code must not import "
        "trainer.dev (tiny models and the demo)"]
