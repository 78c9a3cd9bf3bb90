#!/usr/bin/env python3
"""Prints the licence notices of every crate a package's binaries are built
from (normal and build dependencies, from Cargo.lock through `cargo
metadata`, for the platform built on), with each crate's licence files,
for the Debian packages
(usr/share/doc/PACKAGE/THIRD-PARTY-LICENSES).

Usage: packaging/licenses.py PACKAGE > THIRD-PARTY-LICENSES
"""
import json
import pathlib
import subprocess
import sys

NOTICE_FILES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "UNLICENSE")


def closure(metadata, root_name):
    """Ids of the packages `root_name` needs to build, itself excluded."""
    nodes = {node["id"]: node for node in metadata["resolve"]["nodes"]}
    root = next(p["id"] for p in metadata["packages"] if p["name"] == root_name)
    seen, todo = set(), [root]
    while todo:
        for dep in nodes[todo.pop()]["deps"]:
            kinds = {k["kind"] for k in dep["dep_kinds"]}
            if kinds & {None, "build"} and dep["pkg"] not in seen:
                seen.add(dep["pkg"])
                todo.append(dep["pkg"])
    return seen


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    rustc = subprocess.run(["rustc", "-vV"], check=True, capture_output=True, text=True)
    host = next(l.split()[1] for l in rustc.stdout.splitlines() if l.startswith("host:"))
    metadata = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", host],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    packages = {p["id"]: p for p in metadata["packages"]}
    members = set(metadata["workspace_members"])
    needed = sorted(
        (packages[i] for i in closure(metadata, sys.argv[1]) if i not in members),
        key=lambda p: (p["name"], p["version"]),
    )
    print(f"Third-party crates in {sys.argv[1]}, with their licences.\n")
    for package in needed:
        print("=" * 72)
        print(f"{package['name']} {package['version']}: {package.get('license') or 'see below'}")
        print("=" * 72)
        root = pathlib.Path(package["manifest_path"]).parent
        files = sorted(
            f for f in root.iterdir() if f.is_file() and f.name.upper().startswith(NOTICE_FILES)
        )
        for f in files:
            print(f"\n--- {f.name} ---\n")
            print(f.read_text(errors="replace").rstrip())
        if not files:
            print(f"\n(no licence file in the crate; licence: {package.get('license')})")
        print()


main()
