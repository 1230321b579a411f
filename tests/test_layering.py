"""The package's layers hold: a walk over every import (ast, function-level ones included).

    leaf     errors registry axes tree tokenizer_files hub file_modes  import nothing of jaxtrain
             but leaf
    engine   config mesh state step optim checkpoint trainer writers hooks task evaluator
             workdir loss_scale -> leaf (never a task, model, loss, data, hf or LoRA module)
    losses, metrics  -> leaf            models -> leaf, models        hf -> leaf, models, hf
    data     -> leaf, config, data (never a model)
    tasks    tasks/*, evaluators/*, lora, grad_cache, weights, generate/* -> all of the above
    face     main, api, cli, export/*, sweep/*, lr_find, report, run_end, generate/cli,
             generate/__main__, the package root -> anything

Also: no import cycles between modules, no private name (`_x`) imported from or read off another
module, and no module imports the package root. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
import os
import shutil
from collections import defaultdict

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxtrain")

LAYERS = {
    "leaf": ["errors", "registry", "axes", "tree", "tokenizer_files", "hub", "file_modes"],
    "engine": ["config", "mesh", "state", "step", "optim", "checkpoint", "trainer", "writers",
               "hooks", "task", "evaluator", "workdir", "loss_scale", "offload", "memory",
               "prefetch", "trackers", "epochs", "console"],
    "losses": ["losses"],
    "metrics": ["metrics"],
    "models": ["models"],
    "hf": ["hf"],
    "data": ["data"],
    "tasks": ["tasks", "evaluators", "lora", "grad_cache", "weights", "generate"],
    "face": ["__init__", "main", "api", "cli", "export", "sweep", "lr_find", "generate.cli",
             "report", "run_end",
             "data.prepare",
             "generate.__main__"],
}
ALLOWED = {
    "leaf": {"leaf"},
    "engine": {"leaf", "engine"},
    "losses": {"leaf", "losses"},
    "metrics": {"leaf", "metrics"},
    "models": {"leaf", "models"},
    "hf": {"leaf", "models", "hf"},
    "data": {"leaf", "data", "engine:config"},
    "tasks": {"leaf", "engine", "losses", "metrics", "models", "hf", "data", "tasks"},
    "face": set(LAYERS),
}


def module_name(path: str, root: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def layer_of(module: str) -> str | None:
    """The layer of a module: its own entry (`generate.cli`), else its top package's."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for name in (".".join(parts[1:3]), top):
        layer = next((layer for layer, names in LAYERS.items() if name in names), None)
        if layer is not None:
            return layer
    return None


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan(root: str) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> jaxtrain modules it imports, private-name violations)."""
    modules = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                modules[module_name(path, root)] = path
    imports: dict[str, set[str]] = defaultdict(set)
    private: list[str] = []
    for mod, path in modules.items():
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        is_package = path.endswith("__init__.py")
        aliases: dict[str, str] = {}  # local name -> jaxtrain module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("jaxtrain"):
                        imports[mod].add(a.name)
                        if a.asname:
                            aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_package, node)
                if not target.startswith("jaxtrain"):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in modules:  # `from jaxtrain.data import text`: a module
                        imports[mod].add(sub)
                        aliases[a.asname or a.name] = sub
                    else:
                        imports[mod].add(target)
                        if a.name.startswith("_") and not a.name.startswith("__") and \
                                target != mod:
                            private.append(f"{mod} imports private {target}.{a.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in aliases and node.attr.startswith("_") and \
                    not node.attr.startswith("__") and aliases[node.value.id] != mod:
                private.append(f"{mod} reads private {aliases[node.value.id]}.{node.attr}")
    return {m: {i for i in imports[m] if i in modules} for m in modules}, private


def violations(root: str = PACKAGE) -> list[str]:
    graph, out = scan(root)
    for mod, targets in sorted(graph.items()):
        layer = layer_of(mod)
        if layer is None:
            out.append(f"{mod} is in no layer: add it to LAYERS in tests/test_layering.py")
            continue
        for target in sorted(targets):
            if target == "jaxtrain" and layer != "face":
                out.append(f"{mod} imports the package root 'jaxtrain' (import the module)")
                continue
            t_layer = layer_of(target)
            top = target.split(".")[1] if "." in target else "__init__"
            allowed = ALLOWED[layer]
            if t_layer not in allowed and f"{t_layer}:{top}" not in allowed:
                out.append(f"{mod} ({layer}) imports {target} ({t_layer}): not allowed")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, on, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w == v or w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    # Package roots re-export their modules: `a/__init__` <-> `a.b` is not a cycle of design.
    return [c for c in found if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]


def test_layers_hold():
    found = violations()
    assert not found, "Layering violations:\n  " + "\n  ".join(found)


@pytest.mark.parametrize("module,line,expected", [
    ("trainer.py", "from jaxtrain.tasks import clip", "jaxtrain.trainer (engine) imports "
     "jaxtrain.tasks.clip (tasks)"),
    ("losses/lm.py", "from jaxtrain import mesh", "jaxtrain.losses.lm (losses) imports "
     "jaxtrain.mesh (engine)"),
    ("models/clip.py", "from jaxtrain.losses import contrastive", "jaxtrain.models.clip (models)"
     " imports jaxtrain.losses.contrastive (losses)"),
    ("data/text.py", "from jaxtrain.models import llama", "jaxtrain.data.text (data) imports "
     "jaxtrain.models.llama (models)"),
    ("checkpoint.py", "from jaxtrain.lora import merge", "jaxtrain.checkpoint (engine) imports "
     "jaxtrain.lora (tasks)"),
    ("tasks/dpo.py", "from jaxtrain.writers import _fmt", "imports private jaxtrain.writers._fmt"),
    ("tree.py", "import jaxtrain.axes as ax\nx = ax._hidden",
     "reads private jaxtrain.axes._hidden"),
    ("errors.py", "from jaxtrain import registry", "import cycle"),
    ("errors.py", "def f():\n    from jaxtrain.registry import Registry", "import cycle"),
])
def test_a_forbidden_import_is_named(tmp_path, module, line, expected):
    """The check fails, naming the arrow, when a forbidden import is added (even one inside a
    function, as lazy imports are)."""
    root = tmp_path / "jaxtrain"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    assert not violations(str(root))
    with open(root / module, "a") as f:
        f.write("\n" + line + "\n")
    found = violations(str(root))
    assert any(expected in v for v in found), found
