"""Regenerate the rule lists of ``docs/semantics.md`` from the case registry.

    python -m conformance.semantics_doc          # rewrite docs/semantics.md
    python -m conformance.semantics_doc --check  # exit 1 if it is out of date

The hand-written parts stay: the preamble, the paragraph under each category heading and
the "Results on this machine" section. Each case becomes one line: its id (linked to the
case's source line), its one-sentence rule, its required capabilities or extension flag,
and Ray Train's observed behaviour where it differs.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import sys

import conformance
from conformance.case import CATEGORIES, REGISTRY

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "semantics.md")
RESULTS = "## Results on this machine"


def _title(text: str) -> str:
    return text[0].upper() + text[1:]


def render(src: str) -> str:
    intros = {}
    for key, title in CATEGORIES.items():
        head = f"## {_title(title)}\n\n"
        i = src.index(head) + len(head)
        intros[key] = src[i:src.index("\n\n", i)]
    preamble = src[:src.index(f"## {_title(next(iter(CATEGORIES.values())))}")]
    where = {}
    for m in pkgutil.iter_modules(conformance.__path__):
        if m.name.startswith("test_"):
            mod = importlib.import_module("conformance." + m.name)
            for f in vars(mod).values():
                info = getattr(f, "conformance_case", None)
                if info:
                    where[info.id] = (f"../conformance/{m.name}.py", inspect.getsourcelines(f)[1])
    out = [preamble.rstrip("\n"), ""]
    for key, title in CATEGORIES.items():
        out += [f"## {_title(title)}", "", intros[key], ""]
        for c in sorted((c for c in REGISTRY.values() if c.category == key), key=lambda c: c.id):
            path, line = where[c.id]
            tags = (["needs " + ", ".join(c.requires)] if c.requires else []) + (["extension"] if c.extension else [])
            suffix = f" *({'; '.join(tags)})*" if tags else ""
            out.append(f"- [**{c.id}**]({path}#L{line}) {c.statement}{suffix}")
            out += [f"  - Ray Train: {d.reason}" for d in c.divergences]
        out.append("")
    tail = src[src.index(RESULTS):] if RESULTS in src else ""
    return "\n".join(out) + ("\n" + tail if tail else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/semantics.md is out of date")
    args = p.parse_args(argv)
    with open(DOC) as f:
        src = f.read()
    new = render(src)
    if args.check:
        if new != src:
            print(f"{DOC} is out of date: run python -m conformance.semantics_doc", file=sys.stderr)
            return 1
        return 0
    with open(DOC, "w") as f:
        f.write(new)
    print(f"{len(REGISTRY)} cases written to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
