"""The house (issue 16): arrows point down, no import circles, and everything fits on a screen.

The package's own imports are read with `ast` (every `import` and `from … import`, inside functions and under
`TYPE_CHECKING` too), so a lazy import cannot hide an upward arrow or a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "digseg_cli"
# Layer of each room: an import may only point to a lower layer or within its own room.
LAYERS = {
    "errors": 0,
    "files": 0.5,  # how files are written and opened: over errors, under everything else
    "typecheck": 0.5,  # what a settings value must be: beside files
    "_version": 0,
    "core": 1,
    "weights": 2,
    "models": 3,
    "inference": 4,
    "data": 5,
    "evaluate": 6,
    "segment": 6,
    "doctor": 6,  # looks at the machine through weights, inference and data; beside segment and evaluate
    "train": 7,
    "cli": 8,
    "__main__": 9,
}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400
MAX_POSITIONAL = 6
TABLE_MODULES = {"digseg_cli.data.benchmarks.classnames"}  # class-name tables: data, not code


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The digseg modules `name` imports: `from pkg import sub` counts as `pkg.sub` when that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("digseg_cli"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("digseg_cli"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return found - {name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_tree_is_the_table_of_contents():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "_version.py", "errors.py", "files.py", "typecheck.py"], top
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert folder.name in LAYERS, f"{folder.name}/ has no layer in this test: give it one"
        init = folder / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{folder.name}/ needs a docstring"


def test_every_module_says_its_job():
    missing = [name for name, path in MODULES.items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


def test_core_imports_nothing_of_digseg():
    wrong = {
        m: sorted(d)
        for m, d in GRAPH.items()
        if _room(m) == "core" and any(not x.startswith("digseg_cli.core") for x in d)
    }
    assert not wrong, wrong


def test_imports_point_down():
    upward = []
    for module, deps in GRAPH.items():
        room = _room(module)
        if room == "__init__":
            continue  # the package's lazy `load_pipeline` re-export, checked below
        for dep in deps:
            target = _room(dep)
            if target == "__init__":
                upward.append(f"{module} imports the package __init__ ({dep}); import the module itself")
            elif target != room and LAYERS[target] >= LAYERS[room]:
                upward.append(f"{module} ({room}, layer {LAYERS[room]}) → {dep} ({target}, layer {LAYERS[target]})")
    assert not upward, "\n".join(upward)


def test_only_the_cli_imports_the_cli():
    wrong = [
        m for m, deps in GRAPH.items() if any(_room(d) == "cli" for d in deps) and _room(m) not in ("cli", "__main__")
    ]
    assert not wrong, wrong


def test_no_import_circle():
    """Depth-first search over the module graph (package `__init__`s included: importing a submodule runs them)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for module in sorted(GRAPH):
        if module not in state and (circle := visit(module)):
            pytest.fail("import circle: " + " → ".join(circle))


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _is_typer_option(arg: ast.arg) -> bool:
    """A Typer command's `Annotated[..., typer.Option(...)]` parameters are its declared options, not a call list."""
    return arg.annotation is not None and "typer." in ast.unparse(arg.annotation)


def test_everything_fits_on_a_screen():
    too_long, too_many = [], []
    for name, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES and name not in TABLE_MODULES:
            too_long.append(f"{name}: {lines} lines")
        for fn in _functions(ast.parse(path.read_text())):
            body = fn.body[1:] if ast.get_docstring(fn) else fn.body
            length = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            if length > MAX_FUNCTION_LINES:
                too_long.append(f"{name}.{fn.name}: body of {length} lines")
            positional = [
                a
                for a in fn.args.posonlyargs + fn.args.args
                if a.arg not in ("self", "cls") and not _is_typer_option(a)
            ]
            if len(positional) > MAX_POSITIONAL:
                too_many.append(f"{name}.{fn.name}: {len(positional)} positional parameters")
    assert not too_long + too_many, "\n".join(too_long + too_many)


def test_only_the_cli_imports_typer_and_rich():
    wrong = []
    for name, path in MODULES.items():
        if _room(name) in ("cli", "__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            wrong += [f"{name} imports {n}" for n in names if n.split(".")[0] in ("typer", "rich", "click")]
    assert not wrong, wrong
