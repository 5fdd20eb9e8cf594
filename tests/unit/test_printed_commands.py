"""Messages tell users to run `gpuforge X`, not `fab X`: `fab` works only at the repo root (its fabfile.py),
while the installed `gpuforge` command works from any folder.

The scan reads every string the program can show: string constants and f-string parts anywhere in provision/,
workloads/, infra/ and images/, except docstrings, which describe the code (a task's docstring is shown by
`gpuforge TASK --help`, so those are scanned too). Comments are not in the syntax tree at all.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from provision.cli import main

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("provision", "workloads", "infra", "images")
# `fab up`, "fab setup --pip-index URL": the program name, then one of our task names (not "the fab shim")
OLD = re.compile(r"(?<![\w./-])fab (%s)\b" % "|".join(sorted(main.namespace().task_names, key=len, reverse=True)))


def _is_task(node: ast.AST) -> bool:
    """Decorated with Invoke's `@task` or `@task(...)`."""
    for deco in getattr(node, "decorator_list", ()):
        target = deco.func if isinstance(deco, ast.Call) else deco
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "task":
            return True
    return False


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring constants that no user reads: every docstring but a task's."""
    skip = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str) and not _is_task(node)):
            skip.add(id(body[0].value))
    return skip


def old_commands(source: str, filename: str) -> list[str]:
    """`file:line: text` for every shown string of `source` that names a `fab ...` command."""
    tree = ast.parse(source, filename)
    skip = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if OLD.search(node.value):
                line = next(part for part in node.value.splitlines() if OLD.search(part))
                hits.append(f"{filename}:{node.lineno}: {line.strip()}")
    return hits


def test_the_scan_finds_messages_and_task_help_but_not_docstrings() -> None:
    source = '''
"""Module doc: `fab up` makes a cluster."""
from invoke import task

HINT = "run `fab setup` first"

def helper():
    """What `fab down` does."""
    raise ValueError(f"cluster {name} exists; `fab down --cluster {name}` first")

@task(help={"run": "the run (`fab status` lists them)"})
def status(c, run=None):
    """Show a run; `fab logs RUN` follows it."""
    print("done")  # `fab logs` in a comment
    console.rule("fab fetch")
    return "prefab houses; the fab shim"
'''
    hits = old_commands(source, "m.py")
    assert {hit.split(": ", 1)[1] for hit in hits} == {
        "run `fab setup` first", "exists; `fab down --cluster", "the run (`fab status` lists them)",
        "Show a run; `fab logs RUN` follows it.", "fab fetch"}
    assert len(hits) == 5


def test_no_shown_message_names_a_fab_command() -> None:
    hits = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            hits += old_commands(path.read_text(), str(path.relative_to(ROOT)))
    assert not hits, "say `gpuforge ...` (it works from any folder), not `fab ...`:\n" + "\n".join(hits)
