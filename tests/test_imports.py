"""gptjax's modules import one way: no circle in the graph of their imports, lazy ones (inside functions)
included, read from the source with ast (nothing is imported)."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gptjax"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the gptjax modules it imports anywhere in its source. A package's face (__init__) importing
    its children, and children importing from their package's face, are not edges (re-exports)."""
    mods = modules()

    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            targets |= {r for n in names if n.startswith("gptjax") and (r := resolve(n))}
        graph[mod] = {t for t in targets if t != mod and not (is_pkg and t.startswith(mod + "."))
                      and not (mods[t].name == "__init__.py" and mod.startswith(t + "."))}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's cycles, one per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_lazy_imports_and_circles():
    graph = import_graph()
    assert "gptjax.checkpoint" in graph["gptjax.weights.orbax_run"]  # imported inside functions only
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_gptjax_has_no_import_circle():
    assert circles(import_graph()) == []


# The weights modules: readers know no names, name tables know no files, and none imports a sibling of either.
READERS = ("torch_file", "safetensors_file", "tf_checkpoint", "orbax_run")
NAMINGS = ("book", "hf", "openai", "tree_names", "hf_gqa")


@pytest.mark.parametrize("module", READERS + NAMINGS)
def test_no_weights_module_imports_a_sibling_format(module):
    imported = import_graph()[f"gptjax.weights.{module}"]
    siblings = {f"gptjax.weights.{m}" for m in READERS + NAMINGS}
    assert not imported & siblings, sorted(imported & siblings)


def shims() -> set[str]:
    """``gptjax/<tool>.py``: what ``python -m gptjax.<tool>`` runs, only to hand over to ``gptjax.cli.<tool>``."""
    return {m for m, path in modules().items() if "command_shim(__name__" in path.read_text()}


def test_the_library_never_imports_the_command_line():
    graph = import_graph()
    library = [m for m in graph if not (m == "gptjax.cli" or m.startswith("gptjax.cli.")) and m not in shims()]
    assert {"gptjax.train", "gptjax.generate", "gptjax.serve"} <= shims()
    offenders = {m: sorted(t for t in graph[m] if t == "gptjax.cli" or t.startswith("gptjax.cli."))
                 for m in library}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_gptjax_generate_stays_the_function_whatever_is_imported():
    import importlib

    import gptjax
    from gptjax.sampling import generate

    for tool in sorted(shims()):
        importlib.import_module(tool.replace("gptjax.", "gptjax.cli.", 1))
        with pytest.raises(ImportError, match=rf"python -m {tool}"):
            importlib.import_module(tool)
    assert gptjax.generate is generate


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def flags_in_messages(path: Path) -> list[str]:
    """Command-line flags in a module's string literals other than docstrings (its messages)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [f"{path.name}:{node.lineno}: {match}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            for match in FLAG.findall(node.value)]


def test_library_messages_name_parameters_not_flags():
    """The library speaks Python: its errors name parameters (``data_dir``, ``overwrite=True``), and the
    command line's cli.error_line turns them into flags, in one place."""
    library = [m for m in modules() if not (m == "gptjax.cli" or m.startswith("gptjax.cli.")) and m not in shims()]
    assert [hit for m in library for hit in flags_in_messages(modules()[m])] == []
    assert flags_in_messages(PACKAGE / "cli" / "train.py")  # the check sees flags where they are
