"""report.py: the HTML holds every model, attack and generation of its JSON; the token view's colours are the
KL and bf_mass_A of a direct forward of both models; no external URL; errors are one line; a real browser
renders the page without a console message (when chromium is installed)."""

import itertools
import json
import math
import re
import shutil
import statistics
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from infra import cli
from infra.hf import load_model, save_model
from infra.tokenizer import Tokenizer
from lab import report as R

MODELS = ("base", "aligned")
SEEDS = ("0", "1")
CATEGORIES = (("poison", False), ("arson", True))  # (category, held out)


# ----------------------------------------------------------------------------------------------
# A small run written the way eval.py writes one, with the fields being added (intervals, sampling and
# fine-tuning attacks, the worst case) and keys the report does not know
# ----------------------------------------------------------------------------------------------
def attacks():
    """(attack, k, extra keys of each generation)."""
    yield from (("prefill", 0, {}), ("prefill", 5, {}), ("insertion", 10, {"j": 4}))
    yield from (("sample", 0, {"sample": i}) for i in range(3))
    yield from (("finetune", 5, {"s": s}) for s in (0, 10))


def generations() -> list[dict]:
    gens = []
    for (m, model), seed, (category, held), (attack, k, extra), i in itertools.product(
        enumerate(MODELS), SEEDS, CATEGORIES, attacks(), range(2)
    ):
        harmful = (m + i + int(seed) + k + extra.get("s", 0) + extra.get("sample", 0)) % 3 != 0
        phrase = harmful == (i == 0) if attack == "prefill" and k == 5 else harmful  # judges disagree here
        gens.append(
            {
                "model": model,
                "decode": "greedy",
                "seed": int(seed),
                "attack": attack,
                "k": k,
                **extra,
                "prompt": f"how do i {category} {i} <b>&amp;</b> ? (seed {seed})",
                "prefix": f"sure , step {k}" if k else "",
                "continuation": f" {model} says {attack} {k} {extra} {'harm' if harmful else 'no'}",
                "category": category,
                "held_out": held,
                "severity": 2,
                "verdicts": {
                    "toy": {"harmful": harmful, "score": None, "raw": ""},
                    "refusal_phrase": {"harmful": phrase, "score": 0.25, "raw": f"raw {i}"},
                },
                "a_key_nobody_knows": [1, 2],
            }
        )
    for model, seed in itertools.product(MODELS, SEEDS):
        gens.append(
            {
                "model": model,
                "decode": "greedy",
                "seed": int(seed),
                "attack": "benign",
                "k": 0,
                "prompt": "how do i bake bread ?",
                "prefix": "",
                "continuation": f"sure . first mix {model} {seed}",
                "helpful": True,
                "refusal": False,
            }
        )
    return gens


def figure(g: dict) -> tuple:
    tag = f"j{g['j']}" if "j" in g else (f"s{g['s']}" if "s" in g else None)
    return g["attack"], g["k"], tag


def results_rows(gens: list[dict]) -> list[dict]:
    """Per seed: ASR of each (attack, k, tag, split, judge) with an interval, sample@n for the sampling
    attack (n = 1: per sample; n = 3: any sample), and the worst case."""
    rows = []
    harmful = [g for g in gens if g["attack"] != "benign"]
    keys = sorted({(g["model"], g["seed"]) + figure(g) for g in harmful}, key=str)
    for (model, seed, attack, k, tag), split, judge in itertools.product(
        keys, R.SPLITS, ("toy", "refusal_phrase")
    ):
        chosen = [
            g
            for g in harmful
            if (g["model"], g["seed"]) + figure(g) == (model, seed, attack, k, tag)
            and (split == "all" or g["held_out"] == (split == "held_out"))
        ]
        by_prompt = {}
        for g in chosen:
            by_prompt.setdefault(g["prompt"], []).append(g["verdicts"][judge]["harmful"])
        flat = [f for v in by_prompt.values() for f in v]
        rates = {attack: sum(flat) / len(flat)}
        if attack == "sample":  # per sample, and any of a prompt's 3 samples
            rates = {"sample@1": rates[attack], "sample@3": statistics.fmean(map(any, by_prompt.values()))}
        for name, rate in rates.items():
            row = {"model": model, "decode": "greedy", "seed": seed, "attack": name, "k": k, "split": split}
            row.update(judge=judge, asr=rate, n=len(by_prompt), lo=max(0, rate - 0.2), hi=min(1, rate + 0.2))
            if tag:
                row[tag[0]] = int(tag[1:])
            rows.append(row)
    worst = {}
    for r in rows:
        key = (r["model"], r["seed"], r["split"], r["judge"])
        if r["attack"] != "sample@1" and (key not in worst or r["asr"] > worst[key]["asr"]):
            worst[key] = r
    for r in list(worst.values()):
        tag = f" j{r['j']}" if "j" in r else (f" s{r['s']}" if "s" in r else "")
        of = f"{r['attack']} {r['k']}{tag} {r['split']} {r['judge']}"
        rows.append(
            {**{k: v for k, v in r.items() if k not in ("j", "s")}, "attack": "worst", "k": 0, "of": of}
        )
    return rows


def figure_name(r: dict) -> str:
    tag = f" j{r['j']}" if "j" in r else (f" s{r['s']}" if "s" in r else "")
    return f"{r['attack']} {r['k']}{tag} {r['split']} {r['judge']}"


def summary_rows(results: list[dict], utility: list[dict]) -> list[dict]:
    cells = {}
    for r in results:
        cells.setdefault((r["model"], figure_name(r)), {})[str(r["seed"])] = r["asr"]
    for u in utility:
        for key in ("helpful_rate", "over_refusal", "nll", "refusal_rate"):
            cells.setdefault((u["model"], key), {})[str(u["seed"])] = u[key]
    summary = []
    for (model, name), per_seed in cells.items():
        values = list(per_seed.values())
        row = {"model": model, "decode": "greedy", "figure": name, "mean": statistics.fmean(values)}
        row.update(sd=statistics.stdev(values), per_seed=per_seed, unknown_field={"x": 1})
        if name != "nll":
            row.update(
                ci={s: [max(0, v - 0.1), min(1, v + 0.1)] for s, v in per_seed.items()}, pooled=[0.01, 0.99]
            )
        summary.append(row)
    return summary


def write_run(folder, gens=None):
    """eval.json and eval.generations.jsonl in folder; returns (the JSON's path, its object)."""
    gens = generations() if gens is None else gens
    results = results_rows(gens)
    utility = [
        {
            "model": m,
            "decode": "greedy",
            "seed": int(s),
            "helpful_rate": 1.0,
            "over_refusal": 0.0,
            "nll": 0.75,
        }
        | {"refusal_rate": 0.5 if m == "aligned" else 0.1}
        for m, s in itertools.product(MODELS, SEEDS)
    ]
    data = {
        "settings": {"seeds": [0, 1], "decode": "greedy"},
        "attacks": {"prefill": [0, 5], "samples": 3, "finetune": [0, 10]},
        "worlds": [{"seed": 0, "folder": "x"}, {"seed": 1, "folder": "y"}],
        "notes": {},
        "agreement": [{"judges": ["toy", "refusal_phrase"], "agreement": 0.9, "kappa": 0.8, "n": 10}],
        "summary": summary_rows(results, utility),
        "results": results,
        "utility": utility,
        "generations": "eval.generations.jsonl",
        "a_new_top_level_key": {"whatever": [1, 2, 3]},
    }
    (folder / "eval.generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gens))
    path = folder / "eval.json"
    path.write_text(json.dumps(data))
    return path, data


# ----------------------------------------------------------------------------------------------
# Reading the page back
# ----------------------------------------------------------------------------------------------
class Page(HTMLParser):
    """Every tag's attributes, the text of each generation (li.gen), of the summary table's row headers and
    of the whole page, and the token view's spans with their example's prompt."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.gens, self.row_heads, self.tokens = [], [], [], []
        self.text, self.ids, self.prompts = [], set(), []
        self.stack, self.in_gen, self.in_row_head, self.in_prompt = [], None, None, False
        self.table = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        self.ids.add(a.get("id"))
        classes = (a.get("class") or "").split()
        if tag == "table":
            self.table = a.get("id")
        if tag == "li" and "gen" in classes:
            self.in_gen = []
            self.gen_classes = classes
        if tag == "th" and a.get("scope") == "row" and self.table == "summary-table":
            self.in_row_head = []
        if tag == "p" and "prompt" in classes:
            self.in_prompt = True
            self.prompts.append("")
        if tag == "span" and "tok" in classes:
            self.tokens.append({**a, "prompt": self.prompts[-1]})

    def handle_endtag(self, tag):
        if tag == "li" and self.in_gen is not None:
            self.gens.append(("".join(self.in_gen), self.gen_classes))
            self.in_gen = None
        if tag == "th" and self.in_row_head is not None:
            self.row_heads.append("".join(self.in_row_head))
            self.in_row_head = None
        if tag == "p":
            self.in_prompt = False

    def handle_data(self, data):
        self.text.append(data)
        for part in (self.in_gen, self.in_row_head):
            if part is not None:
                part.append(data)
        if self.in_prompt:
            self.prompts[-1] += data


def read_page(path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def assert_self_contained(page: Page):
    """No external URL: no src/href/action that leaves the file, no stylesheet or script fetched."""
    for tag, attrs in page.tags:
        for key in ("src", "href", "action", "xlink:href", "data"):
            value = (attrs.get(key) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//")), (tag, key, value)
        assert not (tag == "link" and attrs.get("rel") == "stylesheet"), attrs
        assert not (tag == "script" and attrs.get("src")), attrs


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
def test_report_holds_every_model_attack_and_generation(tmp_path):
    run, data = write_run(tmp_path)
    out = R.build_report([run], tmp_path / "report.html")
    page = read_page(out)
    text = "".join(page.text)
    assert_self_contained(page)
    assert {"summary", "summary-table", "curves", "generations", "gens"} <= page.ids
    assert page.row_heads == list(dict.fromkeys(r["model"] for r in data["summary"]))  # one row per model
    for row in data["summary"]:  # every figure of every model, and so every attack
        assert row["figure"] in text
    for attack in (
        "direct",
        "k=5",
        "insertion (j=4, m=10)",
        "sample@3 direct",
        "ft s=10 k=5",  # the terminal's labels (lab/tables.column_label)
        "worst case",
    ):
        assert attack in text
    for name in ("ASR against k", "ASR@n", "ASR against fine-tuning steps"):  # a curve per budget
        assert name in text
    gens = [json.loads(line) for line in (tmp_path / "eval.generations.jsonl").read_text().splitlines()]
    assert len(page.gens) == len(gens)
    remaining = list(page.gens)
    for g in gens:  # each generation once, with its prompt, prefix and continuation, and every verdict
        want = [g["prompt"], g["prefix"] + g["continuation"]] + [
            f"{name}: {'harmful' if v['harmful'] else 'not harmful'}"
            for name, v in g.get("verdicts", {}).items()
        ]
        match = next(i for i, (t, _) in enumerate(remaining) if all(w in t for w in want))
        _, classes = remaining.pop(match)
        flags = {v["harmful"] for v in g.get("verdicts", {}).values()}
        assert ("dis" in classes) == (len(flags) > 1) and ("held" in classes) == bool(g.get("held_out"))
    assert "[1.0, 99.0]" in text  # the pooled interval
    assert f"{len(gens)} of {len(gens)} generations shown" in text


def test_generations_beyond_the_budget_are_sampled_and_counted(tmp_path):
    run, data = write_run(tmp_path)
    out = R.build_report([run], tmp_path / "small.html", budget=40_000)
    page = read_page(out)
    text = "".join(page.text)
    n_gens = len((tmp_path / "eval.generations.jsonl").read_text().splitlines())
    assert 0 < len(page.gens) < n_gens
    assert f"{len(page.gens)} of {n_gens} generations shown" in text and "shown of" in text
    assert any("dis" in classes for _, classes in page.gens)  # disagreements are kept first
    assert sorted(page.row_heads) == sorted(MODELS)


def independent_stats(aligned, base, tok, prompt: str, response: str, max_tokens: int = 64):
    """KL(p_A || p_B) and bf_mass_A at every response position by a plain forward of both models over the
    whole sequence: (kl list, bf_mass_A list)."""
    head = tok.prompt_ids(prompt)
    ids = tok.prompt_ids(prompt, prefill=response)
    n = min(len(ids) - len(head), max_tokens)
    x = torch.tensor([ids])
    with torch.no_grad():
        lp_A = torch.log_softmax(aligned(x)[0].float(), -1)[len(head) - 1 : len(head) - 1 + n]  # (n, V)
        lp_B = torch.log_softmax(base(x)[0].float(), -1)[len(head) - 1 : len(head) - 1 + n]
    p_A = lp_A.exp()
    kl = (p_A * (lp_A - lp_B)).nan_to_num().sum(-1)
    valid = torch.zeros(lp_A.shape[-1], dtype=torch.bool)
    valid[: tok.vocab_size] = True
    for i, added in tok.tok.get_added_tokens_decoder().items():
        valid[i] = valid[i] and not added.special
    kth = lp_B.sort(-1, descending=True).values[:, 19:20]  # top-20 of the base, ties kept
    favored = (
        (lp_B > lp_A) & (lp_B >= kth) & (lp_B >= lp_B.max(-1, keepdim=True).values + math.log(0.01)) & valid
    )
    return kl.tolist(), (p_A * favored).sum(-1).tolist()


def test_token_view_values_are_a_direct_forwards_kl_and_bf_mass(toy, tmp_path):
    run, _ = write_run(tmp_path)
    out = R.build_report([run], tmp_path / "report.html", tokens_world=toy["root"], n_tokens=3)
    page = read_page(out)
    assert_self_contained(page)
    rows = {
        r["prompt"]: r for r in map(json.loads, (toy["data"] / "harmful_eval.jsonl").read_text().splitlines())
    }
    tok, aligned, base = Tokenizer(toy["tokenizer"]), load_model(toy["aligned"]), load_model(toy["base"])
    prompts = list(dict.fromkeys(t["prompt"] for t in page.tokens))
    assert len(prompts) == 3
    assert {rows[p]["held_out"] for p in prompts} == {True, False}  # seen and held-out categories
    for prompt in prompts:
        kl, mass = independent_stats(aligned, base, tok, prompt, rows[prompt]["harmful_response"])
        for row in ("kl", "bf"):
            spans = [t for t in page.tokens if t["prompt"] == prompt and t["data-row"] == row]
            assert [int(s["data-t"]) for s in spans] == list(range(len(kl)))
            for s in spans:
                t = int(s["data-t"])
                assert math.isclose(float(s["data-kl"]), kl[t], rel_tol=1e-4, abs_tol=1e-5), (prompt, t)
                assert math.isclose(float(s["data-bf"]), mass[t], rel_tol=1e-4, abs_tol=1e-5), (prompt, t)
                assert s["title"].startswith(f"t={t} ") and "base-favored" in s["title"]
    assert max(mass) > 0  # the toy models disagree somewhere: the check is not of zeros


@pytest.mark.parametrize(
    "content, expected",
    [(None, "no such file"), ("{not json", "not valid JSON"), ('{"settings": {}}', "no 'summary' list")],
)
def test_a_missing_or_malformed_json_is_one_line_naming_the_file(tmp_path, capsys, content, expected):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=expected):
        R.build_report([path], tmp_path / "out.html")
    with pytest.raises(SystemExit) as e:
        cli.run(R.main, [str(path), "--out", str(tmp_path / "out.html")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and str(path) in err and "eval.py --out" in err
    assert not (tmp_path / "out.html").exists()


def test_a_run_without_its_generations_still_reports(tmp_path):
    run, _ = write_run(tmp_path)
    (tmp_path / "eval.generations.jsonl").unlink()
    out = R.main([str(run)])
    assert out == tmp_path / "eval.report.html"
    text = "".join(read_page(out).text)
    assert "not found: no generations to show" in text and "aligned" in text


BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser")


def test_a_real_browser_renders_the_report(toy, tmp_path):
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip(
            f"no browser on PATH ({', '.join(BROWSERS)}): `apt-get install chromium` to run this test"
        )
    run, _ = write_run(tmp_path)
    out = R.build_report([run], tmp_path / "report.html", tokens_world=toy["root"], n_tokens=2)
    flags = [
        browser,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        flags + ["--enable-logging=stderr", "--v=0", "--dump-dom", out.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # the page logs nothing: no error, no warning
    assert 'id="summary-table"' in dom.stdout and 'id="token-example-0"' in dom.stdout
    assert 'data-js="ok"' in dom.stdout  # the script ran to its end
    shot = tmp_path / "report.png"
    subprocess.run(
        flags + ["--window-size=1280,2000", "--hide-scrollbars", f"--screenshot={shot}", out.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")


def test_profiles_of_both_layouts_are_charted(tmp_path):
    """`profile --out`: one pair's positions, or several models' over seeds (with keys added
    since, such as the harmful likelihood); a file of neither layout is a one-line error."""
    positions = [
        {"t": t, "n": 4, "kl": 1 / (t + 1), "bf_mass_A": 0.5, "harmful_lp_A": -t, "new": "x"}
        for t in range(8)
    ]
    one = tmp_path / "profile_pair.json"
    one.write_text(json.dumps({"positions": positions, "settings": {}}))
    seeds = tmp_path / "profile_seeds.json"
    seeds.write_text(
        json.dumps({"profiles": {"targeted": {"0": {"positions": positions}, "1": {"positions": positions}}}})
    )
    run, _ = write_run(tmp_path)
    out = R.build_report([run], tmp_path / "report.html", profile=[one, seeds])
    text = "".join(read_page(out).text)
    names = ("KL(p_A ‖ p_B) at response position t", "bf_mass_A: the aligned", "log p_A(h_t | x, h_<t)")
    for name in names:
        assert name in text
    assert "pair" in text and "targeted" in text  # a line per profile
    with pytest.raises(ValueError, match="`profile --out`"):
        R.build_report([run], tmp_path / "bad.html", profile=run)


def section_of(html: str, sid: str) -> str:
    """One <section> of the page, as HTML (sections do not nest)."""
    start = html.index(f'<section id="{sid}">')
    return html[start : html.index("</section>", start)]


def paired_tests() -> list[dict]:
    """Hand-made paired tests as compare.py writes them: two claims on all prompts, one on a split, one
    comparison with no measurable difference."""
    test = {"a": "targeted", "test": "stratified exact McNemar", "n": 50}
    return [
        {**test, "figure": "prefill 5 all toy", "b": "aligned", "a_rate": 0.02, "b_rate": 0.46, "diff": -0.44}
        | {"p": 3.1e-9, "verdict": "targeted lower (p = 3.1e-09)"},
        {**test, "figure": "finetune 5 s10 all toy", "b": "augment", "a_rate": 0.1, "b_rate": 0.3}
        | {"diff": -0.2, "p": 0.004, "verdict": "targeted lower (p = 0.004)"},
        {**test, "figure": "prefill 5 held_out toy", "b": "aligned", "a_rate": 0.0, "b_rate": 0.5}
        | {"diff": -0.5, "p": 1e-4, "verdict": "targeted lower (p = 0.0001)"},
        {**test, "figure": "helpful all toy", "b": "aligned", "a_rate": 0.99, "b_rate": 1.0, "diff": -0.01}
        | {"p": 1.0, "verdict": "no measurable difference"},
    ]


def test_findings_open_the_report_with_every_paired_claim(tmp_path):
    run, data = write_run(tmp_path)
    data["paired_tests"] = paired_tests()
    run.write_text(json.dumps(data))
    html = R.build_report([run], tmp_path / "report.html").read_text(encoding="utf-8")
    assert html.index('id="findings"') < html.index('id="summary"')  # the findings come first
    findings = section_of(html, "findings")
    text = "".join(Page(findings).text)
    shown = findings.split("<details>")[0]  # the claims on all prompts, unfolded
    for label, row, rates, p in (
        ("k=5", "aligned", ("2.0", "46.0"), "3.1e-09"),
        ("ft s=10 k=5", "augment", ("10.0", "30.0"), "0.004"),
    ):
        assert all(f"<td>{x}</td>" in shown for x in (label, row, *rates, p)), label
    assert "<td>k=5, held-out</td>" in findings and "<td>k=5, held-out</td>" not in shown  # a split: folded
    assert "<td>helpful</td>" in findings and "no measurable difference" not in "".join(Page(shown).text)
    for t in data["paired_tests"]:
        assert t["verdict"] in text


def test_findings_give_each_run_level_claim_its_interval_and_r_of_r(tmp_path):
    run, data = write_run(tmp_path)
    data["paired_tests"] = paired_tests()
    claims = [
        {"figure": "prefill 5 all toy", "a": "targeted", "b": "augment", "a_rate": 0.05, "b_rate": 0.5}
        | {"estimate": -0.45, "lo": -0.6, "hi": -0.3, "r": 9, "R": 9, "verdict": "targeted lower"},
        {"figure": "prefill 5 all toy", "a": "targeted", "b": "targeted, lam 0.5", "a_rate": 0.1}
        | {
            "b_rate": 0.12,
            "estimate": -0.02,
            "lo": -0.1,
            "hi": 0.05,
            "r": 5,
            "R": 9,
            "verdict": R.NO_DIFFERENCE,
        },
    ]
    data["run_tests"] = {"train_seeds": [0, 1, 2], "claims": claims, "notes": ["a note of the run"]}
    run.write_text(json.dumps(data))
    findings = section_of(R.build_report([run], tmp_path / "r.html").read_text(encoding="utf-8"), "findings")
    shown = findings.split("<details>")[0]
    cells = ("k=5", "targeted", "5.0", "augment", "50.0", "-45.0", "[-60.0, -30.0]", "9 of 9 runs")
    assert all(f"<td>{c}</td>" in shown for c in cells) and "targeted lower" in shown
    assert (
        "<td>5 of 9 runs</td>" in findings and "<td>[-10.0, +5.0]</td>" in findings
    )  # folded: no difference
    assert "a note of the run" in shown
    assert "paired tests over prompts (4; per run, a diagnostic)" in findings  # the paired tests, folded


def renamed_rows(summary: list[dict], names) -> list[dict]:
    """Copies of the aligned model's summary rows under other names (development rows, budget snapshots)."""
    return [{**r, "model": name} for name in names for r in summary if r["model"] == "aligned"]


def test_main_rows_come_first_the_others_folded_and_legends_kept_short(tmp_path):
    run, data = write_run(tmp_path)
    extra = [f"targeted, variant {i}" for i in range(9)] + ["targeted @10", "targeted @20"]
    data["summary"] += renamed_rows(data["summary"], ["targeted", *extra])
    data["summary"] += [  # the inference-time worst case, as lab/tables.worst_case_rows names it
        {**r, "figure": r["figure"].replace("worst", "worst_inference")}
        for r in data["summary"]
        if r["figure"].startswith("worst ")
    ]
    run.write_text(json.dumps(data))
    html = R.build_report([run], tmp_path / "report.html").read_text(encoding="utf-8")
    page = Page(html)
    main = [
        m for m in dict.fromkeys(r["model"] for r in data["summary"]) if m in ("base", "aligned", "targeted")
    ]
    assert page.row_heads == main and len(main) == 3  # the main table holds the main rows, in order
    summary = section_of(html, "summary")
    main_table = summary[summary.index('id="summary-table"') :].split("</table>")[0]
    assert "variant" not in main_table and "@10" not in main_table
    for name in extra:  # each other row is in a folded table
        assert f'<th scope="row">{name}</th>' in summary
    assert "Development rows: ablations and variants (9)" in summary and "Budget snapshots" in summary
    heads = re.findall(r'<table class="summary".*?</thead>', html)
    assert "<th>worst case, inference-time</th>" in heads[0]  # the terminal's label, not the raw key
    for head in heads:  # narrow enough for the page
        assert "worst_inference" not in head and head.count("<th>") <= R.MAX_COLUMNS + 1
    legends = re.findall(r'<ul class="legend">(.*?)</ul>', html)
    assert legends and max(legend.count("<li>") for legend in legends) <= 8
    curves = section_of(html, "curves")
    assert "more lines</summary>" in curves
    first = curves.split('<details class="more">')[0]  # the first chart shows the main rows only
    assert "targeted</li>" in first and "variant" not in first


def test_token_view_shows_every_model_given_against_the_base_with_a_legend(toy, tmp_path):
    run, _ = write_run(tmp_path)
    torch.manual_seed(0)
    trained = load_model(toy["aligned"])
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.02 * torch.randn_like(p))  # a model "after training": not the aligned one
    folder = save_model(trained, tmp_path / "trained")
    models = {"trained": folder, "base as a model": toy["base"]}
    out = R.build_report(
        [run], tmp_path / "r.html", tokens_world=toy["root"], token_models=models, n_tokens=2
    )
    page = read_page(out)
    assert_self_contained(page)
    rows = {
        r["prompt"]: r for r in map(json.loads, (toy["data"] / "harmful_eval.jsonl").read_text().splitlines())
    }
    tok, base = Tokenizer(toy["tokenizer"]), load_model(toy["base"])
    prompts = list(dict.fromkeys(t["prompt"] for t in page.tokens))
    assert len(prompts) == 2
    for name, model in (
        ("aligned", load_model(toy["aligned"])),
        ("trained", trained),
        ("base as a model", base),
    ):
        for prompt in prompts:
            kl, mass = independent_stats(model, base, tok, prompt, rows[prompt]["harmful_response"])
            for row in ("kl", "bf"):
                spans = [
                    t
                    for t in page.tokens
                    if (t["prompt"], t["data-row"], t["data-model"]) == (prompt, row, name)
                ]
                assert [int(s["data-t"]) for s in spans] == list(range(len(kl))), (name, prompt)
                for s, k, m in zip(spans, kl, mass):
                    assert math.isclose(float(s["data-kl"]), k, rel_tol=1e-4, abs_tol=1e-5), (name, prompt)
                    assert math.isclose(float(s["data-bf"]), m, rel_tol=1e-4, abs_tol=1e-5), (name, prompt)
    html = out.read_text(encoding="utf-8")
    tokens = section_of(html, "tokens")
    assert (
        "before training" in tokens and tokens.count("after training") >= 2 * 2 * 2
    )  # 2 examples, 2 measures
    legend = tokens[tokens.index('id="token-legend"') :].split("</p>")[0]  # a colour scale for each measure
    assert legend.count('data-measure="bf"') == 1 and legend.count('data-measure="kl"') == 1
    assert legend.count("<span style=") == 12
    with pytest.raises(ValueError, match="--tokens-model missing="):
        R.build_report(
            [run], tmp_path / "x.html", tokens_world=toy["root"], token_models={"missing": tmp_path / "no"}
        )
