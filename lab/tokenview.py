"""The report's token view (docs/method.md §2-§3): harmful answers token by token, each token coloured by
KL(p_A || p_B) at its position and by model A's mass on base-favored tokens, A and the base B teacher-forced
on the identical token sequence; a token's tooltip lists its probabilities and the top base-favored tokens.
A is the world's aligned model (before training) and each trained model given (after training), one row
each, all against the same base on the same answers. lab/report.py puts the section in its page
(python -m lab.report ... --tokens-world DIR [--tokens-model NAME=DIR ...]).

Read top to bottom: the computation (token_view), the examples and models (load_token_view), the HTML.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from infra.files import spread
from lab.plots import esc

SHOW_FAVORED = 5  # base-favored tokens listed per position


def token_view(aligned, base, tok, rows: list[dict], cfg) -> list[dict]:
    """Per harmful (prompt, harmful_response) row, the response token by token: [{prompt, category,
    held_out, tokens: [{t, id, text, kl, bf_mass_A, bf_mass_B, p_A, p_B, favored: [{text, p_A, p_B}]}]}].

    As ``profile tokens`` computes it: both models teacher-forced on the aligned chat format with the
    harmful response (response_split, response_log_probs); KL(p_A || p_B) (kl_per_position), the
    base-favored set (base_favored_mask, cfg's tau, top_k, rho, real tokens only) and the aligned model's
    and the base's mass on it (bf_mass), at most cfg.max_response_tokens positions."""
    import torch

    import deepalign as D

    splits = [
        D.response_split(tok, r["prompt"], r["harmful_response"], max_tokens=cfg.max_response_tokens)
        for r in rows
    ]
    seqs, starts, lens = [h + r for h, r in splits], [len(h) for h, _ in splits], [len(r) for _, r in splits]
    with torch.no_grad():
        lp_A = D.response_log_probs(aligned, seqs, starts, lens, tok.pad_id)  # (N, V)
        lp_B = D.response_log_probs(base, seqs, starts, lens, tok.pad_id)  # (N, V)
    valid = tok.real_token_mask(aligned.args.vocab_size).to(lp_A.device)
    bf = D.base_favored_mask(lp_A, lp_B, cfg, valid)  # (N, V)
    kl, mass_A, mass_B = D.kl_per_position(lp_A, lp_B), D.bf_mass(lp_A, bf), D.bf_mass(lp_B, bf)  # (N,)
    target = torch.tensor([y for _, r in splits for y in r], device=lp_A.device)  # (N,)
    p_A, p_B = lp_A.exp(), lp_B.exp()  # (N, V)
    per_token = {"kl": kl, "bf_mass_A": mass_A, "bf_mass_B": mass_B}
    per_token |= {"p_A": p_A.gather(-1, target[:, None])[:, 0], "p_B": p_B.gather(-1, target[:, None])[:, 0]}
    views, at = [], 0
    for row, (_, resp) in zip(rows, splits):
        tokens = []
        for t, y in enumerate(resp):
            i = at + t
            values = {k: v[i].item() for k, v in per_token.items()}
            favored = favored_tokens(tok, bf[i], lp_B[i], p_A[i], p_B[i])
            tokens.append({"t": t, "id": y, "text": tok.decode([y]), **values, "favored": favored})
        at += len(resp)
        keep = {k: row[k] for k in ("prompt", "category", "held_out") if k in row}
        views.append({**keep, "tokens": tokens})
    return views


def favored_tokens(tok, bf, lp_B, p_A, p_B) -> list[dict]:
    """The SHOW_FAVORED most base-probable base-favored tokens at one position, with both models'
    probabilities: [{text, p_A, p_B}]. bf (V,) bool, lp_B, p_A, p_B (V,)."""
    ids = bf.nonzero().squeeze(-1)
    ids = ids[lp_B[ids].argsort(descending=True)][:SHOW_FAVORED].tolist()
    return [{"text": tok.decode([v]), "p_A": p_A[v].item(), "p_B": p_B[v].item()} for v in ids]


def choose_examples(rows: list[dict], n: int) -> list[dict]:
    """n harmful rows with a response: one per category, seen and held-out categories alternating, then
    more of them spread over the rest."""
    rows = [r for r in rows if r.get("harmful_response")]
    firsts = list({r.get("category"): r for r in reversed(rows)}.values())[::-1]  # each category's first
    seen = [r for r in firsts if not r.get("held_out")]
    held = [r for r in firsts if r.get("held_out")]
    picked = [r for pair in itertools.zip_longest(seen, held) for r in pair if r is not None][:n]
    rest = [r for r in rows if not any(r is p for p in picked)]
    return picked + spread(rest, n - len(picked)) if len(picked) < n else picked


def load_token_view(world, n: int, cfg, models=None) -> list[dict]:
    """The token view of a built world's aligned model and of each of `models` ({label: folder}: models
    trained from it), each against the world's base, on the same n of its harmful evaluation rows:
    [{prompt, category, held_out, models: {label: tokens}}] ("aligned" first; tokens as token_view's)."""
    from data import toyworld as TW
    from infra.hf import load_model
    from infra.tokenizer import Tokenizer

    paths = TW.world_paths(world)
    for key in ("aligned", "base", "tokenizer"):
        if not paths[key].is_dir():
            raise ValueError(
                f"--tokens-world {world}: no {paths[key]}; pass a built world's folder "
                "(data/worlds/seed-N, built by python data/toyworld.py --seed N)"
            )
    folders = {"aligned": paths["aligned"], **dict(models or {})}
    for label, folder in folders.items():
        if not (Path(folder) / "config.json").is_file():
            raise ValueError(f"--tokens-model {label}={folder}: no config.json there; pass a model's folder")
    tok, base = Tokenizer(paths["tokenizer"]), load_model(paths["base"])
    rows = choose_examples(TW.read_set(paths, "harmful_eval"), n)
    per_model = {label: token_view(load_model(f), base, tok, rows, cfg) for label, f in folders.items()}
    return [
        {
            **{k: v for k, v in view.items() if k != "tokens"},
            "models": {m: per_model[m][i]["tokens"] for m in folders},
        }
        for i, view in enumerate(per_model["aligned"])
    ]


# ----------------------------------------------------------------------------------------------
# The HTML: one row per model and measure, the same tokens in each, a colour legend, a measure toggle
# ----------------------------------------------------------------------------------------------
KL_RGB, BF_RGB = (214, 39, 40), (31, 119, 180)
MEASURES = (  # (data-row, name, colour)
    ("bf", "bf_mass: mass on base-favored tokens", BF_RGB),
    ("kl", "KL(p_A ‖ p_B)", KL_RGB),
)
TOKEN_CSS = """
.tokrow{margin:2px 0;line-height:2.1;display:flex;align-items:flex-start}
.rowname{flex:0 0 150px;font-size:12px;line-height:1.3;color:#444;padding-top:4px}.toks{flex:1}
.tok{white-space:pre-wrap;padding:2px 1px;border-radius:2px;font:12.5px ui-monospace,monospace}
.measure{margin:4px 0 8px}.measure>h4{margin:4px 0;font-size:12.5px;font-weight:600;color:#333}
.scale{display:inline-flex;margin:0 14px 0 6px;vertical-align:middle}
.scale span{font:11px ui-monospace,monospace;padding:1px 5px}
#tv-bf:checked~#token-examples .measure.kl,#tv-kl:checked~#token-examples .measure.bf{display:none}
"""


def shade(rgb: tuple, level: float) -> str:
    """A background of colour rgb at strength level in [0, 1], and a text colour readable on it."""
    level = min(max(level, 0.0), 1.0)
    ink = "#fff" if level > 0.6 else "#000"
    return f"background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{0.05 + 0.9 * level:.3f});color:{ink}"


def level_of(row: str, tk: dict, kl_max: float) -> float:
    """A token's colour strength in [0, 1]: bf_mass_A as it is, KL on a log scale up to kl_max."""
    return tk["bf_mass_A"] if row == "bf" else math.log1p(tk["kl"]) / math.log1p(kl_max)


def token_title(tk: dict, model: str = "A") -> str:
    lines = [
        f"t={tk['t']} {tk['text']!r}: p_A {tk['p_A']:.3f}, p_B {tk['p_B']:.3f} (A: {model}, B: the base)",
        f"KL(p_A||p_B) {tk['kl']:.4f}; bf_mass_A {tk['bf_mass_A']:.4f}, bf_mass_B {tk['bf_mass_B']:.4f}",
        "top base-favored tokens (p_A -> p_B):" if tk["favored"] else "no base-favored token here",
    ]
    lines += [f"  {f['text']!r} {f['p_A']:.3f} -> {f['p_B']:.3f}" for f in tk["favored"]]
    return "\n".join(lines)


def legend_html(kl_max: float) -> str:
    """The colour scales of both measures: six swatches each, from 0 to their largest value."""
    levels = [i / 5 for i in range(6)]
    out = ['<p class="legend" id="token-legend">Colour scales: ']
    for row, name, rgb in MEASURES:
        values = levels if row == "bf" else [math.expm1(x * math.log1p(kl_max)) for x in levels]
        swatches = "".join(f'<span style="{shade(rgb, x)}">{v:.2g}</span>' for x, v in zip(levels, values))
        out.append(f'{esc(name)}<span class="scale" data-measure="{row}">{swatches}</span>')
    return "".join(out) + "</p>"


def token_row(row: str, model: str, tokens: list[dict], kl_max: float, after: bool) -> str:
    """One model's tokens coloured by one measure, its name (before / after training) and mean in front."""
    key = "bf_mass_A" if row == "bf" else "kl"
    mean = sum(tk[key] for tk in tokens) / max(len(tokens), 1)
    when = "after training" if after else "before training"
    spans = [
        f'<span class="tok" data-row="{row}" data-model="{esc(model)}" data-t="{tk["t"]}" '
        f'data-kl="{tk["kl"]:.6g}" data-bf="{tk["bf_mass_A"]:.6g}" '
        f'style="{shade(KL_RGB if row == "kl" else BF_RGB, level_of(row, tk, kl_max))}" '
        f'title="{esc(token_title(tk, model))}">{esc(tk["text"])}</span>'
        for tk in tokens
    ]
    name = f"<b>{esc(model)}</b><br><small>{when}, mean {mean:.2g}</small>"
    toks = f'<span class="toks">{"".join(spans)}</span>'
    return f'<div class="tokrow"><span class="rowname">{name}</span>{toks}</div>'


def example_html(i: int, view: dict, kl_max: float) -> str:
    """One harmful answer: its prompt, then per measure one row per model (the same tokens in each)."""
    where = "held-out category" if view.get("held_out") else "seen category"
    out = [f'<div class="example" id="token-example-{i}"><h3>{esc(view.get("category", "?"))} ({where})</h3>']
    out.append(f'<p class="prompt">{esc(view.get("prompt", ""))}</p>')
    for row, name, _ in MEASURES:
        out.append(f'<div class="measure {row}"><h4>{esc(name)}</h4>')
        out += [
            token_row(row, model, tokens, kl_max, after=j > 0)
            for j, (model, tokens) in enumerate(view["models"].items())
        ]
        out.append("</div>")
    return "".join(out) + "</div>"


def token_section(views: list[dict] | None, cfg) -> str:
    if not views:
        return ""
    tokens = [tk for v in views for toks in v["models"].values() for tk in toks]
    kl_max = max((tk["kl"] for tk in tokens), default=1.0) or 1.0
    models = list(views[0]["models"])
    trained = ", ".join(models[1:]) or "none given"
    out = [
        '<section id="tokens"><h2>Token view</h2>',
        "<p>Each harmful answer token by token, teacher-forced under a model A and the world's base B "
        f"(docs/method.md §2-§3). A is the aligned model before training and each trained model after it "
        f"({esc(trained)}): one row each, the same tokens in every row. bf_mass: the probability A still "
        f"puts on base-favored tokens (blue, 0 to 1; base-favored: τ={cfg.tau:g}, top-{cfg.top_k}, "
        f"ρ={cfg.rho:g}): training should take it down. KL(p_A ‖ p_B): how far A is from the base at the "
        f"position (red, log scale up to the largest shown, {kl_max:.2f}). Hover a token for its "
        "probabilities and the top base-favored tokens.</p>",
        legend_html(kl_max),
        'Show: <input type="radio" name="tv" id="tv-bf" checked><label for="tv-bf">bf_mass</label>'
        '<input type="radio" name="tv" id="tv-kl"><label for="tv-kl">KL</label>'
        '<input type="radio" name="tv" id="tv-both"><label for="tv-both">both</label>',
        '<div id="token-examples">',
    ]
    out += [example_html(i, v, kl_max) for i, v in enumerate(views)]
    return "".join(out) + "</div></section>"
