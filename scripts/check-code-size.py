#!/usr/bin/env python3
"""Fails when a file of a crate holds more than 500 lines before its unit
tests, or a function more than 80 lines.

Usage: scripts/check-code-size.py CRATE_SRC_DIR [...]

A function runs from its `fn` line to the closing brace at the same
indentation; unit tests (`#[cfg(test)]` onwards) are not counted.
"""
import pathlib
import re
import sys

MAX_FILE = 500
MAX_FN = 80
FN = re.compile(r"^(\s*)(?:pub(?:\([a-z]+\))? )?(?:async )?(?:const )?fn (\w+)")


def problems(path):
    lines = path.read_text().split("\n")
    code = next(
        (i for i, line in enumerate(lines) if line.startswith("#[cfg(test)]")),
        len(lines),
    )
    if code > MAX_FILE:
        yield f"{path}: {code} lines before its tests (at most {MAX_FILE})"
    for start, line in enumerate(lines[:code]):
        match = FN.match(line)
        if not match:
            continue
        end = next(
            (i for i in range(start + 1, code) if lines[i] == match.group(1) + "}"),
            start,
        )
        if end - start + 1 > MAX_FN:
            yield f"{path}:{start + 1}: fn {match.group(2)} is {end - start + 1} lines (at most {MAX_FN})"


def main():
    found = [p for root in sys.argv[1:] for f in sorted(pathlib.Path(root).rglob("*.rs")) for p in problems(f)]
    for problem in found:
        print(problem)
    if not found:
        print(f"{', '.join(sys.argv[1:])}: files and functions within size")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
