#!/usr/bin/env python3
"""Lists import cycles between the modules of a Rust crate (`scripts/modcycles.py gateway/src`).

Every `crate::a::b…`, `super::…` and `self::…` path in a module's file is an edge from that module to
the deepest module the path names (a path into an item of a module counts as that module). A
parent declaring `mod child;` is not an edge; a parent using `child::x` is. Exits 1 when a cycle
exists, printing each strongly connected set of modules; `--verbose` prints the edges.
"""
import re
import sys
from pathlib import Path


def modules(src: Path):
    mods = {}
    for f in sorted(src.rglob("*.rs")):
        rel = f.relative_to(src).with_suffix("")
        parts = list(rel.parts)
        if parts in (["lib"], ["main"]):
            parts = []
        elif parts and parts[-1] == "mod":
            parts = parts[:-1]
        mods[tuple(parts)] = f
    return mods


def strip(text: str) -> str:
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(\\.|[^"\\])*"', '""', text)


def resolve(mods, here, path):
    segs = path.split("::")
    if segs[0] == "crate":
        base, rest = (), segs[1:]
    elif segs[0] == "self":
        base, rest = here, segs[1:]
    else:
        base, rest = here, segs
        while rest and rest[0] == "super":
            base, rest = base[:-1], rest[1:]
    cur = base
    for s in rest:
        if cur + (s,) in mods:
            cur = cur + (s,)
        else:
            break
    return cur


def edges(mods):
    out = {m: set() for m in mods}
    pat = re.compile(r"\b((?:crate|super|self)(?:::\w+)+)")
    group = re.compile(r"\b((?:crate|super|self)(?:::\w+)*)::\{([^}]*)\}")
    for m, f in mods.items():
        text = strip(f.read_text())
        # Strip #[cfg(test)] mod tests { ... } blocks at the end of files: tests may use anything.
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests\s*\{", text)[0]
        paths = set(pat.findall(text))
        for prefix, inner in group.findall(text):
            for item in inner.split(","):
                item = item.strip().split(" as ")[0].strip()
                if item and item != "self":
                    paths.add(f"{prefix}::{item}")
                elif item == "self":
                    paths.add(prefix)
        for p in paths:
            t = resolve(mods, m, p)
            if t != m and t != ():
                # A module using its own descendant through `self::child` is fine both ways.
                out[m].add(t)
    return out


def sccs(graph):
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if not args:
        print(__doc__.strip())
        return 2
    bad = 0
    for src in args:
        mods = modules(Path(src))
        g = edges(mods)
        name = lambda m: "::".join(m) or "crate"
        if "--verbose" in sys.argv:
            for m in sorted(g):
                print(f"{name(m)} -> {', '.join(sorted(name(t) for t in g[m]))}")
        cycles = [c for c in sccs(g) if len(c) > 1]
        for c in cycles:
            print(f"{src}: import cycle between: {', '.join(sorted(name(m) for m in c))}")
        bad += len(cycles)
        if not cycles:
            print(f"{src}: {len(mods)} modules, no import cycle")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
