"""The layers of mmfm point one way: every import between mmfm's top-level packages must be allowed
by the "Import rules" table of docs/architecture.md, and that table must itself have no circle.

The table is the one source: a new dependency is a line in the docs, reviewed like code. Imports
inside functions count too (they are how circles hide)."""
from __future__ import annotations

import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "mmfm")
# Files `mmfm export` copies into an export folder, where transformers runs them as remote code
# (trust_remote_code): they must not import mmfm at all (the folder runs where mmfm is not
# installed), and they import their sibling with the relative import transformers' dynamic-module
# loader follows, which mmfm's own modules never use.
REMOTE = os.path.join("mmfm", "export", "remote")


def import_rules() -> dict[str, set[str]]:
    """{unit: units it may import} from docs/architecture.md's "Import rules" table."""
    text = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    section = text.split("### Import rules", 1)[1].split("\n#", 1)[0]
    rules = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        unit = cells[0].strip("`")
        rules[unit] = set(re.findall(r"`([^`]+)`", cells[1]))
    return rules


def unit_of(module: str) -> str:
    """mmfm.train.loop -> train; mmfm -> mmfm (the package root, a facade)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mmfm"


def imports() -> list[tuple[str, str, str, int]]:
    """(importing unit, imported unit, file, line) for every mmfm -> mmfm import across units."""
    out = []
    for root, _, files in os.walk(PKG):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, ROOT)
            module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
            src = unit_of(module)
            remote = os.path.dirname(rel) == REMOTE and f != "__init__.py"
            for node in ast.walk(ast.parse(open(path).read(), rel)):
                targets = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    # `from mmfm import x`: x is a submodule (or a name in the root facade)
                    targets = ([f"mmfm.{a.name}" for a in node.names] if node.module == "mmfm" else [node.module])
                elif isinstance(node, ast.ImportFrom) and node.level > 0:
                    if not (remote and node.level == 1 and node.module and "." not in node.module):
                        raise AssertionError(f"{rel}:{node.lineno}: relative import; mmfm uses absolute imports")
                if remote and any(t == "mmfm" or t.startswith("mmfm.") for t in targets):
                    raise AssertionError(f"{rel}:{node.lineno}: a remote-code file imports mmfm; it runs without it")
                for t in targets:
                    if t == "mmfm" or t.startswith("mmfm."):
                        dst = unit_of(t)
                        if dst != src:
                            out.append((src, dst, rel, node.lineno))
    return out


def test_every_import_follows_the_rules():
    rules = import_rules()
    units = {unit_of(m) for m in _modules()}
    missing = sorted(units - set(rules))
    assert not missing, f"docs/architecture.md Import rules: no row for {missing}"
    bad = [f"{rel}:{line}: {src} imports {dst}" for src, dst, rel, line in imports()
           if dst not in rules.get(src, set()) and dst != "_C"]
    assert not bad, "imports against docs/architecture.md's Import rules:\n" + "\n".join(bad)


def test_rules_have_no_circle():
    rules = import_rules()
    state: dict[str, int] = {}

    def visit(u, path):
        if state.get(u) == 1:
            raise AssertionError("circle in the Import rules: " + " -> ".join(path + [u]))
        if state.get(u) == 2:
            return
        state[u] = 1
        for v in sorted(rules.get(u, ())):
            if v != "mmfm":   # the root facade imports lazily, at call time
                visit(v, path + [u])
        state[u] = 2

    for u in sorted(rules):
        if u not in ("mmfm",):
            visit(u, [])


def test_the_check_catches_a_wrong_import(tmp_path, monkeypatch):
    """The walker sees imports inside functions (the usual hiding place of a circle)."""
    pkg = tmp_path / "mmfm" / "train"
    pkg.mkdir(parents=True)
    (tmp_path / "mmfm" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("def f():\n    from mmfm.tokenizers.train import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", str(tmp_path / "mmfm"))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    found = imports()
    assert ("train", "tokenizers", os.path.join("mmfm", "train", "__init__.py"), 2) in found


def _modules():
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), ROOT)
                yield rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
