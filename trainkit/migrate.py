"""Rewrite a Ray Train V2 program to use trainkit: ``python -m trainkit.migrate FILE ...``.

The rewrite is the import swap of docs/tutorial.md, done on Python tokens (never inside
strings or comments) so that both import styles work afterwards:

* ``import ray.train`` / ``import ray.train.torch [as t]`` -> ``import trainkit`` /
  ``import trainkit.torch [as t]`` (plus ``import ray`` when the file still uses ``ray``
  for Ray Data or Ray core, since ``import ray.train`` also bound the name ``ray``);
* ``from ray.train[.torch|.lightning|...] import ...`` -> ``from trainkit[...] import ...``;
* ``from ray import train`` -> ``import trainkit as train`` (other names of that import stay
  a ``from ray import ...``);
* ``ray.train.X`` in code -> ``trainkit.X``, and an ``import trainkit`` is added after the
  file's first ``import ray`` (at its indentation) when nothing binds ``trainkit`` yet:
  the common ``import ray`` ... ``ray.train.report(...)`` pattern.

``rewrite(source) -> (new_source, changes)`` is the pure part (a list of
``Change(line, before, after)``); the command rewrites files in place, or with ``--diff``
prints a unified diff and writes nothing, or with ``--check`` exits 1 when a file would
change (for CI). Never imports Ray. Runs in the user's shell process.
"""

from __future__ import annotations

import difflib
import io
import os
import sys
import tokenize
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple



@dataclass(frozen=True)
class Change:
    line: int  # 1-based line of the source the change starts on
    before: str
    after: str


@dataclass
class _Tok:
    type: int
    string: str
    start: Tuple[int, int]
    end: Tuple[int, int]
    line: str


def _tokens(source: str) -> List[_Tok]:
    return [_Tok(t.type, t.string, t.start, t.end, t.line)
            for t in tokenize.generate_tokens(io.StringIO(source).readline)]


def _offsets(source: str) -> List[int]:
    starts, pos = [0, 0], 0  # line numbers are 1-based
    for line in source.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    return starts


_SKIP = (tokenize.NL, tokenize.COMMENT)


def _statements(toks: List[_Tok]) -> List[List[_Tok]]:
    """Logical lines (without NL/comment tokens), as token lists."""
    out, cur = [], []
    for t in toks:
        if t.type in _SKIP:
            continue
        if t.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            if cur:
                out.append(cur)
            cur = []
        elif t.type not in (tokenize.INDENT, tokenize.DEDENT):
            cur.append(t)
    if cur:
        out.append(cur)
    return out


def _dotted_at(stmt: List[_Tok], i: int) -> Tuple[str, int]:
    """The dotted name starting at token ``i`` and the index after it."""
    parts = [stmt[i].string]
    j = i + 1
    while j + 1 < len(stmt) and stmt[j].string == "." and stmt[j + 1].type == tokenize.NAME:
        parts.append(stmt[j + 1].string)
        j += 2
    return ".".join(parts), j


def _swap(dotted: str) -> Optional[str]:
    """``ray.train[.sub...]`` -> ``trainkit[.sub...]``; None for anything else."""
    if dotted == "ray.train":
        return "trainkit"
    if dotted.startswith("ray.train."):
        return "trainkit." + dotted[len("ray.train."):]
    return None


def _import_aliases(stmt: List[_Tok], start: int) -> List[Tuple[str, Optional[str]]]:
    """``[(dotted, alias or None)]`` of ``a.b as c, d`` from token ``start`` to the statement's end."""
    out: List[Tuple[str, Optional[str]]] = []
    name, alias, after_as = "", None, False
    for t in stmt[start:] + [None]:
        if t is None or t.string == ",":
            if name:
                out.append((name, alias))
            name, alias, after_as = "", None, False
        elif t.string in ("(", ")", "\\"):
            continue
        elif t.type == tokenize.NAME and t.string == "as":
            after_as = True
        elif after_as:
            alias = t.string
        else:
            name += t.string
    return out


def _binds(stmts: List[List[_Tok]], name: str) -> bool:
    for s in stmts:
        w = [t.string for t in s]
        if w[0] == "import":
            for dotted, alias in _import_aliases(s, 1):
                if (alias or dotted.split(".")[0]) == name:
                    return True
        elif w[0] == "from" and "import" in w:
            for dotted, alias in _import_aliases(s, w.index("import") + 1):
                if (alias or dotted) == name:
                    return True
    return False


def rewrite(source: str) -> Tuple[str, List[Change]]:
    """The migrated source and what changed. Raises ``SyntaxError`` for source Python cannot tokenize."""
    try:
        toks = _tokens(source)
    except (tokenize.TokenError, IndentationError) as e:
        raise SyntaxError(f"cannot tokenize the source: {e}") from None
    starts = _offsets(source)
    edits: List[Tuple[int, int, str]] = []  # (start offset, end offset, replacement)
    changes: List[Change] = []
    stmts = _statements(toks)
    uses_ray_train_attr = False
    first_import_ray: Optional[_Tok] = None
    import_stmt_ids = set()

    def off(pos: Tuple[int, int]) -> int:
        return starts[pos[0]] + pos[1]

    def replace(a: _Tok, b: _Tok, text: str) -> None:
        before = source[off(a.start):off(b.end)]
        if before != text:
            edits.append((off(a.start), off(b.end), text))
            changes.append(Change(a.start[0], before, text))

    for s in stmts:
        w = [t.string for t in s]
        if w[0] == "import":
            import_stmt_ids.add(id(s))
            aliases = _import_aliases(s, 1)
            if any(d == "ray" for d, a in aliases) and first_import_ray is None:
                first_import_ray = s[0]
            if not any(_swap(d) for d, _ in aliases):
                continue
            new = [f"{_swap(d) or d}" + (f" as {a}" if a else "") for d, a in aliases]
            replace(s[0], s[-1], "import " + ", ".join(new))
        elif w[0] == "from" and len(s) > 3:
            import_stmt_ids.add(id(s))
            dotted, j = _dotted_at(s, 1)
            if j >= len(s) or s[j].string != "import":
                continue
            target = _swap(dotted)
            if target is not None:
                replace(s[1], s[j - 1], target)
            elif dotted == "ray":
                aliases = _import_aliases(s, j + 1)
                train = [(d, a) for d, a in aliases if d == "train"]
                if train:
                    rest = [(d, a) for d, a in aliases if d != "train"]
                    new = [f"import trainkit as {train[0][1] or 'train'}"]
                    if rest:
                        new.insert(0, "from ray import " + ", ".join(d + (f" as {a}" if a else "") for d, a in rest))
                    indent = s[0].line[:len(s[0].line) - len(s[0].line.lstrip())]
                    replace(s[0], s[-1], ("\n" + indent).join(new))

    # ray.train... used as an attribute chain in code
    for s in stmts:
        if id(s) in import_stmt_ids:
            continue
        i = 0
        while i < len(s):
            t = s[i]
            prev = s[i - 1].string if i else ""
            if t.type == tokenize.NAME and t.string == "ray" and prev != ".":
                dotted, j = _dotted_at(s, i)
                if dotted == "ray.train" or dotted.startswith("ray.train."):
                    replace(s[i], s[i + 2], "trainkit")
                    uses_ray_train_attr = True
                    i = j
                    continue
            i += 1

    if uses_ray_train_attr and not _binds(stmts, "trainkit") and not any("import trainkit" in c.after for c in changes):
        if first_import_ray is not None:
            line = first_import_ray.line
            indent = line[:len(line) - len(line.lstrip())]
            at = starts[first_import_ray.start[0] + 1]  # after the whole `import ray` line
            edits.append((at, at, f"{indent}import trainkit\n"))
            changes.append(Change(first_import_ray.start[0] + 1, "", "import trainkit"))
        else:  # ray.train used without any import of ray: put the import at the top, after a docstring/__future__
            at = _top_insert_offset(stmts, starts, source)
            edits.append((at, at, "import trainkit\n"))
            changes.append(Change(source[:at].count("\n") + 1, "", "import trainkit"))

    # ``import ray.train`` also bound ``ray``: keep it bound where the file still uses it
    if any(c.before.startswith("import ") and "ray.train" in c.before for c in changes) and \
            _uses_name(stmts, import_stmt_ids, "ray", edits, starts) and not _binds_after(stmts, "ray", changes):
        s0 = next(s for s in stmts if s[0].string == "import" and "ray.train" in "".join(t.string for t in s))
        line = s0[0].line
        indent = line[:len(line) - len(line.lstrip())]
        at = off(s0[0].start) - len(indent)
        edits.append((at, at, f"{indent}import ray\n"))
        changes.append(Change(s0[0].start[0], "", "import ray"))

    out = source
    for a, b, text in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        out = out[:a] + text + out[b:]
    return out, sorted(changes, key=lambda c: c.line)


def _top_insert_offset(stmts, starts, source) -> int:
    at = 0
    for s in stmts:
        first = s[0]
        if first.type == tokenize.STRING and at == 0 and len(s) == 1:
            at = starts[s[-1].end[0] + 1]
            continue
        if [t.string for t in s[:3]] == ["from", "__future__", "import"]:
            at = starts[s[-1].end[0] + 1]
            continue
        break
    return min(at, len(source))


def _uses_name(stmts, import_ids, name, edits, starts) -> bool:
    """Whether code (outside imports) still uses ``name`` after the ``ray.train`` rewrites."""
    rewritten = {a for a, _, _ in edits}
    for s in stmts:
        if id(s) in import_ids:
            continue
        for i, t in enumerate(s):
            if t.type == tokenize.NAME and t.string == name and (i == 0 or s[i - 1].string != "."):
                if starts[t.start[0]] + t.start[1] not in rewritten:
                    return True
    return False


def _binds_after(stmts, name, changes) -> bool:
    """Whether an import other than a rewritten ``import ray.train...`` binds ``name``."""
    for s in stmts:
        w = [t.string for t in s]
        if w[0] == "import":
            for dotted, alias in _import_aliases(s, 1):
                if alias is None and dotted.split(".")[0] == name and _swap(dotted) is None:
                    return True
                if alias == name:
                    return True
        elif w[0] == "from" and "import" in w:
            for dotted, alias in _import_aliases(s, w.index("import") + 1):
                if (alias or dotted) == name:
                    return True
    return False


def run(args) -> int:
    """``trainkit migrate FILE... [--diff | --check]`` (options declared in trainkit.cli): 0 done (or, with
    ``--check``, nothing to change), 1 ``--check`` found a file to change, 2 a file cannot be read or parsed."""
    would_change = 0
    for path in args.files:
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            new, changes = rewrite(source)
        except (OSError, UnicodeDecodeError, SyntaxError) as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            return 2
        if not changes:
            print(f"{path}: nothing to change")
            continue
        would_change += 1
        if args.diff or args.check:
            sys.stdout.writelines(difflib.unified_diff(source.splitlines(keepends=True), new.splitlines(keepends=True),
                                                       fromfile=path, tofile=path + " (trainkit)"))
            continue
        tmp = path + ".trainkit-migrate.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(new)
        os.replace(tmp, path)
        print(f"{path}: {len(changes)} change(s)")
        for c in changes:
            print(f"  line {c.line}: {c.before or '(added)'} -> {c.after}")
    return 1 if (args.check and would_change) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m trainkit.migrate ...`` is ``trainkit migrate ...``."""
    from trainkit.cli import main as cli_main

    return cli_main(["migrate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
