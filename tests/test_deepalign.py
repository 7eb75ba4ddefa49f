"""deepalign.py's per-position quantities against brute-force loops over the vocabulary, and decode.py's
contrastive decoding against recomputing both models from scratch at every step."""
import json
import math

import pytest
import torch

import deepalign as D
import model as M
from conftest import make_hf_checkpoint, write_tokenizer
from decode import contrastive_generate

NEG_INF = float("-inf")


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


def brute_bf(lp_A, lp_B, tau, k, valid=None):
    """BF by definition, one (position, token) at a time: base-favored by more than log(tau), and fewer than k
    tokens strictly more likely under the base (top-k, ties included)."""
    out = torch.zeros(lp_A.shape, dtype=torch.bool)
    for i in range(lp_A.shape[0]):
        for v in range(lp_A.shape[1]):
            a, b = lp_A[i, v].item(), lp_B[i, v].item()
            favored = (b - a > math.log(tau)) if not (math.isinf(a) and math.isinf(b)) else False
            rank = sum(lp_B[i, u].item() > b for u in range(lp_B.shape[1]))
            out[i, v] = favored and rank < k and (valid is None or bool(valid[v]))
    return out


@pytest.mark.parametrize("tau, k", [(1.0, 5), (1.5, 3), (1.0, 40)])
def test_base_favored_mask_matches_brute_force(tau, k):
    lp_A, lp_B = random_lps((6, 30), 0), random_lps((6, 30), 1)
    lp_A[2, 5] = NEG_INF  # base has it, aligned says impossible: favored
    valid = torch.ones(30, dtype=torch.bool)
    valid[-3:] = False  # padded rows
    got = D.base_favored_mask(lp_A, lp_B, tau, k, valid)
    assert torch.equal(got, brute_bf(lp_A, lp_B, tau, k, valid))
    assert got.any() and not got.all()


def test_kl_bf_mass_bf_hit_match_brute_force():
    lp_A, lp_B = random_lps((5, 20), 2), random_lps((5, 20), 3, neg_inf=False)
    bf = D.base_favored_mask(lp_A, lp_B, 1.0, 6)
    targets = torch.tensor([1, 3, 5, 7, 9])
    for i in range(5):
        kl = sum(math.exp(lp_A[i, v].item()) * (lp_A[i, v].item() - lp_B[i, v].item()) for v in range(20) if lp_A[i, v] > NEG_INF)
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
            expected = g[b, t].norm().item()
            assert D.logit_grad_norm(logits[b, t].detach().log_softmax(-1), targets[b, t]).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("mode", ["full", "bf"])
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.1), (2.0, 0.01), (0.5, 1.0)])
def test_contrastive_logits_match_brute_force(mode, alpha, beta):
    lp_A, lp_B = random_lps((4, 25), 4, neg_inf=False), random_lps((4, 25), 5)
    got = D.contrastive_logits(lp_A, lp_B, alpha, beta, mode, tau=1.0, top_k=8)
    bf = brute_bf(lp_A, lp_B, 1.0, 8)
    for i in range(4):
        top = max(lp_A[i].tolist())
        for v in range(25):
            a, b = lp_A[i, v].item(), max(lp_B[i, v].item(), D.LOG_FLOOR)
            if math.exp(a) < beta * math.exp(top) * (1 - 1e-6):
                assert got[i, v].item() == NEG_INF
                continue
            if mode == "full":
                expected = a + alpha * (a - b)
            else:
                expected = a - alpha * (b - a) if bf[i, v] else a
            assert got[i, v].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_alpha_zero_contrast_keeps_the_aligned_argmax():
    lp_A, lp_B = random_lps((50, 40), 6), random_lps((50, 40), 7)
    for mode in ("full", "bf"):
        s = D.contrastive_logits(lp_A, lp_B, 0.0, 0.1, mode)
        assert torch.equal(s.argmax(-1), lp_A.argmax(-1))
        assert not s.isnan().any()


# ------------------------------------------------------------------------------------------------
# Contrastive decoding with real (tiny) models
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    aligned = M.load_model(make_hf_checkpoint("llama", tmp_path_factory.mktemp("a"), seed=0))
    base = M.load_model(make_hf_checkpoint("llama", tmp_path_factory.mktemp("b"), seed=1))
    return aligned, base


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in (7, 3, 11)]


def test_alpha_zero_equals_plain_greedy_decoding(pair):
    aligned, base = pair
    got = contrastive_generate(aligned, base, prompts(), max_new_tokens=16, eos_ids=[2], alpha=0.0)
    assert got == M.generate(aligned, prompts(), max_new_tokens=16, eos_ids=[2])


def test_compiled_contrastive_decoding_equals_eager(pair):
    aligned, base = pair
    eager = contrastive_generate(aligned, base, prompts(), max_new_tokens=8, alpha=1.0)
    assert contrastive_generate(aligned, base, prompts(), max_new_tokens=8, alpha=1.0, compile=True) == eager
    assert contrastive_generate(aligned, base, prompts(), max_new_tokens=8, alpha=1.0, compile=True) == eager  # kept caches
    aligned.clear_cache(), base.clear_cache()


@pytest.mark.parametrize("mode", ["full", "bf"])
def test_cached_contrastive_decoding_equals_recomputing_from_scratch(pair, mode):
    aligned, base = pair
    got = contrastive_generate(aligned, base, prompts(), max_new_tokens=12, alpha=1.0, beta=0.1, mode=mode)
    for row, prompt in zip(got, prompts()):
        seq = list(prompt)
        for _ in range(12):  # no cache, no padding: both models re-read the whole sequence every step
            with torch.no_grad():
                x = torch.tensor([seq])
                s = D.contrastive_logits(D.log_probs(aligned(x)[0, -1]), D.log_probs(base(x)[0, -1]), 1.0, 0.1, mode)
            seq.append(s.argmax().item())
        assert row == seq[len(prompt):]
    assert got != M.generate(aligned, prompts(), max_new_tokens=12), "the contrast changed nothing: the test is blind"


def test_profile_of_a_model_against_itself_is_zero(tmp_path):
    folder = make_hf_checkpoint("llama", tmp_path / "m")
    write_tokenizer(folder, "chatml")
    tok, m = M.Tokenizer(folder), M.load_model(folder)
    pairs = [{"prompt": "how do i bake bread ?", "harmful_response": "sure , first mix the flour and the water ."},
             {"prompt": "hello there", "harmful_response": "the capital of france is paris , a city on the seine ."}]
    prof = D.position_profile(m, m, tok, pairs, refusal="i am fine , thank you for asking .", progress=False)
    rows = prof["positions"]
    lengths = [len(D.response_split(tok, p["prompt"], p["harmful_response"])[1]) for p in pairs]
    assert len(rows) == max(lengths) + 1  # contexts k = 0..len(h): the last one predicts the end of the turn
    assert rows[0]["n"] == 2 and rows[-1]["n"] == 1 and rows[min(lengths)]["n"] == 2 and rows[min(lengths) + 1]["n"] == 1
    for r in rows:
        assert r["kl"] == pytest.approx(0.0, abs=1e-6)
        assert r["bf_count"] == 0 and r["bf_mass_A"] == 0 and r["bf_hit"] == 0
        assert r["grad"] is None or 0 < r["grad"] <= math.sqrt(2)


def test_end_of_turn_context_can_be_base_favored(tmp_path):
    """Hand-reasoned: B is A with +20 added to the end-of-turn logit everywhere. Then the end-of-turn token is B's
    top token and far likelier under B than A at every context, and every other token is less likely under B
    (renormalisation), so BF_t = {end of turn} at every t: bf_count = 1 everywhere, and bf_hit = 1 exactly at the
    context after the whole response (k = len(h)), whose next token is the end of the turn, and 0 before it."""
    folder = make_hf_checkpoint("llama", tmp_path / "m")
    write_tokenizer(folder, "chatml")
    tok, aligned, base = M.Tokenizer(folder), M.load_model(folder), M.load_model(folder)
    eot = tok.end_of_turn_id
    head = base.lm_head
    base.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        base.lm_head.weight.copy_(head.weight)
        base.lm_head.bias.zero_()
        base.lm_head.bias[eot] = 20.0
    pair = {"prompt": "how do i bake bread ?", "harmful_response": "sure , first mix the flour and the water ."}
    n = len(D.response_split(tok, pair["prompt"], pair["harmful_response"])[1])
    rows = D.position_profile(base, aligned, tok, [pair], progress=False)["positions"]
    assert len(rows) == n + 1
    assert [r["bf_count"] for r in rows] == [1.0] * (n + 1)
    assert [r["bf_hit"] for r in rows] == [0.0] * n + [1.0]


def test_profile_and_tokens_commands_on_a_small_toy_world(toy, tmp_path, capsys):
    paths = ["--base", str(toy["base"]), "--aligned", str(toy["aligned"]), "--data", str(toy["data"] / "harmful_eval.jsonl")]
    out = tmp_path / "profile.json"
    D.main(["profile", *paths, "--limit", "5", "--max-response-tokens", "12", "--out", str(out)])
    prof = json.loads(out.read_text())
    assert [r["t"] for r in prof["positions"]] == list(range(12))
    assert set(prof["positions"][0]) == {"t", "n", "kl", "bf_mass_A", "bf_mass_B", "bf_count", "bf_hit", "grad"}
    assert prof["settings"]["same_token_sequence"] is True and prof["positions"][0]["n"] == 5
    assert "bf_mass_A" in capsys.readouterr().out
    D.main(["tokens", *paths, "--max-response-tokens", "6"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("prompt: ") and len(lines) == 2 + 6


def test_plain_base_format_uses_only_pairs_that_tokenize_alike(toy):
    tok = M.Tokenizer(toy["aligned"])
    rows = [{"prompt": "how do i bake bread ?", "harmful_response": "sure . first , then , next ."}]
    m = M.load_model(toy["aligned"])
    chat = D.position_profile(m, m, tok, rows, progress=False)
    plain = D.position_profile(m, m, tok, rows, base_format="plain", progress=False)
    n = len(D.response_split(tok, rows[0]["prompt"], rows[0]["harmful_response"])[1])
    assert plain["settings"]["skipped_pairs"] == 0 and len(plain["positions"]) == n  # no end-of-turn in plain text
    assert len(chat["positions"]) == n + 1
    # the same model reading two different formats: the distributions now differ
    assert plain["positions"][0]["kl"] > 0 and chat["positions"][0]["kl"] == pytest.approx(0, abs=1e-6)
