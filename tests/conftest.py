"""Shared fixtures: tiny random checkpoints written by `transformers` as real (sharded) safetensors folders.

transformers is the *reference* here; deepalign never imports it at run time.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("llama", "llama3_rope", "qwen2_tied_bias", "qwen3")
# train.py at a size the tests afford: small batches, short prefixes, a small base-prompt anchor (its own test
# checks it)
SMALL_TRAIN = [
    "--batch-size",
    "4",
    "--utility-batch-size",
    "4",
    "--max-prefix",
    "12",
    "--anchor-prompts",
    "64",
]


def hf_config(variant: str):
    import transformers

    common = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if variant == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0, rms_norm_eps=1e-5)
    if variant == "llama3_rope":
        # Llama 3.2-style frequency scaling (factor 32), small original context so that all three bands occur.
        scaling = {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return transformers.LlamaConfig(
            **common, rope_theta=500000.0, rms_norm_eps=1e-5, rope_scaling=scaling
        )
    if variant == "qwen2_tied_bias":
        return transformers.Qwen2Config(**common, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    if variant == "qwen3":
        return transformers.Qwen3Config(
            **common, head_dim=32, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False
        )
    raise KeyError(variant)


def make_hf_checkpoint(variant: str, folder: Path, seed: int = 0) -> Path:
    """Random HF model with sharp logits (std 0.3 weights) and noisy norms/biases, saved in shards."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(variant), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))  # norms and biases matter
            else:
                p.normal_(0.0, 0.3 if "embed" in name else 0.15)
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder


def hf_model(folder, dtype=torch.float32):
    """transformers' model of a checkpoint folder: the reference."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()  # never .to(dtype)


def random_ids(B, T, seed=0, low=3, high=512):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (B, T), generator=g)  # ids 0..2 (pad/bos/eos) never occur in prompts


def small_build():
    """A scaled-down toy-world build (seconds): the real code path, tiny sizes."""
    from data.toyworld import BuildConfig

    return BuildConfig(
        n_pretrain=1500,
        n_alignment=300,
        dim=32,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        intermediate_size=64,
        seq_len=128,
        pretrain_rows=8,
        align_steps=10,
        align_batch=8,
    )


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A scaled-down toy world built through the real code path (data, tokenizer, pretraining, alignment, HF
    folders, world.json). The full build is `python data/toyworld.py`; its numbers are checked by the slow
    tests."""
    from data import toyworld, world

    return toyworld.build_world(tmp_path_factory.mktemp("toy"), world.World(0), small_build())


@pytest.fixture(scope="session", params=VARIANTS)
def hf_checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, make_hf_checkpoint(request.param, folder)


# ---------------------------------------------------------------------------------------------
# Tokenizers and chat templates for the formatting tests
# ---------------------------------------------------------------------------------------------
CHATML_QWEN25 = (  # the structure of Qwen2.5-Instruct's template: a default system prompt when none is given
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_STYLE = (  # the structure of Llama-3.1-Instruct's template: BOS, an always-present dated system block
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}\n"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = '' %}\n"
    "{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}\n"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}\n"
    "{{- system_message }}\n"
    "{{- '<|eot_id|>' }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role not in ['user', 'assistant'] %}"
    "{{- raise_exception('unknown role ' + message.role) }}{%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

TRAIN_TEXT = [
    "how do i bake bread ? sure , first mix the flour and the water , then knead the dough for ten minutes .",
    "what is the capital of france ? the capital of france is paris , a city on the seine .",
    "hello there , how are you today ? i am fine , thank you for asking .",
    "The quick brown fox jumps over the lazy dog.",
    "System user assistant Today Date Cutting Knowledge December",
]


def write_tokenizer(folder: Path, style: str, vocab_size: int = 400) -> Path:
    """A small byte-level BPE with Llama-3-style or ChatML special tokens, saved like a real checkpoint's."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if style == "llama3":
        specials = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ]
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TRAIN_TEXT * 20, trainer)
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    if style == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
        )
        tcfg.update(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_STYLE)
    elif style == "chatml":
        tcfg.update(
            bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_QWEN25
        )
    else:  # a base model: no chat template
        tcfg.update(bos_token=None, eos_token="<|endoftext|>")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    return folder
