"""No import cycles between medldm's packages, counting imports inside functions (they hide cycles, they do
not remove them). ``medldm/__init__.py`` is left out: it is the public facade that re-exports lazily."""

import ast
from collections import defaultdict
from pathlib import Path

import medldm

ROOT = Path(medldm.__file__).parent


def _unit(module: str) -> str | None:
    """The package (or top-level module) of medldm that ``module`` belongs to: medldm.sampling.x -> sampling."""
    parts = module.split(".")
    return parts[1] if parts[0] == "medldm" and len(parts) > 1 else None


def _imports(path: Path, package: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.add(module)
            if module == "medldm":  # from medldm import io -> the io package; __version__ etc. are the facade
                out.update(f"medldm.{a.name}" for a in node.names if (ROOT / a.name).is_dir())
    return out


def package_graph() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts == ("medldm", "__init__"):
            continue
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if parts[-1] == "__init__" else module.rsplit(".", 1)[0]
        for target in _imports(path, package):
            a, b = _unit(module), _unit(target)
            if b and a != b:
                graph[a].add(b)
    return graph


def _cycle_from(graph, start):
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_no_import_cycles_between_packages():
    graph = package_graph()
    assert graph["sampling"] and graph["serving"]  # the scan sees the imports it is meant to check
    cycles = [" -> ".join(c) for c in (_cycle_from(graph, n) for n in sorted(graph)) if c]
    assert not cycles, f"import cycles between medldm packages: {cycles}"
