"""The house's shape (docs/map.md), read from the source with `ast`: the method in five top-level files of at
most 600 lines, no function over 60 lines, the lab and the plumbing in folders that the method never imports,
and no import cycle anywhere. Every import statement counts, also those inside functions."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ("model.py", "decode.py", "deepalign.py", "train.py", "eval.py")
FOLDERS = ("infra", "lab", "experiments", "data")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 60


def sources() -> dict[str, Path]:
    """{module name: file} for the project's Python files (tests and built worlds left out)."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for folder in FOLDERS:
        found |= {f"{folder}.{p.stem}": p for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"}
    return found


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules that `path` imports anywhere in it (`from lab import judges` -> lab.judges)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def graph() -> dict[str, set[str]]:
    files = sources()
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def test_the_top_level_is_the_method():
    assert sorted(p.name for p in ROOT.glob("*.py")) == sorted(METHOD)


def test_the_method_never_imports_the_lab_and_the_lab_never_imports_upward():
    """model, decode, deepalign and train import neither lab/ nor experiments/; eval.py (the front door of
    the evaluation) may use lab/ but not experiments/; lab/ never imports eval.py or experiments/; infra/
    imports only model.py and itself; data/ (the toy world) only model, deepalign, infra and itself."""
    allowed = {
        "model": set(),
        "decode": {"model", "deepalign", "infra", "data"},
        "deepalign": {"model", "infra"},
        "train": {"model", "decode", "deepalign", "infra", "data"},
        "eval": {"model", "decode", "deepalign", "train", "infra", "data", "lab"},
        "infra": {"model", "infra"},
        "data": {"model", "deepalign", "infra", "data"},
        "lab": {"model", "decode", "deepalign", "train", "infra", "data", "lab"},
        "experiments": {
            "model",
            "decode",
            "deepalign",
            "train",
            "eval",
            "infra",
            "data",
            "lab",
            "experiments",
        },
    }
    wrong = []
    for name, deps in graph().items():
        home = name.split(".")[0]
        wrong += [f"{name} imports {d}" for d in sorted(deps) if d.split(".")[0] not in allowed[home]]
    assert not wrong, wrong


def test_no_import_cycle():
    g = graph()
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(g[node]):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_each_method_file_reads_in_one_sitting():
    """The five method files: at most 600 lines each, no function over 60 lines."""
    too_long = [f"{f} ({n} lines)" for f in METHOD if (n := len((ROOT / f).read_text().splitlines())) > 600]
    assert not too_long, too_long
    assert not [x for f in METHOD for x in long_functions(ROOT / f)]


def test_no_function_anywhere_is_over_60_lines():
    files = [p for p in sources().values() if p.name not in METHOD]
    assert not [x for p in files for x in long_functions(p)]
