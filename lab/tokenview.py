"""The report's token view (docs/method.md §2-§3): harmful answers token by token, each token coloured by
KL(p_A || p_B) at its position and by the aligned model's mass on base-favored tokens, both models
teacher-forced on the identical token sequence; a token's tooltip lists its probabilities and the top
base-favored tokens. lab/report.py puts the section in its page (python -m lab.report ... --tokens-world DIR).

Read top to bottom: the computation (token_view), the examples and models (load_token_view), the HTML.
"""

from __future__ import annotations

import itertools
import math

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


def load_token_view(world, n: int, cfg) -> list[dict]:
    """The token view of a built world's aligned and base models on n of its harmful evaluation rows."""
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
    tok = Tokenizer(paths["tokenizer"])
    aligned, base = load_model(paths["aligned"]), load_model(paths["base"])
    return token_view(aligned, base, tok, choose_examples(TW.read_set(paths, "harmful_eval"), n), cfg)


def shade(rgb: tuple, level: float) -> str:
    """A background of colour rgb at strength level in [0, 1], and a text colour readable on it."""
    level = min(max(level, 0.0), 1.0)
    ink = "#fff" if level > 0.6 else "#000"
    return f"background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{0.05 + 0.9 * level:.3f});color:{ink}"


KL_RGB, BF_RGB = (214, 39, 40), (31, 119, 180)


def token_title(tk: dict) -> str:
    lines = [
        f"t={tk['t']} {tk['text']!r}: p_A {tk['p_A']:.3f}, p_B {tk['p_B']:.3f}",
        f"KL(p_A||p_B) {tk['kl']:.4f}; bf_mass_A {tk['bf_mass_A']:.4f}, bf_mass_B {tk['bf_mass_B']:.4f}",
        "top base-favored tokens (p_A -> p_B):" if tk["favored"] else "no base-favored token here",
    ]
    lines += [f"  {f['text']!r} {f['p_A']:.3f} -> {f['p_B']:.3f}" for f in tk["favored"]]
    return "\n".join(lines)


def token_section(views: list[dict] | None, cfg) -> str:
    if not views:
        return ""
    kl_max = max((tk["kl"] for v in views for tk in v["tokens"]), default=1.0) or 1.0
    out = [
        '<section id="tokens"><h2>3. Token view</h2>',
        "<p>Each harmful answer token by token, teacher-forced under the aligned model A and its base B. "
        "First row: KL(p_A ‖ p_B) at the position (red, log scale up to the largest shown, "
        f"{kl_max:.2f}); second row: bf_mass_A, the probability A still puts on base-favored tokens "
        f"(blue, 0 to 1; base-favored: τ={cfg.tau:g}, top-{cfg.top_k}, ρ={cfg.rho:g}). Hover a token "
        "for its probabilities and the top base-favored tokens.</p>",
    ]
    for i, v in enumerate(views):
        where = "held-out category" if v.get("held_out") else "seen category"
        out.append(
            f'<div class="example" id="token-example-{i}"><h3>{esc(v.get("category", "?"))} ({where})</h3>'
        )
        out.append(f'<p class="prompt">{esc(v.get("prompt", ""))}</p>')
        for row, key, rgb in (("kl", "kl", KL_RGB), ("bf", "bf_mass_A", BF_RGB)):
            name = "KL(p_A ‖ p_B)" if row == "kl" else "bf_mass_A"
            spans = []
            for tk in v["tokens"]:
                level = math.log1p(tk["kl"]) / math.log1p(kl_max) if row == "kl" else tk["bf_mass_A"]
                spans.append(
                    f'<span class="tok" data-row="{row}" data-t="{tk["t"]}" data-kl="{tk["kl"]:.6g}" '
                    f'data-bf="{tk["bf_mass_A"]:.6g}" style="{shade(rgb, level)}" '
                    f'title="{esc(token_title(tk))}">{esc(tk["text"])}</span>'
                )
            out.append(f'<div class="tokrow"><span class="rowname">{name}</span>{"".join(spans)}</div>')
        out.append("</div>")
    return "".join(out) + "</section>"
