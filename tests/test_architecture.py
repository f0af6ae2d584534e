"""The layering of docs/architecture.md, checked on the source: no import circle, no arrow back up to tasks/, and
sae-lens reached only through mlalign/saes/.

Every `import mlalign...` counts, at module level or inside a function (a lazy import is still a dependency)."""

import ast
from pathlib import Path

import mlalign

PACKAGE = Path(mlalign.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from mlalign.tasks import analyze` names a module; `from mlalign.io import x` names a member.
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("mlalign") and target != name and target != "mlalign":
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    # A package's __init__ re-exporting its own modules is not a circle of ideas: leave those edges out.
    graph = {m: {t for t in targets if not (m.count(".") and t == m.rpartition(".")[0])}
             for m, targets in import_graph().items()}
    assert _cycles(graph) == []


def test_nothing_below_tasks_imports_a_task():
    graph = import_graph()
    upward = sorted((m, t) for m, targets in graph.items() if not m.startswith("mlalign.tasks")
                    for t in targets if t.startswith("mlalign.tasks"))
    assert upward == []


def test_the_graph_sees_lazy_imports():
    """The check can fail: a function-level import is an edge (train's measurement reads analysis.sources)."""
    assert "mlalign.analysis.sources" in import_graph()["mlalign.tasks.train"]


SAE_LENS_ELSEWHERE = {
    "mlalign.bench.contenders": "the benchmark's sae-lens contender: HookedSAETransformer, what it is compared against",
    "mlalign.bench.workload": "the benchmark's workload is sae-lens's own JumpReLUSAE, which every contender runs",
}
"""Modules outside mlalign/saes/ that import sae_lens, each with its reason (docs/architecture.md)."""


def sae_lens_importers() -> set[str]:
    """Modules with an `import sae_lens...` or `from sae_lens... import` anywhere in their source."""
    out = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(name == "sae_lens" or name.startswith("sae_lens.") for name in names):
                out.add(_module_name(path))
    return out


def test_only_the_saes_package_reaches_into_sae_lens():
    importers = sae_lens_importers()
    assert "mlalign.saes.loading" in importers  # the check sees function-level imports
    assert {m for m in importers if m != "mlalign.saes" and not m.startswith("mlalign.saes.")} == set(SAE_LENS_ELSEWHERE)


LEAF_MODULES = {f"mlalign.{name}" for name in ("errors", "io", "languages", "config", "console", "models", "tracking",
                                                "gguf")}


def test_the_saes_package_rests_on_leaf_modules_only():
    """saes/ sits below analysis/, data/ and testbed/ (which use it) and above the leaf modules only."""
    graph = import_graph()
    below = {t for m, targets in graph.items() if m == "mlalign.saes" or m.startswith("mlalign.saes.")
             for t in targets if t != "mlalign.saes" and not t.startswith("mlalign.saes.")}
    assert below and below <= LEAF_MODULES
