"""The package's layout, checked from the source: import analysers may not resolve pyproject's package-dir
mapping (edgerag.runtime -> runtime/, ...), so these tests resolve it themselves."""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "optimum"}


def package_files() -> dict[str, Path]:
    """Every module of the installed package by its dotted name, from pyproject's package-dir mapping."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    files = {}
    for package, folder in mapping.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            files[".".join([package, *parts])] = path
    return files


def imported_names(name: str, path: Path) -> set[str]:
    """Dotted names this module imports anywhere in it (inside functions too), relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([module] if module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> project modules it imports, project module -> top-level names of outside packages)."""
    files = package_files()

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in files:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    inside, outside = {}, {}
    for name, path in files.items():
        targets = imported_names(name, path)
        inside[name] = {r for r in map(resolve, targets) if r and r != name}
        outside[name] = {t.split(".")[0] for t in targets if not t.startswith("edgerag") and t}
    return inside, outside


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def test_the_walk_sees_the_whole_package():
    files = package_files()
    assert {"edgerag.cli", "edgerag.runtime.pipeline", "edgerag.runtime.manifest", "edgerag.export.bundle",
            "edgerag.benchmarks.bench"} <= set(files)
    inside, _ = import_graph()
    assert "edgerag.runtime.manifest" in inside["edgerag.runtime.pipeline"]


def test_the_walk_finds_a_circle_and_imports_inside_functions(tmp_path):
    second = tmp_path / "second.py"
    second.write_text("def later():\n    from edgerag import first\n")
    graph = {"edgerag.first": {"edgerag.second"}, "edgerag.second": set()}
    assert circles(graph) == []
    graph["edgerag.second"] = {n for n in imported_names("edgerag.second", second) if n != "edgerag"}
    assert circles(graph) == [["edgerag.first", "edgerag.second"]]


def test_no_import_circle():
    inside, _ = import_graph()
    assert circles(inside) == []


def test_the_runtime_needs_no_torch_transformers_or_optimum_at_any_depth():
    inside, outside = import_graph()
    for module in (m for m in inside if m.startswith("edgerag.runtime")):
        for reached in reachable(inside, module):
            assert not outside[reached] & HEAVY, f"{module} reaches {reached}, which imports {outside[reached] & HEAVY}"
            assert not reached.startswith(("edgerag.train", "edgerag.export", "edgerag.benchmarks")), \
                f"{module} reaches {reached}: data flows from train/ and export/ to the runtime, never back"


def test_a_regular_install_is_not_shadowed_by_the_checkout(tmp_path):
    """`pip install .` then `python -c "import edgerag.runtime"` from the repository root finds the installed
    package: no folder at the root is named like the package."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    wheel, = wheel_dir.glob("edgerag-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    # the current directory comes first on sys.path, before the installed copy (PYTHONPATH)
    probe = subprocess.run([sys.executable, "-c", "import edgerag.runtime, edgerag.cli; print(edgerag.runtime.__file__)"],
                           cwd=ROOT, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(target)
