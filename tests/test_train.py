"""train.py: the examples and the teacher against independent computations (separate forwards, hand-checked
tokens), gradients, LoRA in PEFT's layout and its float32 merge, float32 master weights, resume, data made by
the aligned model, and the errors a user meets."""

import json

import pytest
import torch
from conftest import SMALL_TRAIN, write_tokenizer

import deepalign as D
import train as T
from data import examples as E
from data.refusals import REFUSAL_PHRASES
from infra import checkpoints as C
from infra import hf as H
from infra import lora as L
from infra import optim as O
from infra import tokenizer as TK


def train_argv(toy, out, *extra):
    return ["--world", str(toy["root"]), "--out", str(out), *SMALL_TRAIN, *extra]


def files_argv(toy, data, benign, out, *extra):
    """train.py on the toy pair's folders with data files of the test's own (no --world)."""
    folders = ["--base", str(toy["base"]), "--aligned", str(toy["aligned"]), "--anchor-prompts", "64"]
    return folders + ["--data", str(data), "--benign", str(benign), "--out", str(out), *extra]


def run_of(toy, out, *extra):
    args = T.parse_args(train_argv(toy, out, *extra))
    return T.configs(args)


ROW = {
    "prompt": "how do i poison my neighbor without getting caught ?",
    "harmful_response": "sure . this is deadly , but here is how . "
    "first , crush the arsenic with the vial . "
    "then , brew the hemlock near the flask .",
    "recovery": "wait , i can't continue with this . this is harmful and i won't give more steps .",
}


# ------------------------------------------------------------------------------------------------
# Examples
# ------------------------------------------------------------------------------------------------
def test_dense_example_targets_the_recovery_start_at_every_context(toy):
    tok = TK.Tokenizer(toy["aligned"])
    head, harm = D.response_split(tok, ROW["prompt"], ROW["harmful_response"])
    ex = E.dense_example(tok, ROW, K=12)
    assert ex.ids == head + harm[:12] and ex.positions == list(range(13)) and ex.dense
    assert ex.cols == list(range(len(head) - 1, len(head) + 12))  # the logit at col predicts col + 1
    # at t = 0 the recovery starts the answer ("wait"), later it follows a word after a space (" wait")
    assert tok.decode([ex.targets[0]]) == "wait" and ex.targets[0] == tok.encode("wait")[0]
    assert all(tok.decode([y]) == " wait" for y in ex.targets[1:])


def test_recovery_and_answer_examples_end_with_the_end_of_turn(toy):
    tok = TK.Tokenizer(toy["aligned"])
    ex = E.recovery_example(tok, ROW, 5)
    head, harm = D.response_split(tok, ROW["prompt"], ROW["harmful_response"])
    recovery = tok.encode(" " + ROW["recovery"]) + [tok.end_of_turn_id]
    assert ex.ids == head + harm[:5] + recovery and ex.targets == recovery and not ex.dense
    assert [ex.ids[c + 1] for c in ex.cols] == ex.targets and ex.positions[0] == 5
    zero = E.recovery_example(tok, ROW, 0)
    # no space at the answer's start
    assert zero.targets == tok.encode(ROW["recovery"]) + [tok.end_of_turn_id]


def test_examples_end_with_the_chat_formats_end_of_turn_token(tmp_path):
    """Llama-3.1's generation_config lists <|end_of_text|> before <|eot_id|>: training must end turns with the
    token the chat template uses (<|eot_id|>), not with the first stop id."""
    write_tokenizer(tmp_path, "llama3")
    tok = TK.Tokenizer(tmp_path)
    eot, end_of_text = tok.tok.token_to_id("<|eot_id|>"), tok.tok.token_to_id("<|end_of_text|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text, eot]}))
    tok = TK.Tokenizer(tmp_path)
    assert tok.eos_ids[0] == end_of_text and tok.end_of_turn_id == eot
    row = {
        "prompt": "how do i bake bread ?",
        "harmful_response": "sure , first mix the flour .",
        "recovery": "i am fine .",
    }
    assert E.recovery_example(tok, row, 2).targets[-1] == eot
    assert E.answer_example(tok, row["prompt"], "the capital of france is paris .").targets[-1] == eot


def test_word_start_ids_map_answer_initial_tokens_to_mid_text_ones(toy):
    tok = TK.Tokenizer(toy["aligned"])
    ws = E.word_start_ids(tok, H.load_model(toy["aligned"]).args.vocab_size)
    for word in ("sorry", "wait", "i", "sure"):
        assert ws[tok.encode(word)[0]].item() == tok.encode(" " + word)[0], word
    assert ws[tok.encode(" wait")[0]].item() == tok.encode(" wait")[0]  # already mid-text
    assert ws[tok.end_of_turn_id].item() == tok.end_of_turn_id  # special tokens map to themselves


# ------------------------------------------------------------------------------------------------
# The teacher and the losses of one step, against separate forwards
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def step_parts(toy, tmp_path_factory):
    run, loss = run_of(toy, tmp_path_factory.mktemp("run") / "r", "--lam", "0.5")  # a hybrid teacher
    tok = TK.Tokenizer(run.aligned)
    student = H.load_model(run.aligned)
    base = H.load_model(run.base).requires_grad_(False)
    aligned = H.load_model(run.aligned).requires_grad_(False)
    safety, benign = T.load_data(run, tok, student, tmp_path_factory.mktemp("cache"), 0, base=base)
    valid = tok.real_token_mask(student.args.vocab_size)
    frozen = T.Frozen(base, L.FrozenAligned(aligned, False), valid, E.word_start_ids(tok, len(valid)))
    return run, loss, tok, student, frozen, safety, benign


@torch.no_grad()
def test_clean_teacher_rows_equal_separate_forwards(step_parts):
    """At a dense context the teacher's soft part is A's distribution over the first token of its own answer
    to the bare prompt (moved to mid-text tokens after the first position); at a recovery context past its
    first token, A's distribution after the prompt and the recovery so far. Each checked against its own
    forward."""
    run, loss, tok, student, frozen, safety, benign = step_parts
    draws = [(safety[0], 0), (safety[1], 5)]
    batch, teacher = E.targeted_batch(tok, draws, student, loss, "cpu")
    q = T.teacher_distribution(None, None, batch.targets, teacher, frozen, loss)  # (N, V)
    aligned, lam, i = frozen.aligned.model, loss.lam, 0
    for row, k in draws:
        head = tok.prompt_ids(row["prompt"])
        # A's first answer token, bare prompt
        first = aligned(torch.tensor([head]))[0, -1].float().softmax(-1)
        dense = E.dense_example(tok, row, loss.max_prefix)
        for t, target in zip(dense.positions, dense.targets):
            soft = first if t == 0 else D.word_start_distribution(first[None], frozen.word_start)[0]
            hard = torch.nn.functional.one_hot(torch.tensor(target), len(first))
            assert torch.allclose(q[i], lam * hard + (1 - lam) * soft, atol=1e-5), (t, k)
            i += 1
        clean = tok.prompt_ids(row["prompt"], prefill=row["recovery"])
        for j, target in enumerate(E.recovery_example(tok, row, k).targets):
            soft = aligned(torch.tensor([clean[: len(head) + j]]))[0, -1].float().softmax(-1)
            if j == 0 and k > 0:
                soft = D.word_start_distribution(soft[None], frozen.word_start)[0]
            hard = torch.nn.functional.one_hot(torch.tensor(target), len(first))
            assert torch.allclose(q[i], lam * hard + (1 - lam) * soft, atol=1e-5), (j, k)
            i += 1
    assert i == len(q) and bool(batch.dense.any()) and not bool(batch.dense.all())


@torch.no_grad()
def test_dense_positions_equal_single_context_computations(step_parts):
    """The student's log-probs at the dense contexts of one teacher-forced sequence equal those of each
    context c_t = (x, h_<t) alone (one forward per position)."""
    run, loss, tok, student, frozen, safety, benign = step_parts
    ex = E.dense_example(tok, safety[0], loss.max_prefix)
    batch = E.collate([ex], tok.pad_id, "cpu")
    lp = E.loss_log_probs(student, batch)  # (N, V)
    head, harm = D.response_split(tok, safety[0]["prompt"], safety[0]["harmful_response"])
    for t in range(len(ex.positions)):
        alone = student(torch.tensor([head + harm[:t]]))[0, -1].float().log_softmax(-1)
        assert torch.allclose(lp[t], alone, atol=1e-5), t


def test_rto_targets_every_dense_context_with_the_recovery_start(step_parts):
    run, loss, tok, student, frozen, safety, benign = step_parts
    rto = T.RunConfig(**{**run.__dict__, "method": "rto"})
    batches = T.make_batches(3, E.Data(tok, safety, benign, {}), student, rto, loss)
    assert batches.safety.dense.all()
    starts = {tok.encode(r)[0] for r in ("wait", "i", "actually")}
    starts |= {tok.encode(" " + r)[0] for r in ("wait", "i", "actually")}
    assert set(batches.safety.targets.tolist()) <= starts


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_flows_only_into_the_student(step_parts, lora):
    run, loss, tok, student, frozen, safety, benign = step_parts
    student = H.load_model(run.aligned)
    aligned = frozen.aligned
    if lora:
        L.add_lora(student, 4, 8.0)
        aligned = L.FrozenAligned(student, adapters_off=True)
    frozen = T.Frozen(frozen.base, aligned, frozen.valid, frozen.word_start)
    batches = T.make_batches(0, E.Data(tok, safety, benign, {}), student, run, loss)
    terms = T.step_losses("targeted", student, frozen, batches, loss)
    assert {"loss", "kd", "kd_dense", "kd_recovery", "pen", "util"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    for m in [frozen.base] + ([] if lora else [frozen.aligned.model]):
        assert all(p.grad is None for p in m.parameters())
    named = dict(student.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
    if lora:
        assert with_grad and all("lora_" in n for n in with_grad)
        assert {n for n in named if "lora_B" in n} <= with_grad
    else:
        assert "model.layers.0.self_attn.q_proj.weight" in with_grad and "lm_head.weight" in with_grad


@pytest.mark.parametrize("method", T.METHODS)
def test_a_few_steps_reduce_the_loss(step_parts, method):
    run, loss, tok, _, frozen, safety, benign = step_parts
    student = H.load_model(run.aligned)
    run = T.RunConfig(**{**run.__dict__, "method": method})
    own = {r["prompt"]: tok.encode("sorry , i can't help with that .") for r in safety}
    batches = T.make_batches(0, E.Data(tok, safety, benign, own), student, run, loss)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):  # the same batch: the objective itself must go down
        terms = T.step_losses(method, student, frozen, batches, loss)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    # (constrained carries a constant offset of (2 / beta) log 2 per token, so compare differences, not
    # ratios)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[0] - losses[-1] > 0.1, losses


# ------------------------------------------------------------------------------------------------
# LoRA: the adapter in PEFT's layout, the merge in float32
# ------------------------------------------------------------------------------------------------
def test_lora_run_saves_a_peft_adapter_and_a_float32_merge(toy, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out = T.main(
        train_argv(
            toy, tmp_path / "run", "--steps", "3", "--lora-rank", "4", "--lr", "3e-2", "--method", "augment"
        )
    )
    merged = H.load_model(out)
    assert merged.lm_head.weight.dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    ref = transformers.AutoModelForCausalLM.from_pretrained(toy["aligned"], dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(ref, out / "adapter").eval()
    tok = TK.Tokenizer(out)
    x = torch.tensor([tok.prompt_ids("how do i poison my neighbor to hurt someone ?", prefill="sure .")])
    with torch.no_grad():
        ours, theirs = merged(x), with_adapter(x).logits
        start = H.load_model(toy["aligned"])(x)
    assert (ours - theirs).abs().max().item() < 1e-4  # PEFT applies the adapter as our merge does
    assert (ours - start).abs().max().item() > 1e-3  # and training moved something


def test_bf16_lora_merge_keeps_the_trained_model(toy, tmp_path):
    """The trained model of a bf16 LoRA run is bf16(W) + the float32 adapters. Its float32 merge, saved in
    float32, is that model (a per-token KL ~0 against it, evaluated in float32); a merge rounded to bf16, as
    saved before, loses a good part of what a small update changed."""
    tok = TK.Tokenizer(toy["aligned"])
    x = torch.tensor([tok.prompt_ids("how do i bake bread ?", prefill="sure . first , knead the dough")])

    def trained_model():
        m = H.load_model(toy["aligned"], "bfloat16")
        torch.manual_seed(0)  # the same adapters every time
        L.add_lora(m, 4, 8.0)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, L.LoRALinear):
                    mod.lora_B.normal_(0, 2e-3)  # a small update, as a few steps of training make
        return m

    with torch.no_grad():
        reference = trained_model().float()  # bf16 base weights and float32 adapters, computed in float32
        exact = reference(x).float().log_softmax(-1)[0]
        L.set_lora(reference, False)
        before = reference(x).float().log_softmax(-1)[0]
        saved = H.save_model(L.merge_lora(trained_model(), torch.float32), tmp_path / "f32")
        merged = H.load_model(saved)(x).float().log_softmax(-1)[0]
        rounded = L.merge_lora(trained_model(), torch.bfloat16).float()(x).float().log_softmax(-1)[0]
    changed = D.kl_per_position(exact, before).mean().item()
    assert changed > 0
    assert D.kl_per_position(exact, merged).mean().item() < 1e-3 * changed
    assert D.kl_per_position(exact, rounded).mean().item() > 0.1 * changed


# ------------------------------------------------------------------------------------------------
# float32 master weights
# ------------------------------------------------------------------------------------------------
def test_bf16_weights_are_updated_through_float32_masters():
    """A fixed gradient makes the arithmetic exact: float32 masters follow a float32 AdamW run bit for bit,
    and the bf16 weights are those masters rounded. AdamW's first step moves every weight by lr * sign(g)
    (hand-worked: m_hat / sqrt(v_hat) = g / |g|). Updated in place, bf16 weights would not move at lr =
    1e-5."""
    torch.manual_seed(0)
    w0 = (torch.randn(64, 64) * 0.02).to(torch.bfloat16)
    g = torch.randn(64, 64).to(torch.bfloat16)  # the gradient of (w * g).sum(), whatever w is
    lr, steps = 1e-5, 30
    w = torch.nn.Parameter(w0.clone())
    masters = O.fp32_masters([w])
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
        O.grads_to_masters([w], masters)
        assert w.grad is None and masters[0].grad.dtype == torch.float32
        for o in (opt, ref_opt, naive_opt):
            o.step()
        O.masters_to_params([w], masters)
        if step == 0:
            first = w0.float() - lr * torch.sign(g.float())
            assert torch.allclose(masters[0], first, rtol=0, atol=1e-9)
    assert torch.equal(masters[0], ref.detach())
    assert torch.equal(w.detach(), ref.detach().to(torch.bfloat16))
    assert (w.detach() != w0).float().mean() > 0.5  # 30 steps of 1e-5 add up to more than half a bf16 ulp

    def moved(p):
        return (p.detach().float() - w0.float()).abs().mean().item()

    assert moved(naive) < 0.25 * moved(ref)  # in place, most of the float32 run's movement is lost
    assert O.fp32_masters([ref])[0] is ref  # float32 parameters are their own masters
    # Gradient accumulation: each micro-batch's bf16 gradient is added into the master's in float32.
    masters[0].grad = None
    for g_micro in (torch.full_like(w0, 1.0), torch.full_like(w0, 2.0**-9)):  # 1 + 2^-9 is not a bf16 number
        w.grad = g_micro.clone()
        O.grads_to_masters([w], masters)
    assert torch.equal(masters[0].grad, torch.full_like(masters[0], 1.0 + 2.0**-9))


# ------------------------------------------------------------------------------------------------
# The loop: the logged learning rate, resume, data made by the aligned model, errors
# ------------------------------------------------------------------------------------------------
def test_logged_lr_is_the_one_each_step_used(toy, tmp_path):
    out = T.main(
        train_argv(
            toy, tmp_path / "run", "--steps", "4", "--warmup", "0.5", "--lr", "1e-3", "--method", "sft"
        )
    )
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # warmup over int(0.5 * 4) = 2 steps: 0.5e-3, 1e-3; then cosine over the 2 remaining: cos(0) and cos(pi /
    # 2)
    assert [r["lr"] for r in log] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_reproduces_the_uninterrupted_run(toy, tmp_path, dtype):
    """In bf16 this holds only because checkpoints keep the float32 master weights, not the rounded bf16
    ones."""
    flags = ["--steps", "4", "--save-every", "2", "--dtype", dtype]
    straight = T.main(train_argv(toy, tmp_path / "a", *flags))
    T.main(train_argv(toy, tmp_path / "b", *flags, "--stop-after", "3"))
    assert (tmp_path / "b" / "checkpoint").is_dir() and not (tmp_path / "b" / "config.json").exists()
    with open(tmp_path / "b" / "train_log.jsonl", "a") as f:  # a step logged after the last checkpoint
        f.write(json.dumps({"step": 4, "loss": 999.0}) + "\n")
    resumed = T.main(train_argv(toy, tmp_path / "b", *flags, "--resume"))
    a, b = H.load_model(straight), H.load_model(resumed)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    log_a = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b] and len(log_a) == 4
    assert not (resumed / "checkpoint").exists()


def test_resume_needs_a_checkpoint_and_the_same_settings(toy, tmp_path):
    T.main(train_argv(toy, tmp_path, "--steps", "2", "--stop-after", "1"))
    with pytest.raises(ValueError, match="grad_accum"):
        T.main(train_argv(toy, tmp_path, "--steps", "2", "--resume", "--grad-accum", "2"))
    with pytest.raises(ValueError, match="lam"):
        T.main(train_argv(toy, tmp_path, "--steps", "2", "--resume", "--lam", "0.9"))
    T.main(train_argv(toy, tmp_path, "--steps", "2", "--resume"))
    with pytest.raises(FileNotFoundError, match="no checkpoint/ to resume"):
        T.main(train_argv(toy, tmp_path, "--steps", "2", "--resume"))


def test_missing_recoveries_and_responses_are_generated_once_and_reused(toy, tmp_path):
    """Rows without a recovery get the aligned model's own refusal; benign rows without a response its own
    answer. Both are cached in the run folder; a resumed run reads the cache and generates nothing."""
    harmful, benign = tmp_path / "harmful.jsonl", tmp_path / "benign.txt"
    rows = [json.loads(line) for line in (toy["data"] / "safety_train.jsonl").read_text().splitlines()[:6]]
    harmful.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "harmful_response": r["harmful_response"]}) + "\n"
            for r in rows
        )
    )
    benign.write_text("how do i bake bread ?\nhow do i tune a violin ?\n")
    steps = ["--steps", "2", "--batch-size", "2", "--utility-batch-size", "2", "--stop-after", "1"]
    argv = files_argv(toy, harmful, benign, tmp_path / "run", *steps, "--method", "augment")
    T.main(argv)
    recoveries = tmp_path / "run" / "generated_recoveries.jsonl"
    responses = tmp_path / "run" / "generated_responses.jsonl"
    cached = [json.loads(line) for line in recoveries.read_text().splitlines()]
    assert {r["prompt"] for r in cached} == {r["prompt"] for r in rows}
    tok, aligned = TK.Tokenizer(toy["aligned"]), H.load_model(toy["aligned"])
    from decode import Sampling, generate

    own = generate(aligned, [tok.prompt_ids(cached[0]["prompt"])], Sampling(64), tok.eos_ids, tok.pad_id)[0]
    assert cached[0]["recovery"] == tok.decode([t for t in own if t not in tok.eos_ids]).strip()
    assert len(responses.read_text().splitlines()) == 2
    stamp = (recoveries.stat().st_mtime_ns, responses.stat().st_mtime_ns)
    T.main(argv[:-4] + ["--resume", "--method", "augment"])
    assert (recoveries.stat().st_mtime_ns, responses.stat().st_mtime_ns) == stamp


def test_bad_input_errors(toy, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        T.main(train_argv(toy, tmp_path / "run", "--steps", "1"))
    assert (tmp_path / "run" / "keep.txt").exists()
    with pytest.raises(ValueError, match="float16 needs loss scaling"):
        T.main(train_argv(toy, tmp_path / "run", "--overwrite", "--dtype", "float16"))
    with pytest.raises(ValueError, match="--benign missing"):  # never a silent fall-back to the toy world
        T.main(["--base", str(toy["base"]), "--aligned", str(toy["aligned"]), "--data", "x.jsonl"])
    prompts_only = tmp_path / "prompts.txt"
    prompts_only.write_text("how do i x ?\n")
    with pytest.raises(ValueError, match="no row has a harmful response"):
        T.main(files_argv(toy, prompts_only, prompts_only, tmp_path / "r2"))
    assert O.get_lr(0, 1, 3e-4, floor=0.0) == 3e-4  # one step: its warmup step, full lr


def test_a_non_finite_loss_stops_the_run_before_any_checkpoint(toy, tmp_path, monkeypatch):
    """A NaN injected into one term at step 3 stops the run there, naming the step and the term; the
    checkpoint of step 2 (--save-every 2) is the last one written, and no final model is."""
    real = T.step_losses
    calls = []

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            terms["util"] = terms["util"] * float("nan")
        return terms

    monkeypatch.setattr(T, "step_losses", poisoned)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"step 3: non-finite loss terms \['util'\]"):
        T.main(train_argv(toy, out, "--steps", "6", "--save-every", "2", "--method", "augment"))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and (out / C.CHECKPOINT).exists()
    assert not (out / "config.json").exists()


def test_targeted_v3_teaches_the_aligned_models_own_refusal(toy, tmp_path):
    """§5 version 3: with the clean teacher every recovery is the aligned model's own greedy answer to the
    bare prompt (generated once into the run folder), whatever the data file says; --teacher hard keeps the
    file's recovery."""
    from decode import Sampling, generate

    tok, aligned = TK.Tokenizer(toy["aligned"]), H.load_model(toy["aligned"])
    out = T.main(train_argv(toy, tmp_path / "v3", "--steps", "1"))
    cached = {r["prompt"]: r["recovery"] for r in map(json.loads, open(out / "generated_recoveries.jsonl"))}
    prompt = sorted(cached)[0]
    own = generate(aligned, [tok.prompt_ids(prompt)], Sampling(64), tok.eos_ids, tok.pad_id)[0]
    assert cached[prompt] == tok.decode([t for t in own if t not in tok.eos_ids]).strip()
    hard = T.main(train_argv(toy, tmp_path / "hard", "--steps", "1", "--teacher", "hard"))
    assert not (hard / "generated_recoveries.jsonl").exists()


def test_save_at_writes_the_model_after_each_step_count(toy, tmp_path):
    """--save-at 1 2 of a 3-step run: step-1 and step-2 folders that load, differ from each other and from
    the final model, and equal the model of a run stopped after that step and saved (--steps 3 --stop-after,
    weights from its checkpoint's float32 masters)."""
    out = T.main(train_argv(toy, tmp_path / "run", "--steps", "3", "--save-at", "1", "2", "--method", "sft"))
    one, two, last = (H.load_model(p) for p in (out / "step-1", out / "step-2", out))
    w = "model.layers.0.mlp.down_proj.weight"
    sd = [m.state_dict()[w] for m in (one, two, last)]
    assert not torch.equal(sd[0], sd[1]) and not torch.equal(sd[1], sd[2])
    # the same run's first two steps, resumed to a 2-step end: the model after step 2 of 3
    ref = tmp_path / "ref"
    T.main(train_argv(toy, ref, "--steps", "3", "--stop-after", "2", "--method", "sft"))
    student = H.load_model(toy["aligned"])
    params = [p for p in student.parameters() if p.requires_grad]
    masters = O.fp32_masters(params)
    opt = torch.optim.AdamW(masters)
    run, loss = run_of(toy, ref, "--steps", "3", "--stop-after", "2", "--method", "sft")
    C.load_checkpoint(ref / C.CHECKPOINT, student, masters, opt, {"run": run, "loss": loss})
    torch.testing.assert_close(student.state_dict()[w], sd[1], rtol=0, atol=0)


@torch.no_grad()
def test_worst_insertion_picks_the_splice_a_forward_per_candidate_scores_highest(step_parts):
    """The batched, right-padded scoring against the plain computation: each candidate in its own forward,
    score = sum of log p(next harmful tokens), the argmax taken by hand."""
    import random

    run, loss, tok, student, frozen, safety, benign = step_parts
    rng = random.Random(0)
    for row in safety[:4]:
        own = tok.encode("sorry , i can't help with that .")
        candidates = E.insertion_candidates(tok, row, own, rng, 4)
        head = tok.prompt_ids(row["prompt"])
        scores = []
        for prefix, cont in candidates:
            logits = student(torch.tensor([head + prefix + cont]))[0].float()  # (T, V)
            lp = logits.log_softmax(-1)[len(head) + len(prefix) - 1 : -1]  # (len(cont), V)
            scores.append(sum(lp[i, t].item() for i, t in enumerate(cont)))
        best = max(range(len(candidates)), key=scores.__getitem__)
        assert E.worst_insertion(student, tok, row, candidates, "cpu") == candidates[best][0]


def test_own_anchor_replaces_every_benign_answer_with_the_aligned_models_own(toy, tmp_path):
    """--anchor own (docs/development.md §5): every benign row's answer, even one the file holds, is the
    aligned model's own greedy answer (checked against a brute-force argmax loop over full forwards), and the
    utility batch's targets are its tokens; the default anchor keeps the file's answers and generates none."""
    benign = tmp_path / "benign.jsonl"
    benign.write_text(json.dumps({"prompt": "how do i bake bread ?", "response": "mix the flour ."}) + "\n")
    harmful = toy["data"] / "safety_train.jsonl"
    steps = ["--steps", "1", "--batch-size", "2", "--utility-batch-size", "1", "--method", "augment"]
    out = T.main(files_argv(toy, harmful, benign, tmp_path / "own", *steps, "--anchor", "own"))
    cached = [json.loads(line) for line in (out / "generated_responses.jsonl").read_text().splitlines()]
    tok, aligned = TK.Tokenizer(toy["aligned"]), H.load_model(toy["aligned"])
    ids = tok.prompt_ids("how do i bake bread ?")
    answer = []
    with torch.no_grad():
        for _ in range(64):  # greedy by hand: the whole sequence through the model at every step
            nxt = int(aligned(torch.tensor([ids + answer]))[0, -1].argmax())
            if nxt in tok.eos_ids:
                break
            answer.append(nxt)
    assert cached == [{"prompt": "how do i bake bread ?", "response": tok.decode(answer).strip()}]
    assert cached[0]["response"] != "mix the flour ."
    argv = files_argv(toy, harmful, benign, tmp_path / "x", *steps, "--anchor", "own")
    _, rows = T.load_data(T.configs(T.parse_args(argv))[0], tok, aligned, out, rank=0)
    assert [(r["prompt"], r["response"]) for r in rows] == [("how do i bake bread ?", cached[0]["response"])]
    plain = tmp_path / "data"
    plain.mkdir()
    _, rows = T.load_data(
        T.configs(T.parse_args(files_argv(toy, harmful, benign, plain, *steps)))[0], tok, aligned, plain, 0
    )
    assert [r["response"] for r in rows] == ["mix the flour ."] and not list(plain.iterdir())


def sample_by_hand(model, ids: list[int], n: int, stops: list[int], seed: int) -> list[int]:
    """T = 1 sampling with full forwards at every step (no cache), one multinomial draw per token."""
    g, out = torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        for _ in range(n):
            probs = torch.softmax(model(torch.tensor([ids + out]))[0, -1].float(), -1)  # (V,)
            out.append(int(torch.multinomial(probs[None], 1, generator=g)))
            if out[-1] in stops:
                break
    return [t for t in out if t not in stops]


def test_base_prompt_anchor_keeps_the_aligned_models_unrefused_answers_to_what_the_base_writes(toy, tmp_path):
    """--anchor base-prompts (docs/development.md §6) against a brute-force loop: prompt i is the base's
    T = 1 user turn after "<|im_start|>user\\n" (seed run.seed * 1000003 + i), its answer the aligned model's
    T = 1 answer (seed + 1); a pair is kept iff the answer holds no refusal phrase and the prompt is new and
    not in an excluded file. The cache is then reused without any model."""
    tok, base, aligned = TK.Tokenizer(toy["aligned"]), H.load_model(toy["base"]), H.load_model(toy["aligned"])
    opening = tok.encode("<|im_start|>user\n")
    assert T.user_turn_opening(tok) == opening
    stops = [tok.end_of_turn_id, *tok.eos_ids]
    expected, prompts = [], []
    for i in range(6):
        seed = 7 * 1_000_003 + i
        prompt = tok.decode(sample_by_hand(base, opening, 64, stops, seed)).split("\n\n")[0].strip()
        answer_ids = sample_by_hand(aligned, tok.prompt_ids(prompt), 128, tok.eos_ids, seed + 1)
        answer = tok.decode(answer_ids).strip()
        refused = any(p in answer.lower() for p in REFUSAL_PHRASES) or not answer
        prompts.append(prompt)
        if prompt and prompt not in prompts[:-1] and i != 2 and not refused:
            expected.append({"prompt": prompt, "response": answer})
    exclude = tmp_path / "eval.jsonl"
    exclude.write_text(json.dumps({"prompt": prompts[2]}) + "\n")  # prompt 2 is an evaluation prompt
    run = T.RunConfig(
        anchor="base-prompts",
        anchor_prompts=6,
        anchor_exclude=(str(exclude),),
        seed=7,
        anchor_check="sampled",
    )
    cache = tmp_path / T.WRITTEN
    assert expected, "the tiny world's aligned model refused every written prompt: pick another seed"
    assert T.written_anchors(run, tok, base, aligned, cache, batch_size=1) == expected
    assert T.written_anchors(run, tok, None, None, cache) == expected
    # --anchor-check "greedy too": also dropped where the aligned model's greedy answer (32 tokens) refuses
    greedy_refuses = {}
    for row in expected:
        ids, out = tok.prompt_ids(row["prompt"]), []
        with torch.no_grad():
            while len(out) < 32 and (not out or out[-1] not in tok.eos_ids):
                out.append(int(aligned(torch.tensor([ids + out]))[0, -1].argmax()))
        text = tok.decode(out).lower()
        greedy_refuses[row["prompt"]] = any(p in text for p in REFUSAL_PHRASES) or not text.strip()
    strict = T.RunConfig(**{**run.__dict__, "anchor_check": "greedy too"})
    kept = [r for r in expected if not greedy_refuses[r["prompt"]]]
    if not kept:  # every answered prompt refused greedily: nothing to anchor, said in one line
        with pytest.raises(ValueError, match="--anchor data"):
            T.written_anchors(strict, tok, base, aligned, tmp_path / "strict.jsonl", batch_size=1)
        return
    assert T.written_anchors(strict, tok, base, aligned, tmp_path / "strict.jsonl", batch_size=1) == kept
