"""decode.py against transformers' generate and against recomputing from scratch: greedy generation,
per-row stopping, sampling, compiled decoding, the KV cache as the only decoding state, contrastive decoding,
the command line."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import hf_model, make_hf_checkpoint, random_ids, write_tokenizer

import deepalign as D
import model as M
from decode import Sampling, contrastive_generate, generate, left_pad, parse_args, sample_next
from infra import hf as H

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Plain generation
# ------------------------------------------------------------------------------------------------
def test_greedy_generate_matches_transformers(hf_checkpoint):
    variant, folder = hf_checkpoint
    ours, ref = H.load_model(folder), hf_model(folder)
    rows = [random_ids(1, n, seed=10 + n)[0].tolist() for n in (9, 4, 15)]
    got = generate(ours, rows, Sampling(max_new_tokens=20), eos_ids=[2], pad_id=0)
    ids, mask = left_pad(rows, pad_id=0)
    with torch.no_grad():
        hf = ref.generate(
            ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=0
        )
    for i, row in enumerate(got):
        expected = hf[i, ids.shape[1] :].tolist()
        expected = expected[: expected.index(2) + 1] if 2 in expected else expected
        assert row == expected, f"{variant} row {i}"


def test_generate_stops_per_row_and_samples_reproducibly(hf_checkpoint):
    variant, folder = hf_checkpoint
    ours = H.load_model(folder)
    rows = [random_ids(1, 5, seed=s)[0].tolist() for s in range(4)]
    greedy = generate(ours, rows, Sampling(max_new_tokens=8))
    stop = greedy[0][2]  # make row 0 stop at its third token
    stopped = generate(ours, rows, Sampling(max_new_tokens=8), eos_ids=[stop])
    assert stopped[0] == greedy[0][: greedy[0].index(stop) + 1]
    for g, s in zip(greedy, stopped):
        assert s == g[: g.index(stop) + 1] if stop in g else s == g
    sampled = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a, b = generate(ours, rows, sampled), generate(ours, rows, sampled)
    assert a == b and all(len(r) == 8 for r in a)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {sample_next(logits, 1.0, 0.7, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are cut
    assert sample_next(logits, 0.0).item() == 0


def test_compiled_decode_step_matches_eager(tmp_path):
    folder = make_hf_checkpoint("llama", tmp_path / "m")
    ours = H.load_model(folder)
    rows = [random_ids(1, n, seed=n)[0].tolist() for n in (6, 3)]
    torch._dynamo.reset()
    compiled = generate(ours, rows, Sampling(max_new_tokens=6, compile=True))
    # The compiled path keeps its cache and reuses it for a call that fits (shorter prompt, same batch) ...
    kept = ours.cache.k[0]
    shorter = [r[:2] for r in rows]
    compiled_shorter = generate(ours, shorter, Sampling(max_new_tokens=5, compile=True))
    assert ours.cache.k[0] is kept
    # ... a kept cache never leaks into a plain forward ...
    x = random_ids(2, 9, seed=3)
    with torch.no_grad():
        with_kept_cache = ours(x)
        ours.cache = None
        assert torch.equal(with_kept_cache, ours(x))
    # ... and every compiled token equals eager decoding.
    assert compiled == generate(ours, rows, Sampling(max_new_tokens=6))
    assert compiled_shorter == generate(ours, shorter, Sampling(max_new_tokens=5))


def tensors_besides_parameters(model) -> list[str]:
    """Every tensor the model's modules hold apart from their parameters: buffers and tensor attributes."""
    names = [name for name, _ in model.named_buffers()]
    for prefix, module in model.named_modules():
        names += [f"{prefix}.{k}" for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
    return names


def test_one_kv_cache_object_is_the_only_decoding_state(tmp_path):
    ours = H.load_model(make_hf_checkpoint("llama", tmp_path / "m"))
    rows = [random_ids(1, n, seed=n)[0].tolist() for n in (6, 3)]
    generate(ours, rows, Sampling(max_new_tokens=4))
    assert ours.cache is None and tensors_besides_parameters(ours) == []  # eager: no cache remains
    torch._dynamo.reset()
    generate(ours, rows, Sampling(max_new_tokens=4, compile=True))
    cache = ours.cache  # compiled: the cache is kept, and it is the model's only state besides its parameters
    assert isinstance(cache, M.KVCache) and tensors_besides_parameters(ours) == []
    tensors = [*cache.k, *cache.v, cache.valid]
    assert len(tensors) == 2 * ours.args.n_layers + 1
    assert all(t.device == ours.lm_head.weight.device for t in tensors)
    assert all(t.dtype == ours.lm_head.weight.dtype for t in cache.k + cache.v)
    addresses = [t.data_ptr() for t in tensors]
    # A second compiled call with the same batch size (and a length that fits) reuses the same cache tensors,
    # so the compiled step sees the same shapes and tensors: no recompile.
    with torch._dynamo.config.patch(error_on_recompile=True):
        generate(ours, [r[:4] for r in rows], Sampling(max_new_tokens=3, compile=True))
    assert ours.cache is cache and [t.data_ptr() for t in (*cache.k, *cache.v, cache.valid)] == addresses
    ours.cache = None


# ------------------------------------------------------------------------------------------------
# Contrastive decoding with real (tiny) models
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    aligned = H.load_model(make_hf_checkpoint("llama", tmp_path_factory.mktemp("a"), seed=0))
    base = H.load_model(make_hf_checkpoint("llama", tmp_path_factory.mktemp("b"), seed=1))
    return aligned, base


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in (7, 3, 11)]


def test_alpha_zero_equals_plain_greedy_decoding(pair):
    aligned, base = pair
    got = contrastive_generate(aligned, base, prompts(), Sampling(16), D.Contrast(alpha=0.0), eos_ids=[2])
    assert got == generate(aligned, prompts(), Sampling(16), eos_ids=[2])


def test_compiled_contrastive_decoding_equals_eager(pair):
    aligned, base = pair
    eager, compiled = Sampling(max_new_tokens=8), Sampling(max_new_tokens=8, compile=True)
    expected = contrastive_generate(aligned, base, prompts(), eager, D.Contrast(alpha=1.0))
    assert contrastive_generate(aligned, base, prompts(), compiled, D.Contrast(alpha=1.0)) == expected
    kept_caches = contrastive_generate(aligned, base, prompts(), compiled, D.Contrast(alpha=1.0))
    assert kept_caches == expected
    for m in pair:
        m.cache = None


@pytest.mark.parametrize("mode", ["full", "bf"])
def test_cached_contrastive_decoding_equals_recomputing_from_scratch(pair, mode):
    aligned, base = pair
    got = contrastive_generate(aligned, base, prompts(), Sampling(12), D.Contrast(1.0, 0.1, mode))
    for row, prompt in zip(got, prompts()):
        seq = list(prompt)
        for _ in range(12):  # no cache, no padding: both models re-read the whole sequence every step
            with torch.no_grad():
                x = torch.tensor([seq])
                lp_A, lp_B = D.log_probs(aligned(x)[0, -1]), D.log_probs(base(x)[0, -1])  # (V,) each
                s = D.contrastive_logits(lp_A, lp_B, D.Contrast(1.0, 0.1, mode))
            seq.append(s.argmax().item())
        assert row == seq[len(prompt) :]
    plain = generate(aligned, prompts(), Sampling(12))
    assert got != plain, "the contrast changed nothing: the test is blind"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def test_decode_cli_prints_transformers_greedy_completion(tmp_path):
    folder = make_hf_checkpoint("llama", tmp_path / "m")
    write_tokenizer(folder, "chatml")  # ids < 400 < vocab 512; <|im_end|> = 2 = the config's eos
    prompt, prefill = "how do i bake bread ?", "sure , first"
    command = [
        sys.executable,
        str(ROOT / "decode.py"),
        "--model",
        str(folder),
        "--prompt",
        prompt,
        "--prefill",
        prefill,
        "--max-new-tokens",
        "12",
    ]
    res = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": prompt}]
    text = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill
    ids = torch.tensor([ref_tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        pad = ref_tok.convert_tokens_to_ids("<|endoftext|>")
        out = hf_model(folder).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=pad
        )
    assert res.stdout == ref_tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) + "\n"
    assert res.stdout.strip(), "empty completion: the test would not catch anything"


def test_decode_cli_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in (
        "(default: 64)",
        "(default: how do i bake bread ?)",
        "(default: float32)",
        "(default: False)",
        "(default: 2.0)",  # contrastive alpha and beta, chosen on development worlds (docs/development.md)
        "(default: 0.03)",
        "(default: full)",
        "(default: 20)",
        "(default: the world's aligned model)",  # --model: a computed default, in words
        "(default: none)",  # --prefill, --system
    ):
        assert default in text
    assert "docs/method.md §4" in text
    assert "(default: )" not in text and "(default: None)" not in text  # every default shown once, in words


# ------------------------------------------------------------------------------------------------
# The sampling attack's shared prompt cache
# ------------------------------------------------------------------------------------------------
def test_shared_cache_samples_equal_separate_teacher_forced_runs(hf_checkpoint):
    """samples=n reads each prompt once and repeats its KV cache for n samples: the logits every sample saw at
    every step equal a plain forward over (prompt, that sample's tokens so far), prompt by prompt, one sample
    at a time (no cache, no padding); the samples of one prompt differ."""
    from decode import decode_loop

    _, folder = hf_checkpoint
    model = H.load_model(folder)
    prompts = [random_ids(1, n, seed=s)[0].tolist() for s, n in ((1, 5), (2, 3))]  # unequal: left padding
    seen = []

    def score(logits):  # (B * n, V)
        seen.append(logits.float().clone())
        return logits.float()

    n = 3
    outs = decode_loop([model], prompts, score, Sampling(6, temperature=1.0, seed=3, samples=n))
    assert len(outs) == len(prompts) * n and len({tuple(o) for o in outs[:n]}) > 1
    for row, out in enumerate(outs):
        prompt = prompts[row // n]
        with torch.no_grad():
            ref = model(torch.tensor([prompt + out]))[0, len(prompt) - 1 :].float()  # (len(out) + 1, V)
        for step in range(len(out)):
            torch.testing.assert_close(seen[step][row], ref[step], rtol=1e-4, atol=1e-4)
