"""Training runs as replicates (compare.py --train-seeds, docs/method.md §7 Statistics): the run-level claims
and variance components of compare.py against hand computations on hand-made generations, a world's figure as
the mean over its runs, the worst case taken within a run, and --train-seeds end to end on the small world
(two runs per row, each carrying its training seed, the attacker the same for both, a rerun read back)."""

import json
import shutil

import pytest

import train
from experiments import compare as C
from experiments import tables
from lab import attacks as A
from lab.tables import summarize


def gen(prompt, harmful, seed, model, train_seed=None):
    g = {"model": model, "decode": "greedy", "seed": seed, "attack": "prefill", "k": 10, "prompt": prompt}
    g |= {"held_out": False, "verdicts": {"toy": {"harmful": harmful}}}
    return g if train_seed is None else {**g, "train_seed": train_seed}


# Harmful after a 10-token prefill, the same on both prompts of a run: (world, training seed) -> verdict.
TARGETED = {(0, 0): 0, (0, 1): 1, (1, 0): 0, (1, 1): 0}
AUGMENT = {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1}


def hand_gens() -> list[dict]:
    gens = []
    for (world, ts), harmful in TARGETED.items():
        gens += [gen(p, harmful, world, "targeted", ts) for p in ("p0", "p1")]
        gens += [gen(p, AUGMENT[world, ts], world, "augment", ts) for p in ("p0", "p1")]
    return gens + [gen(p, 0, world, "aligned") for world in (0, 1) for p in ("p0", "p1")]  # not trained here


SUMMARY = [{"model": "targeted", "decode": "greedy", "figure": "prefill 10 all toy"}]


def test_run_level_claims_by_hand():
    """targeted - augment per run: world 0: -1 (seed 0), 0 (seed 1); world 1: -1, -1 (every prompt of a run
    alike, so resampling prompts changes nothing). Estimate: mean of the worlds' means (-0.5, -1) = -0.75;
    targeted lower in 3 of 4 runs. The bootstrap draws 2 worlds, each the mean of 2 runs drawn from its own:
    a slot is 0 with p 1/2 * 1/4 = 1/8, -0.5 with 1/2 * 1/2 = 1/4, -1 with 5/8. The estimate is -1 with p
    (5/8)^2 = 39% (> 2.5%: the lower bound), 0 with p 1/64 = 1.6% and -0.25 with 2 (1/8)(1/4) = 1/16, so
    P(>= -0.25) = 7.8% > 2.5% and the upper bound is -0.25 < 0: "targeted lower". Against aligned (all 0, one
    model per world, paired with every run): the mirror image, +0.25 in [0, +0.75]: no measurable difference.
    Each run's McNemar: world 0, seed 0: 2 discordant prompts, p = 2 (1/2)^2 = 0.5."""
    run = C.run_tests(SUMMARY, hand_gens(), ["augment", "targeted"], "targeted")
    vs_aligned, vs_augment = run["claims"]
    assert (vs_augment["estimate"], vs_augment["lo"], vs_augment["hi"]) == (-0.75, -1.0, -0.25)
    assert (vs_augment["r"], vs_augment["R"], vs_augment["verdict"]) == (3, 4, "targeted lower")
    assert (vs_aligned["estimate"], vs_aligned["lo"], vs_aligned["hi"]) == (0.25, 0.0, 0.75)
    assert vs_aligned["runs"] == 4 and vs_aligned["verdict"] == "no measurable difference"
    first = vs_augment["per_run"][0]
    assert (first["world"], first["train_seed"], first["n"], first["p"]) == ("0", 0, 2, 0.5)
    assert run["train_seeds"] == [0, 1] and run["notes"] == []
    assert tables.tests_view(run["claims"], "runs_all", C.runs_table).splitlines()[2:] == [
        "| prefill 10 | targeted | 25.0 | aligned | 0.0 | +25.0 [+0.0, +75.0] | 0 of 4 "
        "| no measurable difference |",
        "| prefill 10 | targeted | 25.0 | augment | 100.0 | -75.0 [-100.0, -25.0] | 3 of 4 "
        "| targeted lower |",
    ]


def test_variance_components_of_a_row_by_hand():
    """targeted's prefill verdicts, 2 worlds x 2 runs x 2 prompts: run means 0, 1 | 0, 0; world means 0.5, 0;
    grand mean 0.25. SS_prompt = 0 (4 df); SS_run = 2 (0.5^2 + 0.5^2) = 1 on 2 df, MS 0.5; SS_world =
    4 (0.25^2) + 4 (0.25^2) = 0.5 on 1 df. s2_prompt = 0, s2_run = (0.5 - 0) / 2 = 0.25, s2_world =
    (0.5 - 0 - 2 * 0.25) / 4 = 0; se over 2 x 2 x 2 = sqrt(0.25 / 4) = 0.25. The aligned model (one run per
    world): the run component is not identifiable, and the table says so."""
    run = C.run_tests(SUMMARY, hand_gens(), ["augment", "targeted"], "targeted")
    by = {v["model"]: v for v in run["variance_components"]}
    assert by["targeted"]["variance"] == {"world": 0.0, "run": 0.25, "prompt": 0.0}
    assert by["targeted"]["se"] == pytest.approx(0.25) and by["aligned"]["variance"]["run"] is None
    lines = tables.variance_view(run["variance_components"], "variance_all").splitlines()
    assert lines[2] == (
        "| aligned | prefill 10 | 0.0 | 0.0 (0%) | not identifiable (one run per world) | 0.0 (0%) "
        "| 0.0 (2 x 1 x 2) |"
    )
    assert "| targeted | prefill 10 | 25.0 | 0.0 (0%) | 50.0 (100%) | 0.0 (0%) | 25.0 (2 x 2 x 2) |" in lines


def test_one_run_per_world_says_the_run_component_is_not_identifiable():
    gens = [g for g in hand_gens() if g.get("train_seed") in (0, None)]
    run = C.run_tests(
        SUMMARY, [{k: v for k, v in g.items() if k != "train_seed"} for g in gens], ["targeted"], "targeted"
    )
    assert run["notes"] == [C.ONE_RUN] and run["claims"][0]["runs"] == 2


def test_a_worlds_figure_is_the_mean_over_its_runs_and_the_worst_case_stays_within_a_run():
    """Two runs of augment on world 0: prefill ASR 0.2 and 0.6 (5 prompts each), insertion 0.5 and 0.1. The
    world's prefill figure is 0.4 over 10 prompts; the worst case of run 0 is 0.5 (insertion), of run 1 0.6
    (prefill): their mean 0.55, not the 0.6 of a maximum over both runs."""

    def row(attack, asr, ts):
        j = 4 if attack == "insertion" else None
        r = {"model": "augment", "decode": "greedy", "seed": 0, "attack": attack, "k": 10, "split": "all"}
        return r | {"judge": "toy", "asr": asr, "n": 5, "train_seed": ts} | ({"j": j} if j else {})

    results = [
        row("prefill", 0.2, 0),
        row("insertion", 0.5, 0),
        row("prefill", 0.6, 1),
        row("insertion", 0.1, 1),
    ]
    results += C.worst_per_run(results)
    summary = {s["figure"]: s for s in summarize(C.run_means(results), [])}
    assert summary["prefill 10 all toy"]["per_seed"] == {"0": pytest.approx(0.4)}
    assert summary["worst 0 all toy"]["mean"] == pytest.approx(0.55)
    assert summary["prefill 10 all toy"]["pooled"] == pytest.approx(list(C.stats.wilson_interval(4, 10)))


def stand_ins(toy, monkeypatch) -> tuple[list, list, list]:
    """(trained, attacks, suites): each run's training stood in for (the aligned model copied to its folder;
    (folder, train.py flags) recorded); the fine-tuning attack's train.py runs (seed, pairs, steps) and the
    suite's (sampling seed, attack settings) of every model recorded as they run."""
    trained, attacks, suites = [], [], []
    real_train, real_suite = train.train, A.run_suite

    def fake_train_row(paths, folder, row, extra, retrain, budgets):
        trained.append((folder, extra))
        shutil.copytree(toy["root"] / "aligned", folder, dirs_exist_ok=True)

    def spy_train(run, loss, **kw):  # only the attack trains here: the defences' training is stood in for
        attacks.append((run.seed, open(run.data).read(), run.steps))
        return real_train(run, loss, **kw)

    def spy_suite(model, tok, rows, setup):
        suites.append((setup.decode.seed, setup.attacks))
        return real_suite(model, tok, rows, setup)

    monkeypatch.setattr(C.TW, "ensure_world", lambda seed: toy)
    monkeypatch.setattr(C, "train_row", fake_train_row)
    monkeypatch.setattr(train, "train", spy_train)
    monkeypatch.setattr(A, "run_suite", spy_suite)
    return trained, attacks, suites


def test_train_seeds_end_to_end_on_the_small_world(toy, tmp_path, monkeypatch):
    """compare.py --train-seeds 0 1 on the small world (each run the aligned model copied, training stood in
    for): two runs of the row, each evaluated and carrying its seed, train.py given --seed S; the attacker's
    fine-tuning pairs, its train.py seed and the sampling seed the same for both; a rerun reads every run's
    results back (no evaluation) and writes the same JSON."""
    trained, attacks, suites = stand_ins(toy, monkeypatch)
    out = tmp_path / "c.json"
    argv = ["--seeds", "0", "--rows", "targeted", "--train-seeds", "0", "1", "--limit", "2", "--samples", "2"]
    argv += [
        "--finetune-attack",
        "0",
        "1",
        "--finetune-prefill",
        "0",
        "--prefill",
        "0",
        "10",
        "--no-contrastive",
    ]
    argv += ["--runs", str(tmp_path / "runs"), "--out", str(out)]
    C.main(argv)
    world = tmp_path / "runs" / toy["root"].name
    assert [(f, e[-2:]) for f, e in trained] == [
        (world / "targeted", ["--seed", "0"]),
        (world / "train-seed-1" / "targeted", ["--seed", "1"]),
    ]
    record = json.loads(out.read_text())
    runs = {r.get("train_seed") for r in record["results"] if r["model"] == "targeted"}
    assert runs == {0, 1} and all("train_seed" not in r for r in record["results"] if r["model"] == "aligned")
    assert len(attacks) == 6  # aligned, run 0, run 1: the harmful then the benign fine-tuning attack
    assert attacks[0] == attacks[2] == attacks[4] and attacks[1] == attacks[3] == attacks[5]
    assert len(suites) == 3 and suites[0] == suites[1] == suites[2]
    claims = record["run_tests"]["claims"]
    assert claims and all(c["runs"] == 2 and len(c["per_run"]) == 2 for c in claims)
    assert record["run_tests"]["train_seeds"] == [0, 1]

    monkeypatch.setattr(C, "evaluate", lambda *a, **k: pytest.fail("a finished run was evaluated again"))
    C.main(argv)
    again = json.loads(out.read_text())
    assert {k: v for k, v in again["settings"].items() if k != "seconds"} == {
        k: v for k, v in record["settings"].items() if k != "seconds"
    }
    assert (again["results"], again["run_tests"]) == (record["results"], record["run_tests"])


def test_with_base_evaluates_the_worlds_base_beside_the_aligned_model(tmp_path, monkeypatch):
    """--with-base: the first eval.py call of a world holds the base as a reference row; without it, only the
    aligned model; the base belongs to a merged comparison like the aligned model."""
    monkeypatch.setattr(C, "train_runs", lambda cfg, paths: [])
    paths = {"root": tmp_path / "seed-0"}
    (first,) = C.world_evaluations(C.parse_args(["--with-base", "--no-contrastive"]), paths)
    models = first.args[first.args.index("--model") + 1 : first.args.index("--model") + 3]
    assert models == ("aligned={world}/aligned", "base={world}/base") and first.train_seed is None
    (plain,) = C.world_evaluations(C.parse_args(["--no-contrastive"]), paths)
    assert "base={world}/base" not in plain.args and C.compared("base", ["targeted"])
    with pytest.raises(ValueError, match="--train-seeds"):
        C.parse_args(["--train-seeds", "0", "0"])


def test_a_merge_orders_its_models_as_one_run_does():
    """Parts merged in the order they were run (world 0's rows split over two processes, then the other
    worlds) come out in one run's order: the world's own models, the rows in --rows order, other decodings,
    then budget models; each model's worlds keep their merged order (a hand-made shuffle)."""
    rows = ["augment", "rto", "targeted"]
    merged = ["targeted @10", "rto", "aligned (contrastive)", "targeted", "base", "augment", "aligned", "rto"]
    assert sorted(merged, key=lambda m: C.table_order(m, rows)) == [
        *["aligned", "base", "augment", "rto", "rto", "targeted", "aligned (contrastive)", "targeted @10"]
    ]
    parts = [{"model": m, "seed": s} for m, s in (("targeted", 0), ("augment", 0), ("targeted", 1))]
    ordered = sorted(parts, key=lambda r: C.table_order(r["model"], rows))
    assert [(r["model"], r["seed"]) for r in ordered] == [("augment", 0), ("targeted", 0), ("targeted", 1)]
