"""The tokenizer of a checkpoint folder, and its chat format:

    tok = Tokenizer(folder)                 tokenizer.json (via `tokenizers`), the special ids: bos_id,
                                            eos_ids (every id that ends generation), pad_id, end_of_turn_id
    tok.prompt_ids(prompt, prefill=...)     one user turn, the generation prompt and a forced start of the
                                            answer (the prefilling attack), as token ids
    tok.format_chat / encode_chat           any list of messages, as text / as token ids
    tok.real_token_mask(V)                  which of the model's V ids are real, trained tokens

The chat format is the checkpoint's own chat template (chat_template.jinja or tokenizer_config.json's key),
rendered with jinja2 as transformers renders it; a checkpoint without one (a base model), or a call with
plain=True, gets the plain format: each message renders as "{Role}: {content}\\n\\n" (Role = System, User,
Assistant), the generation prompt is "Assistant:\\n", and a forced prefix follows it directly (after the
newline, as in ChatML, so a response tokenizes the same way in both formats); the tokenizer's own special
tokens (e.g. Llama's BOS) are added by its post-processor.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from infra.hf import check_folder, read_json


def _read_json_if_exists(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def _token_text(value):
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: Path, tcfg: dict) -> str | None:
    """The folder's chat template: chat_template.jinja (newer saves; it overrides tokenizer_config's key),
    else tokenizer_config.json's "chat_template" (a string, or a list of named ones: the "default"), else
    None."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        return {t["name"]: t["template"] for t in template}.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """tokenizer.json (via `tokenizers`) + the special ids and chat template of a checkpoint folder."""

    def __init__(self, folder):
        from tokenizers import Tokenizer as HFTokenizer

        folder = check_folder(folder, needs=("tokenizer.json",))
        self.folder = folder
        self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        tcfg = _read_json_if_exists(folder / "tokenizer_config.json")
        mcfg = _read_json_if_exists(folder / "config.json")
        gcfg = _read_json_if_exists(folder / "generation_config.json")
        self.special_tokens = {
            k: _token_text(tcfg[k])
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if tcfg.get(k) is not None
        }
        self.bos_id = self._id(self.special_tokens.get("bos_token"), mcfg.get("bos_token_id"))
        # Stop on any of: generation_config's eos list, config.json's, and the tokenizer's eos token.
        eos: list[int] = []
        tokenizer_eos = self._id(self.special_tokens.get("eos_token"))
        for value in (gcfg.get("eos_token_id"), mcfg.get("eos_token_id"), tokenizer_eos):
            for i in value if isinstance(value, list) else [value]:
                if i is not None and i not in eos:
                    eos.append(i)
        self.eos_ids = eos
        pad = self._id(
            self.special_tokens.get("pad_token"), mcfg.get("pad_token_id"), gcfg.get("pad_token_id")
        )
        self.pad_id = pad if pad is not None else (eos[0] if eos else 0)
        self.chat_template, self._compiled_template = _chat_template(folder, tcfg), None

    @functools.cached_property
    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn in this checkpoint's chat format: the first special token
        the template renders after an assistant message (Llama 3: <|eot_id|>, ChatML: <|im_end|>), else the
        tokenizer's eos token. Not eos_ids[0]: Llama-3.1's generation_config lists <|end_of_text|> first.
        Rendered once per tokenizer (training asks for it for every example)."""
        if self.chat_template is not None:
            mark = "deepalign-end-of-turn-probe"
            turn = [{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}]
            text = self.format_chat(turn, add_generation_prompt=False)
            specials = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
            after = self.encode(text[text.index(mark) + len(mark) :]) if mark in text else []
            for i in after:
                if i in specials:
                    return i
        eos = self._id(self.special_tokens.get("eos_token"))
        return eos if eos is not None else self.eos_ids[0]

    def _id(self, token, *fallbacks):
        if token is not None:
            i = self.tok.token_to_id(token)
            if i is not None:
                return i
        return next((f for f in fallbacks if f is not None and not isinstance(f, list)), None)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def format_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        prefill: str = "",
        plain: bool = False,
        **template_kwargs,
    ) -> str:
        """Render messages with the checkpoint's own chat template (or the plain format when it has none, or
        when `plain=True`), then append `prefill`, a forced start of the assistant's answer (the prefilling
        attack), right after the generation prompt."""
        if self.chat_template is None or plain:
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
            if add_generation_prompt:
                text += "Assistant:\n" + prefill
            return text
        if self._compiled_template is None:  # compile once per tokenizer
            self._compiled_template = _jinja_env().from_string(self.chat_template)
        # the variables transformers passes
        variables = {"tools": None, "documents": None, **self.special_tokens, **template_kwargs}
        text = self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
        return text + prefill

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        prefill: str = "",
        plain: bool = False,
        **template_kwargs,
    ) -> list[int]:
        """Token ids of `format_chat(...)`, tokenized in one pass so BPE merges across the prefill boundary
        match what the model would see. A template renders its own BOS, so no special tokens are added;
        the plain format lets the tokenizer's post-processor add them."""
        text = self.format_chat(messages, add_generation_prompt, prefill, plain, **template_kwargs)
        return self.encode(text, add_special_tokens=self.chat_template is None or plain)

    def prompt_ids(
        self, prompt: str, prefill: str = "", system: str | None = None, plain: bool = False
    ) -> list[int]:
        """A single user turn (optionally after a system message), the generation prompt, and `prefill`."""
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": prompt})
        return self.encode_chat(messages, add_generation_prompt=True, prefill=prefill, plain=plain)

    def real_token_mask(self, vocab_size: int) -> torch.Tensor:
        """(V,) bool: ids that are real tokens. False for rows past the tokenizer (Qwen pads its embedding to
        151936/152064) and for special tokens (Llama 3's 250 reserved ones are untrained). Vocabulary-wide
        statistics such as base-favored tokens are restricted to these."""
        valid = torch.zeros(vocab_size, dtype=torch.bool)
        valid[: min(self.vocab_size, vocab_size)] = True
        for i, added in self.tok.get_added_tokens_decoder().items():
            if added.special and i < vocab_size:
                valid[i] = False
        return valid

    def same_vocabulary(self, other: "Tokenizer") -> bool:
        return self.tok.get_vocab(with_added_tokens=True) == other.tok.get_vocab(with_added_tokens=True)


def _jinja_env():
    """A sandboxed jinja2 environment with the helpers real chat templates call (as transformers provides)."""
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
