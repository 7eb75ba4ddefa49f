"""The README's numbers are generated, never typed: every result table in README.md sits under a marker naming
results/*.json it comes from, follows the command that wrote that JSON, and equals what the JSON renders to
(experiments/tables.py, by the same functions that print the tables when the commands run). A table whose JSON
changed, or a number typed by hand into a table, fails here."""

import re
from pathlib import Path

from experiments import tables

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_marked_table_is_what_its_json_renders():
    assert tables.markers(README), "README.md has no table rendered from results/*.json"
    for doc in tables.documents():
        text = doc.read_text()
        for path, view in tables.markers(text):
            assert (ROOT / path).exists(), f"{doc.name} cites {path}, which does not exist"
        rendered = tables.update(text).splitlines()
        for i, (ours, theirs) in enumerate(zip(text.splitlines(), rendered)):
            assert ours == theirs, (
                f"{doc.name} line {i + 1} differs from its JSON (python -m experiments.tables):\n{ours}"
            )
        assert len(rendered) == len(text.splitlines())


def test_every_table_of_results_is_marked_and_follows_its_command():
    """A table after a command that writes results/*.json is a result: it must be a marked (rendered) one, and
    each marked table's JSON must be written by a command shown above it."""
    blocks = re.split(r"^```[a-z]*\n(.*?)^```\n", README, flags=re.S | re.M)  # text, code, text, code, ...
    written = set()
    for i in range(1, len(blocks), 2):
        written |= set(re.findall(r"--out (results/\S+\.json)", blocks[i]))
        section = re.split(r"^#", blocks[i + 1], flags=re.M)[0] if i + 1 < len(blocks) else ""
        if not written:
            continue
        for table in re.finditer(r"^\|.*\|\n(?:^\|.*\|\n)*", section, flags=re.M):
            before = section[: table.start()].splitlines()
            assert before and tables.MARKER.match(before[-1] + "\n"), (
                f"README.md: an unmarked table after a command that writes results/*.json:\n{table[0][:200]}"
            )
            path = tables.MARKER.match(before[-1] + "\n")[1]
            assert path in written, f"README.md: the table of {path} comes before any command writing it"


def test_readme_gives_the_two_commands():
    """A new user's two commands on a fresh clone: the toy-world run and the tests (the command CI runs)."""
    first = re.search(r"^```bash\n(.*?)^```", README, flags=re.S | re.M)[1]
    commands = [line for line in first.splitlines() if line and not line.startswith("#")]
    assert commands == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def readme_commands() -> list[tuple[str, list[str], str]]:
    """(script, its arguments, the docs JSON it writes) of every command in the README's code blocks."""
    import shlex

    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", README, flags=re.S | re.M):
        for line in block.splitlines():
            written = re.search(r"--out (results/\S+\.json)", line)
            if line.startswith("python ") and written:
                words = shlex.split(line, comments=True)
                if words[1] == "-m":  # python -m experiments.compare ...: name it by its file
                    words = [words[0], words[2].rsplit(".", 1)[-1] + ".py"] + words[3:]
                out.append((words[1], words[2:], written[1]))
    return out


def test_every_readme_command_is_the_one_its_json_records():
    """The command printed above a table is the one that wrote its JSON: each setting the JSON records equals
    what that command line parses to (a stale command, e.g. a renamed run folder or another attack budget,
    fails here)."""
    import json

    import eval as E
    from experiments import compare, profile

    def flags(parsed) -> dict:
        """Parsed flags (a Namespace or a settings dataclass) as the JSON records them: tuples are lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(parsed).items()}

    checked, stale = 0, []
    for script, argv, path in readme_commands():
        if "--merge" in argv:  # it records the runs it merges, each checked by its own command
            continue
        settings = json.loads((ROOT / path).read_text())["settings"]
        if script == "eval.py":
            parsed = flags(E.parse_args(argv))
        elif script == "compare.py":
            parsed = flags(compare.parse_args(argv))
            recorded = ("seeds", "train_seeds", "samples", "finetune_attack", "steps")
            parsed = {k: parsed[k] for k in recorded} | {
                "prefill": parsed["prefill"] or None,  # the JSON records None for eval's own prefill ks
                "rows": sorted(parsed["rows"]),
            }
            settings = {**settings, "rows": sorted(settings["rows"])}  # the order of rows is the table's
        elif script == "profile.py":
            parsed = {k: v for k, v in flags(profile.parse_args(argv)).items() if k in ("seeds", "models")}
        else:
            continue
        skip = {"out", "report", "compile", "seconds"}
        run = {
            "gcg": parsed.get("gcg", 1),
            "ablate": parsed.get("ablate", 1),
            "finetune": parsed.get("finetune_attack", 1),
        }
        off = [f"{attack}_" for attack, on in run.items() if not on]
        skip |= {k for k in parsed if k.startswith(tuple(off))}  # the budget of an attack not run
        differ = {k: (v, settings[k]) for k, v in parsed.items() if k in settings and k not in skip}
        differ = {k: pair for k, pair in differ.items() if pair[0] != pair[1]}
        if differ:
            stale.append(f"the command writing {path} differs from its recorded settings: {differ}")
        checked += 1
    assert not stale, "README.md: " + "; ".join(stale)
    assert checked >= 5


def test_the_budget_table_puts_each_methods_budgets_in_one_row():
    """compare.py --steps names a row's model after b steps "row @b": the budget view pivots them (a hand-made
    summary); a model without " @" is not a budget row."""

    def cell(model, mean, sd=0.0):
        return {"model": model, "decode": "greedy", "figure": "prefill 40 all toy", "mean": mean, "sd": sd}

    summary = [cell("augment @10", 0.5, 0.1), cell("augment @150", 0.0), cell("targeted @10", 0.25)]
    summary += [cell("targeted @150", 0.0), cell("targeted", 0.0)]
    assert tables.budget_table(summary, ("prefill 40 all toy",)).splitlines() == [
        "| model | 10 steps | 150 steps |",
        "| --- | --- | --- |",
        "| augment | 50.0 ± 10.0 | 0.0 ± 0.0 |",
        "| targeted | 25.0 ± 0.0 | 0.0 ± 0.0 |",
    ]
