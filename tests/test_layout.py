"""The layout holds still: the top level is the entry points and the training core only, infrastructure and evaluation
live in their folders, the project's modules import each other without a cycle, and losses.py needs only the
standard library and torch (it works copied alone). Imports are read from the source (ast), nothing is imported."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"train.py", "evaluate.py", "generate.py"}
CORE = {"model.py", "logprobs.py", "packing.py", "losses.py", "data.py", "batches.py", "chat.py", "refcache.py"}
PACKAGES = {"infra": {"__init__.py", "cli.py", "flags.py", "recipes.py", "checkpoint.py", "distributed.py", "plan.py",
                      "tracking.py", "provenance.py", "weights.py", "hub.py", "precision.py"},
            "evaluation": {"__init__.py", "judge.py", "winrate.py", "mt_bench.py", "report.py"}}


def project_modules() -> dict[str, Path]:
    """Module name -> file, for the top-level modules and the two packages."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in PACKAGES:
        mods |= {pkg if p.stem == "__init__" else f"{pkg}.{p.stem}": p for p in (ROOT / pkg).glob("*.py")}
    return mods


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules that `path` imports, anywhere in the file (function-level imports included):
    `import a.b`, `from a import b` (b a module, or a name in module a) and `from a.b import c`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in known}


def test_the_top_level_holds_the_entry_points_and_the_core_only():
    assert {p.name for p in ROOT.glob("*.py")} == ENTRY_POINTS | CORE
    for pkg, files in PACKAGES.items():
        assert {p.name for p in (ROOT / pkg).glob("*.py")} == files, pkg
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(PACKAGES)


def test_the_import_graph_has_no_cycle():
    """Depth-first search over the project's import graph; a back edge is a cycle, reported with its path."""
    mods = project_modules()
    graph = {name: imports(path, set(mods)) - {name} for name, path in mods.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            assert state.get(n) != "open", "import cycle: " + " -> ".join(stack[stack.index(n):] + [n])
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The graph reader sees both import forms, so a data <-> refcache cycle like the one there was would show."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from infra.cli import UserError\n    from a import x\n")
    known = {"a", "b", "infra", "infra.cli"}
    assert imports(tmp_path / "a.py", known) == {"b"}
    assert imports(tmp_path / "b.py", known) == {"a", "infra.cli"}


def test_losses_imports_only_the_standard_library_and_torch():
    tree = ast.parse((ROOT / "losses.py").read_text(encoding="utf-8"))
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots - set(sys.stdlib_module_names) == {"torch"}
