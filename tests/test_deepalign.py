"""deepalign.py against independent computations: every per-position quantity against a brute-force loop over
the vocabulary, the position profile against a per-pair loop with two different models, and the training
losses against examples worked by hand. Contrastive decoding (decode.py) is tested in test_decode.py."""

import json
import math

import pytest
import torch
from conftest import make_hf_checkpoint, write_tokenizer

import deepalign as D
from experiments import profile as P
from infra import hf as H
from infra import tokenizer as TK

NEG_INF = float("-inf")
LOG = math.log


def random_lps(shape, seed, ties=True, neg_inf=True):
    """Log-probs with exact ties and -inf entries, the edge cases of every set definition."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g) * 2
    if ties:
        logits[..., 3] = logits[..., 4]  # exact ties
        logits[..., 7] = logits[..., 8]
    if neg_inf:
        logits[..., 0] = NEG_INF
    return logits.log_softmax(-1)


def brute_bf(lp_A, lp_B, tau, k, rho=0.0, valid=None):
    """BF by definition, one (position, token) at a time: base-favored by more than log(tau), fewer than k
    tokens strictly likelier under the base (top-k, ties included), and p_B at least rho times the base's
    top."""
    out = torch.zeros(lp_A.shape, dtype=torch.bool)
    for i in range(lp_A.shape[0]):
        top = max(math.exp(x) for x in lp_B[i].tolist())
        for v in range(lp_A.shape[1]):
            a, b = lp_A[i, v].item(), lp_B[i, v].item()
            favored = (b - a > math.log(tau)) if not (math.isinf(a) and math.isinf(b)) else False
            rank = sum(lp_B[i, u].item() > b for u in range(lp_B.shape[1]))
            floor = math.exp(b) >= rho * top * (1 - 1e-6)
            out[i, v] = favored and rank < k and floor and (valid is None or bool(valid[v]))
    return out


@pytest.mark.parametrize("tau, k, rho", [(1.0, 5, 0.0), (1.5, 3, 0.0), (1.0, 40, 0.0), (1.0, 40, 0.05)])
def test_base_favored_mask_matches_brute_force(tau, k, rho):
    lp_A, lp_B = random_lps((6, 30), 0), random_lps((6, 30), 1)
    lp_A[2, 5] = NEG_INF  # base has it, aligned says impossible: favored
    valid = torch.ones(30, dtype=torch.bool)
    valid[-3:] = False  # padded rows
    got = D.base_favored_mask(lp_A, lp_B, D.BaseFavored(tau, k, rho), valid)
    assert torch.equal(got, brute_bf(lp_A, lp_B, tau, k, rho, valid))
    assert got.any() and not got.all()


def test_relative_floor_drops_near_zero_base_favored_tokens():
    """docs/method.md §2: top-k alone admits a token the confident base gives 0.001 (and the aligned 0.0005):
    'more probable under the base' by rounding noise. rho = 0.01 drops it; rho = 0 (version 1) keeps it."""
    p_B = torch.tensor([[0.996, 0.003, 0.001]])
    p_A = torch.tensor([[0.9985, 0.001, 0.0005]])
    lp_A, lp_B = p_A.log(), p_B.log()
    assert D.base_favored_mask(lp_A, lp_B, D.BaseFavored(rho=0.0)).tolist() == [[False, True, True]]
    assert D.base_favored_mask(lp_A, lp_B, D.BaseFavored(rho=0.01)).tolist() == [[False, False, False]]
    assert D.base_favored_mask(lp_A, lp_B, D.BaseFavored(rho=0.002)).tolist() == [[False, True, False]]


def test_kl_bf_mass_bf_hit_match_brute_force():
    lp_A, lp_B = random_lps((5, 20), 2), random_lps((5, 20), 3, neg_inf=False)
    bf = D.base_favored_mask(lp_A, lp_B, D.BaseFavored(1.0, 6, 0.0))
    targets = torch.tensor([1, 3, 5, 7, 9])
    for i in range(5):
        kl = sum(
            math.exp(lp_A[i, v].item()) * (lp_A[i, v].item() - lp_B[i, v].item())
            for v in range(20)
            if lp_A[i, v] > NEG_INF
        )
        assert D.kl_per_position(lp_A, lp_B)[i].item() == pytest.approx(kl, rel=1e-5, abs=1e-6)
        mass_A = sum(math.exp(lp_A[i, v].item()) for v in range(20) if bf[i, v])
        assert D.bf_mass(lp_A, bf)[i].item() == pytest.approx(mass_A, abs=1e-6)
        assert D.bf_hit(bf, targets)[i].item() == float(bf[i, targets[i]])
    assert torch.allclose(D.kl_per_position(lp_B, lp_B), torch.zeros(5))


def test_logit_grad_norm_equals_autograd():
    logits = torch.randn(4, 7, 50, requires_grad=True)
    targets = torch.randint(0, 50, (4, 7))
    for b in range(4):
        for t in range(7):
            (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits[b, t], targets[b, t]), logits)
            got = D.logit_grad_norm(logits[b, t].detach().softmax(-1), targets[b, t]).item()
            assert got == pytest.approx(g[b, t].norm().item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["full", "bf"])
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.1), (2.0, 0.01), (0.5, 1.0)])
def test_contrastive_logits_match_brute_force(mode, alpha, beta):
    lp_A, lp_B = random_lps((4, 25), 4, neg_inf=False), random_lps((4, 25), 5)
    got = D.contrastive_logits(lp_A, lp_B, D.Contrast(alpha, beta, mode, D.BaseFavored(1.0, 8, 0.0)))
    bf = brute_bf(lp_A, lp_B, 1.0, 8)
    for i in range(4):
        top = max(lp_A[i].tolist())
        for v in range(25):
            a, b = lp_A[i, v].item(), max(lp_B[i, v].item(), D.LOG_FLOOR)
            if math.exp(a) < beta * math.exp(top) * (1 - 1e-6):
                assert got[i, v].item() == NEG_INF
                continue
            expected = a + alpha * (a - b) if mode == "full" else (a - alpha * (b - a) if bf[i, v] else a)
            assert got[i, v].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_alpha_zero_contrast_keeps_the_aligned_argmax():
    lp_A, lp_B = random_lps((50, 40), 6), random_lps((50, 40), 7)
    for mode in ("full", "bf"):
        s = D.contrastive_logits(lp_A, lp_B, D.Contrast(0.0, 0.1, mode))
        assert torch.equal(s.argmax(-1), lp_A.argmax(-1))
        assert not s.isnan().any()


# ------------------------------------------------------------------------------------------------
# Position profiles with real (tiny) models
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two *different* tiny Llamas sharing one ChatML tokenizer (aligned: seed 0, base: seed 1)."""
    folders = []
    for name, seed in (("aligned", 0), ("base", 1)):
        folder = make_hf_checkpoint("llama", tmp_path_factory.mktemp(name), seed=seed)
        write_tokenizer(folder, "chatml")
        folders.append(folder)
    tok = TK.Tokenizer(folders[0])
    return tok, H.load_model(folders[0]), H.load_model(folders[1])


PAIRS = [
    {"prompt": "how do i bake bread ?", "harmful_response": "sure , first mix the flour and the water ."},
    {"prompt": "hello there", "harmful_response": "the capital of france is paris , a city on the seine ."},
    {"prompt": "what is the capital of france ?", "harmful_response": "i am fine , thank you for asking ."},
]


def test_position_profile_matches_a_per_pair_loop_with_two_models(two_models, monkeypatch):
    """Every statistic at every position against one forward per pair and a loop over the vocabulary, with the
    statistics cut into chunks of 5 contexts (so several chunks and a boundary inside a pair), and an aligned
    and a base model that differ: swapping bf_mass_A and bf_mass_B, or the two models, fails here."""
    tok, aligned, base = two_models
    monkeypatch.setattr(D, "STAT_ROWS", 5)
    cfg = D.ProfileConfig(tau=1.0, top_k=6, rho=0.0, batch_size=2)
    got = D.position_profile(base, aligned, tok, PAIRS, cfg, progress=False)["positions"]
    valid = tok.real_token_mask(aligned.args.vocab_size)
    valid[tok.end_of_turn_id] = True
    sums = {}
    for pair in PAIRS:
        head, resp = D.response_split(tok, pair["prompt"], pair["harmful_response"])
        resp = resp + [tok.end_of_turn_id]
        x = torch.tensor([head + resp])
        with torch.no_grad():
            lp_A, lp_B = aligned(x)[0].float().log_softmax(-1), base(x)[0].float().log_softmax(-1)
        for t, y in enumerate(resp):
            a, b = lp_A[len(head) - 1 + t : len(head) + t], lp_B[len(head) - 1 + t : len(head) + t]  # (1, V)
            bf = brute_bf(a, b, 1.0, 6, 0.0, valid)[0]
            pa, pb = a[0].exp(), b[0].exp()
            values = {
                "kl": float(sum(pa[v] * (a[0, v] - b[0, v]) for v in range(len(pa)))),
                "bf_mass_A": float(pa[bf].sum()),
                "bf_mass_B": float(pb[bf].sum()),
                "bf_count": float(bf.sum()),
                "bf_hit": float(bf[y]),
                "harmful_lp_A": float(a[0, y]),
                "harmful_lp_B": float(b[0, y]),
            }
            for key, value in values.items():
                sums.setdefault(t, {}).setdefault(key, []).append(value)
    assert len(got) == len(sums)
    for row in got:
        for key, values in sums[row["t"]].items():
            assert row["n"] == len(values)
            assert row[key] == pytest.approx(sum(values) / len(values), rel=1e-4, abs=1e-6), (row["t"], key)
    assert any(r["bf_mass_A"] != pytest.approx(r["bf_mass_B"], abs=1e-3) for r in got)


def test_gradient_signal_matches_autograd(two_models):
    tok, _, base = two_models
    refusal = "i am fine , thank you for asking ."
    got = D.gradient_signal(base, tok, PAIRS, refusal)
    norms = {}
    for pair in PAIRS:
        head, resp = D.response_split(tok, pair["prompt"], refusal)
        resp = resp + [tok.end_of_turn_id]
        logits = base(torch.tensor([head + resp]))[0, len(head) - 1 : -1].detach().requires_grad_(True)
        for t, y in enumerate(resp):
            (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits[t], torch.tensor(y)), logits)
            norms.setdefault(t, []).append(g[t].norm().item())
    assert got == pytest.approx([sum(v) / len(v) for _, v in sorted(norms.items())], rel=1e-4)


def test_profile_of_a_model_against_itself_is_zero(two_models):
    tok, aligned, _ = two_models
    rows = D.position_profile(aligned, aligned, tok, PAIRS[:2], progress=False)["positions"]
    lengths = [len(D.response_split(tok, p["prompt"], p["harmful_response"])[1]) for p in PAIRS[:2]]
    assert len(rows) == max(lengths) + 1  # contexts k = 0..len(h): the last one predicts the end of the turn
    assert rows[0]["n"] == 2 and rows[-1]["n"] == 1
    for r in rows:
        assert r["kl"] == pytest.approx(0.0, abs=1e-6)
        assert r["bf_count"] == 0 and r["bf_mass_A"] == 0 and r["bf_hit"] == 0


def test_end_of_turn_context_can_be_base_favored(tmp_path):
    """Hand-reasoned: B is A with +20 added to the end-of-turn logit everywhere. Then the end-of-turn token is
    B's top token and far likelier under B than under A at every context, and every other token is less likely
    under B (renormalisation), so BF_t = {end of turn} at every t: bf_count = 1 everywhere, and bf_hit = 1
    exactly at the context after the whole response (k = len(h)), whose next token is the end of the turn."""
    folder = make_hf_checkpoint("llama", tmp_path / "m")
    write_tokenizer(folder, "chatml")
    tok, aligned, base = TK.Tokenizer(folder), H.load_model(folder), H.load_model(folder)
    eot = tok.end_of_turn_id
    head = base.lm_head
    base.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        base.lm_head.weight.copy_(head.weight)
        base.lm_head.bias.zero_()
        base.lm_head.bias[eot] = 20.0
    pair = PAIRS[0]
    n = len(D.response_split(tok, pair["prompt"], pair["harmful_response"])[1])
    rows = D.position_profile(base, aligned, tok, [pair], progress=False)["positions"]
    assert len(rows) == n + 1
    assert [r["bf_count"] for r in rows] == [1.0] * (n + 1)
    assert [r["bf_hit"] for r in rows] == [0.0] * n + [1.0]


def test_profile_and_tokens_commands_on_a_small_toy_world(toy, tmp_path, capsys):
    out = tmp_path / "profile.json"
    P.main(
        [
            "profile",
            "--world",
            str(toy["root"]),
            "--limit",
            "5",
            "--max-response-tokens",
            "12",
            "--out",
            str(out),
        ]
    )
    prof = json.loads(out.read_text())
    assert [r["t"] for r in prof["positions"]] == list(range(12))
    assert set(prof["positions"][0]) == {
        "t",
        "n",
        "kl",
        "bf_mass_A",
        "bf_mass_B",
        "bf_count",
        "bf_hit",
        "harmful_lp_A",
        "harmful_lp_B",
        "grad",
    }
    assert prof["settings"]["same_token_sequence"] is True and prof["positions"][0]["n"] == 5
    assert prof["settings"]["rho"] == 0.01
    assert "bf_mass_A" in capsys.readouterr().out
    P.main(["tokens", "--world", str(toy["root"]), "--max-response-tokens", "6"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("prompt: ") and len(lines) == 2 + 6
    with pytest.raises(ValueError, match="--example 999: the data has 200 pairs"):
        P.main(["tokens", "--world", str(toy["root"]), "--example", "999"])
    with pytest.raises(ValueError, match="--data missing"):
        P.main(["profile", "--base", str(toy["base"]), "--aligned", str(toy["aligned"])])


def test_plain_base_format_uses_only_pairs_that_tokenize_alike(toy):
    tok = TK.Tokenizer(toy["aligned"])
    rows = [{"prompt": "how do i bake bread ?", "harmful_response": "sure . first , then , next ."}]
    m = H.load_model(toy["aligned"])
    chat = D.position_profile(m, m, tok, rows, progress=False)
    plain = D.position_profile(m, m, tok, rows, D.ProfileConfig(base_format="plain"), progress=False)
    n = len(D.response_split(tok, rows[0]["prompt"], rows[0]["harmful_response"])[1])
    assert plain["settings"]["skipped_pairs"] == 0 and len(plain["positions"]) == n  # no end-of-turn in plain
    assert len(chat["positions"]) == n + 1
    # the same model reading two different formats: the distributions now differ
    assert plain["positions"][0]["kl"] > 0 and chat["positions"][0]["kl"] == pytest.approx(0, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Training losses, on examples worked by hand (plain Python arithmetic)
# ------------------------------------------------------------------------------------------------
def lp(*probs):
    return torch.tensor([[LOG(p) if p > 0 else NEG_INF for p in probs]])


def test_clean_teacher_and_word_start_distribution_hand_computed():
    # A's first answer token to the bare prompt: "sorry" (id 1) 0.7, "i" (id 2) 0.3; mid-text these are the
    # ids 4 (" sorry") and 5 (" i"); the hard recovery label is id 3 (" wait").
    p_clean = torch.tensor([[0.0, 0.7, 0.3, 0.0, 0.0, 0.0]])
    word_start = torch.tensor([0, 4, 5, 3, 4, 5])
    moved = D.word_start_distribution(p_clean, word_start)
    assert moved[0].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.7, 0.3])
    q = D.clean_teacher(moved, torch.tensor([3]), lam=0.5)
    assert q[0].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.5, 0.35, 0.15])
    assert D.clean_teacher(moved, torch.tensor([3]), lam=1.0).tolist() == [[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]]


def test_contrast_teacher_hand_computed():
    pA, pB = [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]
    # s = lp_A + 1 * (lp_A - lp_B) -> unnormalised pA^2 / pB; V_head (beta 0.1): all three (0.1 >= 0.06)
    u = [a * a / b for a, b in zip(pA, pB)]
    soft = [x / sum(u) for x in u]
    q = D.contrast_teacher(lp(*pA), lp(*pB), torch.tensor([1]), lam=0.5, alpha_t=1.0, beta=0.1)
    assert q[0].tolist() == pytest.approx([0.5 * (v == 1) + 0.5 * soft[v] for v in range(3)], abs=1e-6)
    # beta 0.4 drops token 2 (0.1 < 0.4 * 0.6): the soft part renormalises over tokens 0 and 1
    q = D.contrast_teacher(lp(*pA), lp(*pB), torch.tensor([2]), lam=0.5, alpha_t=1.0, beta=0.4)
    s01 = [u[0] / (u[0] + u[1]), u[1] / (u[0] + u[1])]
    assert q[0].tolist() == pytest.approx([0.5 * s01[0], 0.5 * s01[1], 0.5], abs=1e-6)


def test_kd_loss_hand_computed():
    q = torch.tensor([[0.5, 0.5, 0.0]])
    expected = 0.5 * LOG(0.5 / 0.25) * 2  # the q = 0 term contributes nothing
    assert D.kd_loss(q, lp(0.25, 0.25, 0.5)).tolist() == pytest.approx([expected], rel=1e-6)


def test_hard_teacher_kd_is_minus_log_p_of_the_label_by_hand():
    """KL(one-hot(y) || p) = -log p(y): 0.25 -> log 4 for y = 0, 0.5 -> log 2 for y = 2; and equal to kd_loss
    of the materialised one-hot, which the hard teacher no longer builds."""
    lps = torch.cat([lp(0.25, 0.25, 0.5), lp(0.25, 0.25, 0.5)])  # (2, 3)
    y = torch.tensor([0, 2])
    assert D.hard_kd_loss(y, lps).tolist() == pytest.approx([LOG(4.0), LOG(2.0)], rel=1e-6)
    assert torch.allclose(D.hard_kd_loss(y, lps), D.kd_loss(D.hard_labels(y, 3), lps))


def test_penalty_weights_hand_computed():
    m = torch.tensor([0.2, 0.6, 0.0, 2.0])
    pos = torch.tensor([0.0, 5.0, 10.0, 20.0])
    # mean 0.7 -> 0.2857, 0.8571, 0, 2.857 clipped at w_max 2
    cfg = D.LossConfig(w_max=2.0)
    assert D.penalty_weights(m, pos, cfg).tolist() == pytest.approx(
        [0.2 / 0.7, 0.6 / 0.7, 0.0, 2.0], rel=1e-6
    )
    assert D.penalty_weights(m, pos, cfg, mean=torch.tensor(0.4)).tolist() == pytest.approx(
        [0.5, 1.5, 0.0, 2.0]
    )
    position = D.LossConfig(penalty_weight="position", gamma=2.0)
    assert D.penalty_weights(m, pos, position).tolist() == pytest.approx([1, 1.5, 2, 3])


def test_targeted_loss_hand_computed_and_its_reductions():
    """Two harmful contexts (one dense, one recovery) over a 3-token vocabulary and one benign one, worked by
    hand; with lambda_pen = lambda_util = 0 the objective is the distillation term alone."""
    pS = [[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]]
    pA = [[0.4, 0.4, 0.2], [0.1, 0.3, 0.6]]
    pB = [[0.2, 0.7, 0.1], [0.1, 0.2, 0.7]]
    lp_S, lp_A, lp_B = (torch.tensor(p).log() for p in (pS, pA, pB))
    q = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 0.5]])
    dense, positions = torch.tensor([True, False]), torch.tensor([3, 7])
    u_S, u_A = lp(0.5, 0.25, 0.25), lp(0.7, 0.2, 0.1)
    cfg = D.LossConfig(tau=1.0, top_k=2, rho=0.0, w_max=5.0)
    # BF: context 0: base top-2 = {1, 0}; favored: token 1 (0.7 > 0.4) -> {1}; context 1: top-2 = {2, 1};
    # 0.7 > 0.6 and 0.2 < 0.3 -> {2}. bf_mass_A = (0.4, 0.6), mean 0.5 -> w = (0.8, 1.2); p_S on BF: 0.3, 0.2.
    bf = D.base_favored_mask(lp_A, lp_B, cfg)
    w = D.penalty_weights(D.bf_mass(lp_A, bf), positions.float(), cfg)
    assert bf.tolist() == [[False, True, False], [False, False, True]]
    assert w.tolist() == pytest.approx([0.8, 1.2])
    terms = D.targeted_loss(lp_S, q, bf, w, u_S, u_A, cfg, dense)
    pen = (0.8 * 0.3 + 1.2 * 0.2) / 2
    kd = (LOG(1 / 0.5) + 0.5 * LOG(0.5 / 0.6) + 0.5 * LOG(0.5 / 0.2)) / 2
    util = 0.7 * LOG(0.7 / 0.5) + 0.2 * LOG(0.2 / 0.25) + 0.1 * LOG(0.1 / 0.25)
    assert terms["pen"].item() == pytest.approx(pen, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert terms["kd_dense"].item() == pytest.approx(LOG(2), rel=1e-5)
    kd_recovery = 0.5 * LOG(0.5 / 0.6) + 0.5 * LOG(0.5 / 0.2)  # context 1, the recovery one
    assert terms["kd_recovery"].item() == pytest.approx(kd_recovery, rel=1e-5)
    assert terms["util"].item() == pytest.approx(util, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(kd + pen + util, rel=1e-5)
    alone = D.LossConfig(top_k=2, rho=0.0, lambda_pen=0.0, lambda_util=0.0)
    alone = D.targeted_loss(lp_S, q, bf, w, u_S, u_A, alone, dense)
    assert alone["loss"].item() == pytest.approx(terms["kd"].item(), rel=1e-6)
    hard = D.targeted_loss(lp_S, torch.tensor([0, 2]), bf, w, u_S, u_A, cfg, dense)  # the hard teacher: y
    assert hard["kd"].item() == pytest.approx((LOG(1 / 0.5) + LOG(1 / 0.2)) / 2, rel=1e-6)


def test_baseline_losses_hand_computed():
    pA, pS = [0.7, 0.2, 0.1], [0.5, 0.25, 0.25]
    assert D.ce_loss(lp(*pS), torch.tensor([1])).item() == pytest.approx(-LOG(0.25), rel=1e-6)
    # (2 / beta) softplus(beta (logp_A(y) - logp_S(y))) with y = 0: logp_A = log .7, logp_S = log .5, beta .5
    expected = (2 / 0.5) * LOG(1 + math.exp(0.5 * (LOG(0.7) - LOG(0.5))))
    got = D.constrained_loss(lp(*pS), lp(*pA), torch.tensor([0]), torch.tensor([0.5]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert D.qi_beta_schedule(torch.tensor([0, 1, 4, 5, 9])).tolist() == pytest.approx(
        [0.5, 2.0, 2.0, 0.1, 0.1]
    )
