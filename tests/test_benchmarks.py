"""benchmarks.py: MMLU and BBH on a tiny random checkpoint against transformers, on prompt strings built here
by hand; the test answers are set from transformers' own predictions, so the expected accuracy is known."""

import csv
import json

import conftest
import pytest
import torch
import transformers
from conftest import make_hf_checkpoint, write_tokenizer

import model as M
from benchmarks import bbh_accuracy, letter_token_ids, mmlu_accuracy, read_mmlu_csv

LETTER_TEXT = ["Answer: A\n\nAnswer: B\n\nAnswer: C\n\nAnswer: D\n\n"] * 5  # " A" .. " D": single tokens

DEV = {  # subject -> shots [question, A, B, C, D, answer]
    "abstract_algebra": [
        ["what is 2 + 2 ?", "4", "5", "6", "7", "A"],
        ["what is the capital of france ?", "rome", "paris", "bread", "water", "B"],
    ],
    "world_history": [
        ["how do i bake bread ?", "knead the dough", "stir the soup", "the seine", "ten", "A"],
        ["hello there , how are you today ?", "fine", "paris", "flour", "dough", "A"],
    ],
}
QUESTIONS = {  # subject -> test questions [question, A, B, C, D]; the answers are set in the test
    "abstract_algebra": [
        ["what is 3 + 4 ?", "7", "the lazy dog", "12", "minutes"],
        ["The quick brown fox jumps over what ?", "the dog", "the seine", "paris", "bread"],
        ["how long do you knead the dough ?", "ten minutes", "one day", "never", "a year"],
        ["System user assistant ?", "Today", "Date", "Cutting", "Knowledge"],
    ],
    "world_history": [
        ["what city is on the seine ?", "paris", "rome", "water", "flour"],
        ["what do you mix with the flour ?", "the water", "the fox", "the dog", "December"],
        ["thank you for asking , how are you ?", "fine", "lazy", "quick", "brown"],
        ["December ?", "hello", "there", "how", "are"],
    ],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama with a Llama-3-style tokenizer (BOS from its post-processor) where " A" .. " D" are
    single tokens after "Answer:"."""
    folder = tmp_path_factory.mktemp("mmlu_model")
    make_hf_checkpoint("llama", folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conftest, "TRAIN_TEXT", conftest.TRAIN_TEXT + LETTER_TEXT)
        write_tokenizer(folder, "llama3")
    return folder


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def hand_prompt(about: str, shots, question) -> str:
    """hendrycks' evaluate.py prompt, written out by hand (note the two spaces after 'about')."""
    text = f"The following are multiple choice questions (with answers) about  {about}.\n\n"
    for q, a, b, c, d, answer in shots:
        text += f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {answer}\n\n"
    q, a, b, c, d = question
    return text + f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def transformers_letters(checkpoint, prompts: list[str]) -> list[str]:
    """The letter among " A" .. " D" with the highest transformers log-probability after each prompt."""
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    letters = hf.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD"])  # byte-level BPE: Ġ is a leading space
    out = []
    for prompt in prompts:
        ids = hf(prompt).input_ids  # with BOS, from the post-processor
        with torch.no_grad():
            log_probs = ref(torch.tensor([ids])).logits[0, -1].log_softmax(-1)  # (V,)
        out.append("ABCD"[int(log_probs[letters].argmax())])
    return out


def wrong(letter: str) -> str:
    return "ABCD"[("ABCD".index(letter) + 1) % 4]


def test_mmlu_accuracy_and_predictions_match_transformers(checkpoint, tmp_path):
    about = {"abstract_algebra": "abstract algebra", "world_history": "world history"}
    expected = {
        s: transformers_letters(checkpoint, [hand_prompt(about[s], DEV[s], q) for q in QUESTIONS[s]])
        for s in QUESTIONS
    }
    assert len({p for preds in expected.values() for p in preds}) > 1  # the predictions vary
    right = {"abstract_algebra": 3, "world_history": 1}  # the first n answers are transformers' predictions
    for s, preds in expected.items():
        answers = [p if i < right[s] else wrong(p) for i, p in enumerate(preds)]
        write_csv(tmp_path / "data" / "dev" / f"{s}_dev.csv", DEV[s])
        rows = [q + [a] for q, a in zip(QUESTIONS[s], answers)]
        write_csv(tmp_path / "data" / "test" / f"{s}_test.csv", rows)

    model, tok = M.load_model(checkpoint), M.Tokenizer(checkpoint)
    result = mmlu_accuracy(model, tok, tmp_path, shots=2, batch_size=3)  # the parent of data/ is accepted
    assert result["n"] == 8 and result["shots"] == 2
    assert result["accuracy"] == pytest.approx(4 / 8)
    for s in QUESTIONS:
        assert result["subjects"][s]["predictions"] == expected[s]
        assert result["subjects"][s]["n"] == 4
        assert result["subjects"][s]["accuracy"] == pytest.approx(right[s] / 4)

    limited = mmlu_accuracy(model, tok, tmp_path / "data", shots=2, limit=2)
    assert limited["n"] == 4
    assert limited["subjects"]["abstract_algebra"]["accuracy"] == pytest.approx(1.0)  # 2 of the 3 right ones
    assert limited["subjects"]["world_history"]["accuracy"] == pytest.approx(0.5)
    assert limited["subjects"]["world_history"]["predictions"] == expected["world_history"][:2]


def test_mmlu_errors(checkpoint, tmp_path):
    bad = tmp_path / "x_test.csv"
    write_csv(bad, [["q", "a", "b", "c", "d", "A"], ["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(ValueError, match=f"{bad}:2: expected question,A,B,C,D,answer"):
        read_mmlu_csv(bad)
    with pytest.raises(FileNotFoundError, match="no dev/ and test/"):
        mmlu_accuracy(None, None, tmp_path)
    plain = tmp_path / "plain_tokenizer"
    plain.mkdir()
    write_tokenizer(plain, "base")  # trained without "Answer: A": " A" is two tokens
    with pytest.raises(ValueError, match="splits ' A' after 'Answer:'"):
        letter_token_ids(M.Tokenizer(plain))


def transformers_greedy_text(checkpoint, prompts: list[str], max_new_tokens: int, eos_ids) -> list[str]:
    """transformers' greedy continuation of each prompt (argmax with its own KV cache, up to an eos id)."""
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    texts = []
    for prompt in prompts:
        with torch.no_grad():
            out = ref(torch.tensor([hf(prompt).input_ids]), use_cache=True)
            tokens = []
            for _ in range(max_new_tokens):
                tokens.append(int(out.logits[0, -1].argmax()))
                if tokens[-1] in eos_ids:
                    break
                out = ref(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
        texts.append(hf.decode(tokens, skip_special_tokens=True))
    return texts


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def test_bbh_accuracy_matches_transformers_greedy_answers(checkpoint, tmp_path):
    tasks = {
        "word_sorting": [
            ("sort: dog fox", "dog fox"),
            ("sort: water flour", "flour water"),
            ("sort: paris seine", "?"),
            ("sort: bread dough", "?"),
            ("sort: oven skillet", "?"),
        ],
        "boolean_expressions": [
            ("True and False is", "False"),
            ("not True is", "False"),
            ("True or False is", "?"),
            ("not not True is", "?"),
            ("False or True is", "?"),
        ],
    }
    shots = 2
    prompts = {}
    for name, examples in tasks.items():
        head = "".join(f"Q: {x}\nA: {y}\n\n" for x, y in examples[:shots])
        prompts[name] = [head + f"Q: {x}\nA:" for x, _ in examples[shots:]]
    tok = M.Tokenizer(checkpoint)
    texts = transformers_greedy_text(
        checkpoint, prompts["word_sorting"] + prompts["boolean_expressions"], 6, tok.eos_ids
    )
    answers = {
        "word_sorting": [first_line(t) for t in texts[:3]],
        "boolean_expressions": [first_line(t) for t in texts[3:]],
    }
    right = {"word_sorting": 1, "boolean_expressions": 2}  # the first n targets are transformers' answers
    for name, examples in tasks.items():
        targets = [a if i < right[name] else a + " wrong" for i, a in enumerate(answers[name])]
        records = [{"input": x, "target": y} for x, y in examples[:shots]]
        records += [{"input": x, "target": t} for (x, _), t in zip(examples[shots:], targets)]
        (tmp_path / f"{name}.json").write_text(json.dumps({"examples": records}))

    model = M.load_model(checkpoint)
    result = bbh_accuracy(model, tok, tmp_path, shots=shots, max_new_tokens=6, batch_size=2)
    assert result["n"] == 6 and result["accuracy"] == pytest.approx(3 / 6)
    for name in tasks:
        assert result["tasks"][name]["answers"] == answers[name]
        assert result["tasks"][name]["accuracy"] == pytest.approx(right[name] / 3)
