"""The code's layout rules that a reviewer would otherwise have to remember."""

import ast
from pathlib import Path

import fttrain
from fttrain.methods import METHODS
from fttrain.tasks import TASKS

PACKAGE = Path(fttrain.__file__).resolve().parent
# Where a method or a task is declared: the only modules that may name one.
DECLARATIONS = (PACKAGE / "tasks.py", PACKAGE / "methods")
NAMES = set(METHODS) | set(TASKS)
SUBJECTS = {"name", "method", "task", "peft"}  # task.name, peft.method, a bare task / method variable


def _is_subject(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr in SUBJECTS) or \
        (isinstance(node, ast.Name) and node.id in SUBJECTS)


def _named(node) -> set:
    """The task or method names a literal spells: "x", ("x", "y"), {"x": ...}."""
    if isinstance(node, ast.Constant) and node.value in NAMES:
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in NAMES}
    return set()


def branches_on_names(tree) -> list:
    """(line, names) of each comparison of a task/method field with a name,
    and each dict keyed by two or more names (a lookup table per task)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_subject(s) for s in sides):
                names = set().union(*(_named(s) for s in sides))
                if names:
                    found.append((node.lineno, sorted(names)))
        elif isinstance(node, ast.Dict):
            names = set().union(*(_named(k) for k in node.keys if k is not None))
            if len(names) >= 2:
                found.append((node.lineno, sorted(names)))
    return found


def test_no_module_branches_on_a_task_or_method_name():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(path == d or d in path.parents for d in DECLARATIONS):
            continue
        found = branches_on_names(ast.parse(path.read_text(), str(path)))
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert not offenders, f"read the Task / Method declaration instead: {offenders}"


def test_the_rule_catches_what_it_is_for():
    # The check itself must be able to fail.
    caught = branches_on_names(ast.parse(
        'if cfg.task.name == "ner": pass\n'
        'if peft.method in ("lora", "dora"): pass\n'
        'auto = {"cls": 1, "qa": 2}[task.name]\n'
        'save_format = "full" if x == "full" else "sharded"\n'))
    assert [line for line, _ in caught] == [1, 2, 3]
