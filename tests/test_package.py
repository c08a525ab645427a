"""The package's shape: named errors for everything a user can cause, no optional package at import, modules
that import each other only downwards, and none over 400 lines."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from hf_trak import errors
from hf_trak.testing.processes import subprocess_env

PACKAGE = Path(errors.__file__).parent
ERROR_CLASSES = {name for name in errors.__all__}
# Raises that are not hf_trak's errors, and why each is right where it stands.
ALLOWED = {
    "argparse.ArgumentTypeError",  # an option's type function: argparse turns it into a usage error (exit 2)
}


def _modules(include_testing=False):
    for path in sorted(PACKAGE.rglob("*.py")):
        if include_testing or "testing" not in path.relative_to(PACKAGE).parts:
            yield path, ast.parse(path.read_text())


def _returns_error(tree: ast.Module, name: str) -> bool:
    """Whether ``name`` is a function of the module annotated to return one of the error classes."""
    return any(
        isinstance(node, ast.FunctionDef)
        and node.name == name
        and ast.unparse(node.returns or ast.Constant(None)) in ERROR_CLASSES
        for node in tree.body
    )


def test_every_raise_is_a_named_error():
    """Every ``raise`` in the runtime package raises a class of ``hf_trak.errors`` (or a function's result that
    is annotated as one), re-raises, or is one of ``ALLOWED``."""
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = ast.unparse(exc)
            if name in ERROR_CLASSES or name in ALLOWED or _returns_error(tree, name):
                continue
            if isinstance(node.exc, ast.Name) and name.islower():  # re-raising a caught error: raise error
                continue
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: raise {name}")
    assert not found, "raise statements outside hf_trak.errors:\n" + "\n".join(found)


def test_the_walk_finds_a_plain_error(tmp_path):
    """The check above fails on a module that raises a builtin (it is not vacuous)."""
    tree = ast.parse("def f(x):\n    raise ValueError('no')\n")
    raised = [ast.unparse(node.exc.func) for node in ast.walk(tree) if isinstance(node, ast.Raise)]
    assert raised == ["ValueError"] and "ValueError" not in ERROR_CLASSES | ALLOWED


def test_every_error_class_is_public():
    import hf_trak

    assert all(getattr(hf_trak, name) is getattr(errors, name) for name in errors.__all__)


def test_import_hf_trak_loads_no_optional_package():
    """``import hf_trak`` imports neither scikit-learn, Gradio, faiss nor the test helpers."""
    code = (
        "import sys, hf_trak; print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'gradio', 'faiss'}"
        " | {m for m in sys.modules if m.startswith(('hf_trak.testing', 'hf_trak.demo'))}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _imports(path: Path, tree: ast.Module):
    """The hf_trak modules a module imports (at any depth of its code, lazy imports included)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hf_trak"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                yield candidate if _module_path(candidate) else node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("hf_trak"))


def _module_path(name: str):
    relative = Path(*name.split(".")[1:])
    for path in (PACKAGE / relative.with_suffix(".py"), PACKAGE / relative / "__init__.py"):
        if path.is_file():
            return path
    return None


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph():
    return {
        _name(path): {m for m in _imports(path, tree) if _module_path(m) and m != _name(path)}
        for path, tree in _modules(include_testing=True)
    }


def _cycle(graph):
    """A cycle of ``graph`` ({node: successors}) as a list of nodes, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                return stack[stack.index(successor) :] + [successor]
            if successor not in state and (found := visit(successor)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package_graph(graph):
    """Imports between sub-packages (hf_trak.method, hf_trak.store, ...), the top-level modules left out, except
    from the sub-packages' point of view: a sub-package that imports ``hf_trak.traker`` depends on the top."""

    def group(name):
        parts = name.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 or _module_path(name).name == "__init__.py" else "hf_trak"

    packages = {}
    for module, imported in graph.items():
        if module == "hf_trak":  # the package's face only re-exports
            continue
        packages.setdefault(group(module), set()).update(group(m) for m in imported if group(m) != group(module))
    return packages


def test_no_import_cycle_between_modules():
    assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()))}"


def test_sub_packages_import_each_other_one_way():
    packages = _package_graph(_graph())
    packages.pop("hf_trak", None)  # the top-level modules (traker, cli...) use the sub-packages and the base
    base = {"hf_trak.errors", "hf_trak.arguments", "hf_trak.version"}
    assert _cycle({p: {m for m in ms if m in packages} for p, ms in packages.items()}) is None
    for package, imported in packages.items():
        assert not (imported - set(packages) - {"hf_trak"} - base), (package, imported)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400
