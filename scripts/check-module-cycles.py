#!/usr/bin/env python3
"""Fails when the modules of a crate import each other in a circle.

Usage: scripts/check-module-cycles.py CRATE_SRC_DIR [...]

A module is a top-level file of src/ (foo.rs, with foo/ beneath it); an
edge A -> B is any `crate::B` path in A's files (use lines, and paths in
code; comments and unit tests are not read). Prints the dependency order, or every cycle found, and exits 1 on
a cycle. Dependencies must run one way (docs/ARCHITECTURE.md).
"""
import pathlib
import re
import sys

PATH = re.compile(r"\bcrate::(?:\{([^}]*)\}|([a-z_][a-z0-9_]*))")


def modules(src):
    """Top-level module name -> the text of its files."""
    found = {}
    for path in sorted(src.rglob("*.rs")):
        relative = path.relative_to(src)
        name = relative.parts[0].removesuffix(".rs")
        if name in ("lib", "main"):
            continue
        # Unit tests may reach anywhere; production code may not.
        code = path.read_text().split("#[cfg(test)]")[0]
        found[name] = found.get(name, "") + code
    return found


def edges(found):
    graph = {name: set() for name in found}
    for name, text in found.items():
        # Doc and other comments name modules without depending on them.
        text = re.sub(r"//[^\n]*", "", text)
        for group, single in PATH.findall(text):
            targets = [single] if single else [
                part.strip().split("::")[0] for part in group.split(",")
            ]
            for target in targets:
                if target in graph and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph):
    """Strongly connected components with more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def order(graph):
    """Modules from the bottom (no dependencies) up."""
    placed, result = set(), []
    while len(placed) < len(graph):
        layer = sorted(n for n in graph if n not in placed and graph[n] <= placed)
        result.append(layer)
        placed.update(layer)
    return result


def main(dirs):
    if not dirs:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 64
    failed = False
    for directory in dirs:
        graph = edges(modules(pathlib.Path(directory)))
        found = cycles(graph)
        if found:
            failed = True
            for component in found:
                links = ", ".join(
                    f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component
                )
                print(f"{directory}: modules in a cycle: {' '.join(component)} ({links})")
        else:
            layers = " | ".join(" ".join(layer) for layer in order(graph))
            print(f"{directory}: no module cycle; bottom up: {layers}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
