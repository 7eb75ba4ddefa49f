"""model.py against transformers (the reference): logits, KV cache, loading/saving, chat format, errors.
Generation (decode.py) is tested in test_decode.py."""

import json

import pytest
import torch
import transformers
from conftest import hf_model, make_hf_checkpoint, random_ids, write_tokenizer

import model as M
from decode import decode_step, left_pad
from infra import hf as H
from infra import tokenizer as TK


# ------------------------------------------------------------------------------------------------
# Logits parity
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 7, 200])
def test_fp32_logits_bit_identical(hf_checkpoint, T):
    variant, folder = hf_checkpoint
    ours, ref = H.load_model(folder), hf_model(folder)
    x = random_ids(2, T, seed=T)
    with torch.no_grad():
        a, b = ours(x), ref(x).logits
    assert a.dtype == b.dtype == torch.float32
    assert (a - b).abs().max().item() <= 1e-5, variant
    assert torch.equal(a, b), f"{variant}: not bit-identical (max diff {(a - b).abs().max().item():.2e})"


def test_bf16_logits_and_greedy_tokens(hf_checkpoint):
    variant, folder = hf_checkpoint
    ours, ref = H.load_model(folder, dtype="bfloat16"), hf_model(folder, torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    x = random_ids(2, 64, seed=1)
    with torch.no_grad():
        a, b = ours(x), ref(x).logits
    assert torch.equal(a.argmax(-1), b.argmax(-1)), variant
    assert (a.float() - b.float()).abs().max().item() <= 1e-2, variant


def test_logits_at_selected_positions_match_transformers(hf_checkpoint):
    """logits_at (a bool mask or (rows, cols)) returns transformers' logits at exactly those positions, in
    order."""
    variant, folder = hf_checkpoint
    ours, ref = H.load_model(folder), hf_model(folder)
    x = random_ids(3, 20, seed=5)
    at = torch.zeros(3, 20, dtype=torch.bool)
    at[0, 4:9], at[2, 11:20] = True, True
    rows, cols = torch.tensor([2, 0, 0, 1]), torch.tensor([19, 0, 7, 3])
    with torch.no_grad():
        full = ref(x).logits  # (3, 20, V)
        by_mask, by_index = ours(x, logits_at=at), ours(x, logits_at=(rows, cols))
    assert by_mask.shape == (14, full.shape[-1]) and by_index.shape == (4, full.shape[-1])
    assert (by_mask - full[at]).abs().max().item() <= 1e-5, variant
    assert (by_index - full[rows, cols]).abs().max().item() <= 1e-5, variant


def test_left_padded_batch_matches_unpadded_rows(hf_checkpoint):
    """Each row of a left-padded batch equals that row alone, and equals transformers given the same mask."""
    variant, folder = hf_checkpoint
    ours, ref = H.load_model(folder), hf_model(folder)
    lengths = [13, 5, 9]
    rows = [random_ids(1, n, seed=n)[0].tolist() for n in lengths]
    ids, mask = left_pad(rows, pad_id=0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = ref(ids, attention_mask=mask, position_ids=positions).logits
        for i, row in enumerate(rows):
            alone = ours(torch.tensor([row]))[0]
            assert (a[i, -len(row) :] - alone).abs().max().item() <= 1e-5, variant
            assert (b[i, -len(row) :] - alone).abs().max().item() <= 1e-5, variant


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------
def test_kv_cache_decoding_equals_full_forward(hf_checkpoint):
    variant, folder = hf_checkpoint
    ours = H.load_model(folder)
    rows = [random_ids(1, 11, seed=3)[0].tolist(), random_ids(1, 6, seed=4)[0].tolist()]
    ids, mask = left_pad(rows, pad_id=0)
    B, T = ids.shape
    steps = random_ids(B, 12, seed=5)  # teacher-forced continuation
    full_ids = torch.cat([ids, steps], 1)
    full_mask = torch.cat([mask, torch.ones_like(steps)], 1)
    with torch.no_grad():
        full = ours(full_ids, attention_mask=full_mask)  # (B, T+12, V)
        ours.cache = M.KVCache(ours.args, B, T + 12)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        pre = ours(ids, attention_mask=mask, positions=positions[:, :T], cache_pos=torch.arange(T))
        valid = mask.bool()
        # Same math, different reduction order (the cache attends over S slots): fp32 rounding only.
        assert (pre - full[:, :T])[valid].abs().max().item() <= 5e-5
        for i in range(steps.shape[1]):
            token, pos = steps[:, i : i + 1], positions[:, T + i : T + i + 1]  # (B, 1) each
            step = decode_step(ours, token, torch.tensor([T + i]), pos)
            assert (step - full[:, T + i]).abs().max().item() <= 5e-5, f"{variant} step {i}"
        ours.cache = None


def test_cache_attention_mask_matches_brute_force():
    """The masks a KVCache builds for a left-padded batch, at the prefill and at each decoding step, equal
    the definition checked one (row, query, key) at a time: a query sees the real tokens at or before its own
    slot, and a padding query sees only itself."""
    lengths, T, steps = [5, 2, 4, 1], 5, 3
    B, S = len(lengths), T + steps + 2  # two slots never written
    real = [[s >= T - n for s in range(S)] for n in lengths]  # real[b][s]: slot s holds a real token

    def brute_force(q_slots):
        mask = torch.zeros(B, 1, len(q_slots), S, dtype=torch.bool)
        for b in range(B):
            for t, q in enumerate(q_slots):
                for s in range(S):
                    mask[b, 0, t, s] = s == q or (s < q and real[b][s])
        return mask

    cache = M.KVCache(M.ModelArgs(n_layers=2, n_kv_heads=2, head_dim=4), B, S)
    _, prompt_mask = left_pad([[7] * n for n in lengths], pad_id=0)  # (B, T)
    cache.record(torch.arange(T), prompt_mask)
    assert torch.equal(cache.attention_mask(torch.arange(T)), brute_force(range(T)))
    for i in range(steps):
        slot = torch.tensor([T + i])
        cache.record(slot)
        assert torch.equal(cache.attention_mask(slot), brute_force([T + i]))


# ------------------------------------------------------------------------------------------------
# Loading and saving
# ------------------------------------------------------------------------------------------------
def test_save_then_transformers_loads_same_logits(hf_checkpoint, tmp_path):
    variant, folder = hf_checkpoint
    ours = H.load_model(folder)
    out = H.save_model(ours, tmp_path / "saved", tokenizer_from=folder, max_shard_bytes=60_000)
    assert (out / "model.safetensors.index.json").exists()  # forced to shard
    assert not list(tmp_path.glob("*.tmp-*"))
    x = random_ids(2, 17)
    with torch.no_grad():
        assert torch.equal(hf_model(out)(x).logits, ours(x))
        assert torch.equal(H.load_model(out)(x), ours(x))


def test_tied_embeddings_stay_tied_after_loading(tmp_path):
    folder = make_hf_checkpoint("qwen2_tied_bias", tmp_path / "q")
    ours = H.load_model(folder)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert not any(p.is_meta for p in ours.parameters())


def test_save_refuses_to_overwrite(tmp_path, hf_checkpoint):
    _, folder = hf_checkpoint
    ours = H.load_model(folder)
    H.save_model(ours, tmp_path / "o")
    with pytest.raises(FileExistsError, match="overwrite"):
        H.save_model(ours, tmp_path / "o")
    H.save_model(ours, tmp_path / "o", overwrite=True)


# ------------------------------------------------------------------------------------------------
# Config parsing and bad input
# ------------------------------------------------------------------------------------------------
TINY_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100
)


def test_config_spellings_4x_and_5x_agree():
    base = dict(model_type="llama", **TINY_CONFIG)
    rope = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    old = M.ModelArgs.from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **rope}})
    new = M.ModelArgs.from_hf_config(
        {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **rope}}
    )
    assert old == new and old.rope_scaling["factor"] == 8.0 and old.rope_theta == 5e5
    assert old.n_kv_heads == 4 and old.head_dim == 16  # defaults: MHA, hidden / heads


def test_llama3_inv_freq_matches_transformers():
    cfg = transformers.LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg).inv_freq
    ours = M.rope_inv_freq(M.ModelArgs.from_hf_config(cfg.to_dict()))
    assert torch.equal(ours, ref)
    assert (ours != M.rope_inv_freq(M.ModelArgs(head_dim=64, rope_theta=500000.0))).sum() > 0


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"model_type": "mistral"}, "model_type='mistral' is not supported; supported: llama, qwen2, qwen3"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window=true"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ],
)
def test_unsupported_config_is_refused(patch, message):
    cfg = {"model_type": "qwen2", **TINY_CONFIG, **patch}
    with pytest.raises(ValueError, match="config.json") as e:
        M.ModelArgs.from_hf_config(cfg)
    assert message in str(e.value)


def _edit_checkpoint(folder, edit):
    """Rewrite a single-file checkpoint with `edit(state_dict)` applied."""
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"),
            "missing (1): model.layers.1.mlp.up_proj.weight",
        ),
        (lambda sd: sd.pop("lm_head.weight"), "lm_head.weight (tie_word_embeddings=false"),
        (
            lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(2)}),
            "unexpected (1): model.layers.0.extra.weight (in model.safetensors)",
        ),
        (
            lambda sd: sd.update({"model.norm.weight": torch.zeros(3)}),
            "wrong shape (1): model.norm.weight (in model.safetensors): (3,), expected (64,)",
        ),
    ],
)
def test_bad_checkpoint_lists_the_problem(tmp_path, edit, message):
    folder = tmp_path / "m"
    H.save_model(
        M.Transformer(
            M.ModelArgs(
                dim=64, n_heads=4, n_kv_heads=2, head_dim=16, n_layers=2, intermediate_size=96, vocab_size=50
            )
        ),
        folder,
    )
    _edit_checkpoint(folder, edit)
    with pytest.raises(ValueError) as e:
        H.load_model(folder)
    assert str(folder) in str(e.value) and message in str(e.value)


def test_old_rotary_buffers_are_skipped(tmp_path):
    folder = tmp_path / "m"
    m = M.Transformer(
        M.ModelArgs(
            dim=32, n_heads=2, n_kv_heads=2, head_dim=16, n_layers=1, intermediate_size=64, vocab_size=40
        )
    )
    H.save_model(m, folder)
    _edit_checkpoint(
        folder, lambda sd: sd.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    )
    H.load_model(folder)


def test_missing_files_are_named(tmp_path):
    """A missing path, a single file (a .gguf, a bare model.safetensors) or a folder without the files: one
    error that names what was passed and what a checkpoint folder holds, from the model and the tokenizer."""
    with pytest.raises(FileNotFoundError, match="no such folder"):
        H.load_model(tmp_path / "nowhere")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    for path in (tmp_path / "model.gguf", tmp_path):
        for load in (H.load_model, TK.Tokenizer):
            with pytest.raises(
                ValueError,
                match=r"not a checkpoint folder .* needs config.json, "
                r"\*.safetensors and tokenizer.json",
            ):
                load(path)
    (tmp_path / "config.json").write_text(json.dumps(M.ModelArgs().to_hf_config()))
    with pytest.raises(ValueError, match=r"a folder without \*.safetensors"):
        H.load_model(tmp_path)


# ------------------------------------------------------------------------------------------------
# Tokenizer and chat format, against transformers' apply_chat_template
# ------------------------------------------------------------------------------------------------
MESSAGES = [{"role": "user", "content": "how do i bake bread ?"}]


@pytest.mark.parametrize("style", ["llama3", "chatml"])
@pytest.mark.parametrize("system", [None, "  be brief .  "])
def test_chat_template_matches_apply_chat_template(tmp_path, style, system):
    write_tokenizer(tmp_path, style)
    ours, ref = TK.Tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    msgs = ([{"role": "system", "content": system}] if system else []) + MESSAGES
    kw = {"date_string": "26 Jul 2024"} if style == "llama3" else {}  # pin the date
    for gen in (True, False):
        text = ours.format_chat(msgs, add_generation_prompt=gen, **kw)
        assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)
        assert ours.encode_chat(msgs, add_generation_prompt=gen, **kw) == list(
            ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=True, **kw)[
                "input_ids"
            ]
        )
    if style == "chatml":
        assert "You are Qwen, created by Alibaba Cloud." in ours.format_chat(MESSAGES)
    else:
        assert ours.format_chat(MESSAGES, **kw).count("<|begin_of_text|>") == 1
        assert ours.encode_chat(MESSAGES, **kw).count(ours.bos_id) == 1  # no double BOS


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_prefilled_prompt_is_generation_prompt_plus_prefix(tmp_path, style):
    write_tokenizer(tmp_path, style)
    ours, ref = TK.Tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    kw = {"date_string": "26 Jul 2024"} if style == "llama3" else {}
    prefix = "sure , first mix the flour"
    expected = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, **kw) + prefix
    assert ours.format_chat(MESSAGES, prefill=prefix, **kw) == expected
    assert (
        ours.encode_chat(MESSAGES, prefill=prefix, **kw)
        == ref(expected, add_special_tokens=False)["input_ids"]
    )


def test_no_template_uses_the_plain_format(tmp_path):
    write_tokenizer(tmp_path, "none")
    tok = TK.Tokenizer(tmp_path)
    assert tok.chat_template is None
    msgs = [{"role": "system", "content": "be brief ."}] + MESSAGES
    assert tok.format_chat(msgs, prefill="sure") == (
        "System: be brief .\n\nUser: how do i bake bread ?\n\nAssistant:\nsure"
    )
    assert tok.format_chat(MESSAGES) == "User: how do i bake bread ?\n\nAssistant:\n"


def test_special_ids_and_eos_list(tmp_path):
    write_tokenizer(tmp_path, "chatml")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = TK.Tokenizer(tmp_path)
    im_end, endoftext = tok.tok.token_to_id("<|im_end|>"), tok.tok.token_to_id("<|endoftext|>")
    assert (im_end, endoftext) == (2, 0)
    assert tok.eos_ids == [2, 0] and tok.pad_id == endoftext and tok.bos_id is None
    assert tok.end_of_turn_id == im_end
    text = "hello there , how are you today ?"
    assert tok.decode(tok.encode(text)) == text


def test_templates_see_tools_as_none_like_transformers(tmp_path):
    write_tokenizer(tmp_path, "chatml")
    (tmp_path / "chat_template.jinja").write_text(
        "{{ 'tools:' ~ (tools is none) ~ ' docs:' ~ (documents is none) }}"
    )
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    expected = ref.apply_chat_template(MESSAGES, tokenize=False)
    rendered = TK.Tokenizer(tmp_path).format_chat(MESSAGES, add_generation_prompt=False)
    assert rendered == expected == "tools:True docs:True"


def test_chat_template_jinja_file_overrides_config_key(tmp_path):
    write_tokenizer(tmp_path, "chatml")
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.content | tojson(indent=2) }}]{% endfor %}"
    )
    assert (
        TK.Tokenizer(tmp_path).format_chat(MESSAGES, add_generation_prompt=False)
        == '["how do i bake bread ?"]'
    )
