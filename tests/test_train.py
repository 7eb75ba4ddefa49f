"""Training losses against hand-computed values, and train.py's loop: gradients, LoRA, resume, errors."""
import json
import math

import pytest
import torch

import deepalign as D
import model as M
import train as T

LOG = math.log


# ------------------------------------------------------------------------------------------------
# Loss functions on tiny examples worked by hand (plain Python arithmetic)
# ------------------------------------------------------------------------------------------------
def lp(*probs):
    return torch.tensor([[LOG(p) if p > 0 else float("-inf") for p in probs]])


def test_hybrid_teacher_hand_computed():
    pA, pB = [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]
    # s = lp_A + 1 * (lp_A - lp_B) -> unnormalised pA^2 / pB; V_head (beta 0.1): all three (0.1 >= 0.06)
    u = [a * a / b for a, b in zip(pA, pB)]
    soft = [x / sum(u) for x in u]
    expected = [0.5 * (v == 1) + 0.5 * soft[v] for v in range(3)]
    q = D.hybrid_teacher(lp(*pA), lp(*pB), torch.tensor([1]), lam=0.5, alpha_T=1.0, beta=0.1)
    assert q[0].tolist() == pytest.approx(expected, abs=1e-6)
    # beta 0.4 drops token 2 (0.1 < 0.4 * 0.6): the soft part renormalises over tokens 0 and 1
    q = D.hybrid_teacher(lp(*pA), lp(*pB), torch.tensor([2]), lam=0.5, alpha_T=1.0, beta=0.4)
    s01 = [u[0] / (u[0] + u[1]), u[1] / (u[0] + u[1])]
    assert q[0].tolist() == pytest.approx([0.5 * s01[0], 0.5 * s01[1], 0.5], abs=1e-6)


def test_kd_loss_hand_computed():
    q = torch.tensor([[0.5, 0.5, 0.0]])
    pS = [0.25, 0.25, 0.5]
    expected = 0.5 * LOG(0.5 / 0.25) * 2  # the q = 0 term contributes nothing
    assert D.kd_loss(q, lp(*pS), torch.ones(1)).item() == pytest.approx(expected, rel=1e-6)


def test_adaptive_and_position_weights_hand_computed():
    m = torch.tensor([0.2, 0.6, 0.0, 2.0])
    mask = torch.ones(4)
    # mean 0.7 -> 0.2857, 0.8571, 0, 2.857 clipped at w_max 2
    assert D.adaptive_weights(m, mask, w_max=2.0).tolist() == pytest.approx([0.2 / 0.7, 0.6 / 0.7, 0.0, 2.0], rel=1e-6)
    # masked positions are excluded from the mean and get weight 0
    w = D.adaptive_weights(m, torch.tensor([1.0, 1.0, 0.0, 0.0]), w_max=5.0)
    assert w.tolist() == pytest.approx([0.5, 1.5, 0.0, 0.0], rel=1e-6)
    pos = torch.tensor([0.0, 5.0, 10.0, 20.0])
    assert D.adaptive_weights(m, mask, mode="position", gamma=2.0, positions=pos).tolist() == pytest.approx([1, 1.5, 2, 3])


def test_bf_penalty_hand_computed_and_zero_without_bf_mass():
    lp_S = lp(0.5, 0.3, 0.2)
    bf = torch.tensor([[False, True, True]])
    assert D.bf_penalty(lp_S, bf, torch.tensor([2.0]), torch.ones(1)).item() == pytest.approx(2.0 * 0.5)
    no_mass = lp(1.0, 0.0, 0.0)  # the student puts all its mass outside BF
    assert D.bf_penalty(no_mass, bf, torch.tensor([2.0]), torch.ones(1)).item() == 0.0


def test_utility_kl_ce_and_constrained_hand_computed():
    pA, pS = [0.7, 0.2, 0.1], [0.5, 0.25, 0.25]
    kl = sum(a * LOG(a / s) for a, s in zip(pA, pS))
    assert D.utility_kl(lp(*pA), lp(*pS), torch.ones(1)).item() == pytest.approx(kl, rel=1e-6)
    assert D.ce_loss(lp(*pS), torch.tensor([1]), torch.ones(1)).item() == pytest.approx(-LOG(0.25), rel=1e-6)
    # (2 / beta) softplus(beta (logp_A(y) - logp_S(y))) with y = 0: logp_A = log .7, logp_S = log .5, beta .5
    expected = (2 / 0.5) * LOG(1 + math.exp(0.5 * (LOG(0.7) - LOG(0.5))))
    got = D.constrained_loss(lp(*pS), lp(*pA), torch.tensor([0]), torch.tensor([0.5]), torch.ones(1))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert D.qi_beta_schedule(torch.tensor([0, 1, 4, 5, 9])).tolist() == pytest.approx([0.5, 2.0, 2.0, 0.1, 0.1])


# ------------------------------------------------------------------------------------------------
# The training loop on the scaled-down toy world
# ------------------------------------------------------------------------------------------------
def run_args(toy, tmp_path, *extra):
    return T.parse_args(["--base", str(toy["base"]), "--aligned", str(toy["aligned"]),
                         "--data", str(toy["data"] / "safety_train.jsonl"), "--benign", str(toy["data"] / "benign_train.jsonl"),
                         "--out", str(tmp_path / "run"), "--batch-size", "4", "--utility-batch-size", "4",
                         "--max-prefix", "12", *extra])


def models_and_batch(toy, args, lora=False):
    tok = M.Tokenizer(args.aligned)
    student, base = M.load_model(args.aligned), M.load_model(args.base).requires_grad_(False)
    teacher = M.load_model(args.aligned).requires_grad_(False)
    if lora:
        T.add_lora(student, 4, 8.0)
        teacher = "adapters-off"
    safety_rows, benign_rows = T.load_data(args)
    own = {r["prompt"]: tok.encode("i can't help with that .") for r in safety_rows}
    batches = T.make_batches(0, tok, safety_rows, benign_rows, own, student, args, "cpu")
    return tok, student, teacher, base, batches


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_flows_only_into_the_student(toy, tmp_path, lora):
    args = run_args(toy, tmp_path)
    tok, student, teacher, base, (safety, utility) = models_and_batch(toy, args, lora)
    terms, _ = T.step_losses("targeted", student, teacher, base, safety, utility, args, tok.real_token_mask(student.args.vocab_size))
    assert set(terms) >= {"loss", "kd", "pen", "util"} and all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    for frozen in [base] + ([] if lora else [teacher]):
        assert all(p.grad is None for p in frozen.parameters())
    named = dict(student.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
    if lora:
        assert with_grad and all("lora_" in n for n in with_grad)
        assert {n for n in named if "lora_B" in n} <= with_grad
    else:
        assert "model.layers.0.self_attn.q_proj.weight" in with_grad and "lm_head.weight" in with_grad


def test_lora_merged_and_saved_gives_the_same_logits(toy, tmp_path):
    m = M.load_model(toy["aligned"])
    T.add_lora(m, 4, 8.0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, T.LoRALinear):
                mod.lora_B.normal_(0, 0.05)  # a non-trivial update
    x = torch.tensor([M.Tokenizer(toy["aligned"]).prompt_ids("how do i bake bread ?")])
    with torch.no_grad():
        before = m(x)
        T.set_lora(m, False)
        assert not torch.allclose(m(x), before)  # the adapters change something
        T.set_lora(m, True)
        T.merge_lora(m)
        assert not any(isinstance(mod, T.LoRALinear) for mod in m.modules())
        M.save_model(m, tmp_path / "merged")
        after = M.load_model(tmp_path / "merged")(x)
    assert (after - before).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", T.METHODS)
def test_a_few_steps_reduce_the_loss(toy, tmp_path, method):
    args = run_args(toy, tmp_path, "--method", method)
    tok, student, teacher, base, (safety, utility) = models_and_batch(toy, args)
    valid = tok.real_token_mask(student.args.vocab_size)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):  # the same batch: the objective itself must go down
        terms, _ = T.step_losses(method, student, teacher, base, safety, utility, args, valid)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    # (constrained carries a constant offset of (2 / beta) log 2 per token, so compare differences, not ratios)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[0] - losses[-1] > 0.2, losses


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_reproduces_the_uninterrupted_run(toy, tmp_path, dtype):
    """In bf16 this holds only because checkpoints keep the float32 master weights, not the rounded bf16 ones."""
    straight = T.train(run_args(toy, tmp_path / "a", "--steps", "4", "--save-every", "2", "--dtype", dtype))
    T.train(run_args(toy, tmp_path / "b", "--steps", "4", "--save-every", "2", "--stop-after", "3", "--dtype", dtype))
    assert (tmp_path / "b" / "run" / "checkpoint").is_dir() and not (tmp_path / "b" / "run" / "config.json").exists()
    with open(tmp_path / "b" / "run" / "train_log.jsonl", "a") as f:  # a step logged after the last checkpoint
        f.write(json.dumps({"step": 4, "loss": 999.0}) + "\n")
    resumed = T.train(run_args(toy, tmp_path / "b", "--steps", "4", "--save-every", "2", "--resume", "--dtype", dtype))
    a, b = M.load_model(straight), M.load_model(resumed)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    log_a = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b] and len(log_a) == 4
    assert not (resumed / "checkpoint").exists()


def test_bf16_weights_are_updated_through_float32_masters():
    """A fixed gradient makes the arithmetic exact: float32 masters follow a float32 AdamW run bit for bit, and the
    bf16 weights are those masters rounded. AdamW's first step moves every weight by lr * sign(g) (hand-worked:
    m_hat / sqrt(v_hat) = g / |g|). Updated in place, bf16 weights would not move at all at lr = 1e-5."""
    torch.manual_seed(0)
    w0 = (torch.randn(64, 64) * 0.02).to(torch.bfloat16)
    g = torch.randn(64, 64).to(torch.bfloat16)  # the gradient of (w * g).sum(), whatever w is
    lr, steps = 1e-5, 30

    w = torch.nn.Parameter(w0.clone())
    masters = T.fp32_masters([w])
    assert masters[0].dtype == torch.float32 and masters[0] is not w
    opt = torch.optim.AdamW(masters, lr=lr, weight_decay=0.0)
    ref = torch.nn.Parameter(w0.float())  # the float32 run
    ref_opt = torch.optim.AdamW([ref], lr=lr, weight_decay=0.0)
    naive = torch.nn.Parameter(w0.clone())  # bf16 weights updated in place
    naive_opt = torch.optim.AdamW([naive], lr=lr, weight_decay=0.0)
    for step in range(steps):
        for p, o in ((w, opt), (ref, ref_opt), (naive, naive_opt)):
            o.zero_grad()
            (p * g.to(p.dtype)).sum().backward()
        T.grads_to_masters([w], masters)
        assert w.grad is None and masters[0].grad.dtype == torch.float32
        opt.step(), ref_opt.step(), naive_opt.step()
        T.masters_to_params([w], masters)
        if step == 0:
            first = w0.float() - lr * torch.sign(g.float())
            assert torch.allclose(masters[0], first, rtol=0, atol=1e-9)
    assert torch.equal(masters[0], ref.detach())
    assert torch.equal(w.detach(), ref.detach().to(torch.bfloat16))
    assert (w.detach() != w0).float().mean() > 0.5  # 30 steps of 1e-5 add up to more than half a bf16 ulp
    moved = lambda p: (p.detach().float() - w0.float()).abs().mean().item()  # noqa: E731
    assert moved(naive) < 0.25 * moved(ref)  # in place, most of the float32 run's movement is lost
    assert T.fp32_masters([ref])[0] is ref  # float32 parameters are their own masters
    # Gradient accumulation: each micro-batch's bf16 gradient is added into the master's in float32.
    masters[0].grad = None
    g1, g2 = torch.full_like(w0, 1.0), torch.full_like(w0, 2.0**-9)  # 1 + 2^-9 is not a bf16 number
    for g_micro in (g1, g2):
        w.grad = g_micro.clone()
        T.grads_to_masters([w], masters)
    assert torch.equal(masters[0].grad, torch.full_like(masters[0], 1.0 + 2.0**-9))


def test_bad_input_errors(toy, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        T.train(run_args(toy, tmp_path, "--steps", "1"))
    assert (tmp_path / "run" / "keep.txt").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "harmful_response": "y", "recovery": "z"}\n{"prompt": "x", "recovery": "z"}\n')
    args = run_args(toy, tmp_path, "--overwrite")
    args.data = str(bad)
    with pytest.raises(ValueError, match="bad.jsonl:2: missing key 'harmful_response'"):
        T.train(args)
    with pytest.raises(ValueError, match="float16 needs loss scaling"):
        T.train(run_args(toy, tmp_path, "--overwrite", "--dtype", "float16"))


def test_examples_end_with_the_chat_formats_end_of_turn_token(tmp_path):
    """Llama-3.1's generation_config lists <|end_of_text|> before <|eot_id|>: training must end turns with the
    token the chat template uses (<|eot_id|>), not with the first stop id."""
    from conftest import write_tokenizer

    write_tokenizer(tmp_path, "llama3")
    tok = M.Tokenizer(tmp_path)
    eot, end_of_text = tok.tok.token_to_id("<|eot_id|>"), tok.tok.token_to_id("<|end_of_text|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text, eot]}))
    tok = M.Tokenizer(tmp_path)
    assert tok.eos_ids[0] == end_of_text and tok.end_of_turn_id == eot
    row = {"prompt": "how do i bake bread ?", "harmful_response": "sure , first mix the flour .", "recovery": "i am fine ."}
    ids, mask, _ = T.recovery_example(tok, row, 2)
    assert ids[-1] == eot and mask[-1] == 1
    assert T.answer_example(tok, row["prompt"], "the capital of france is paris .")[0][-1] == eot


def test_resume_needs_a_checkpoint_and_the_same_settings(toy, tmp_path):
    T.train(run_args(toy, tmp_path, "--steps", "2", "--stop-after", "1"))
    with pytest.raises(ValueError, match="grad_accum"):
        T.train(run_args(toy, tmp_path, "--steps", "2", "--resume", "--grad-accum", "2"))
    T.train(run_args(toy, tmp_path, "--steps", "2", "--resume"))
    with pytest.raises(FileNotFoundError, match="no checkpoint/ to resume"):
        T.train(run_args(toy, tmp_path, "--steps", "2", "--resume"))
