"""benchmarks.py: MMLU and BBH on a tiny random checkpoint against transformers, on prompt strings built here
by hand; the test answers are set from transformers' own predictions, so the expected accuracy is known."""

import csv
import json

import conftest
import pytest
import torch
import transformers
from conftest import make_hf_checkpoint, random_ids, write_tokenizer

from infra import hf as H
from infra import tokenizer as TK
from lab.benchmarks import (
    batch_letter_scores,
    bbh_accuracy,
    continuation_log_probs,
    letter_continuations,
    mmlu_accuracy,
    read_mmlu_csv,
)

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


@pytest.fixture(scope="module")
def split_checkpoint(tmp_path_factory):
    """The same random Llama with a tokenizer trained without "Answer: A" (nor "December"): its vocabulary
    has no " A" .. " D"; each letter is 'Ġ' + the letter, two tokens."""
    folder = tmp_path_factory.mktemp("mmlu_split")
    make_hf_checkpoint("llama", folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            conftest, "TRAIN_TEXT", [t.replace("December", "november") for t in conftest.TRAIN_TEXT]
        )
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


ABOUT = {"abstract_algebra": "abstract algebra", "world_history": "world history"}


def transformers_scores(checkpoint, prompts: list[str]) -> list[list[float]]:
    """Each letter's log-probability after each prompt by transformers: the prompt with BOS (from the
    post-processor), then the letter's own tokens (" A" encoded alone), their log-probabilities summed in a
    plain loop over a full unpadded forward."""
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    out = []
    for prompt in prompts:
        context, row = hf(prompt).input_ids, []
        for letter in "ABCD":
            tokens = hf(" " + letter, add_special_tokens=False).input_ids
            with torch.no_grad():
                log_probs = ref(torch.tensor([context + tokens])).logits[0].log_softmax(-1)  # (T, V)
            total = 0.0
            for j, t in enumerate(tokens):
                total += log_probs[len(context) - 1 + j, t].item()  # the position before token j predicts it
            row.append(total)
        out.append(row)
    return out


def argmax_letter(scores: list[float]) -> str:
    return "ABCD"[scores.index(max(scores))]


def wrong(letter: str) -> str:
    return "ABCD"[("ABCD".index(letter) + 1) % 4]


def reference_and_data(checkpoint, folder) -> tuple[dict, dict, dict]:
    """transformers' letter scores and predictions of every test question, and an MMLU folder (folder/data)
    whose first `right[subject]` answers are transformers' predictions and the others wrong ones."""
    scores = {
        s: transformers_scores(checkpoint, [hand_prompt(ABOUT[s], DEV[s], q) for q in QUESTIONS[s]])
        for s in QUESTIONS
    }
    expected = {s: [argmax_letter(row) for row in rows] for s, rows in scores.items()}
    right = {"abstract_algebra": 3, "world_history": 1}
    for s, preds in expected.items():
        answers = [p if i < right[s] else wrong(p) for i, p in enumerate(preds)]
        write_csv(folder / "data" / "dev" / f"{s}_dev.csv", DEV[s])
        rows = [q + [a] for q, a in zip(QUESTIONS[s], answers)]
        write_csv(folder / "data" / "test" / f"{s}_test.csv", rows)
    return scores, expected, right


def check_against_reference(result, scores, expected, right):
    assert result["n"] == 8 and result["shots"] == 2
    assert result["accuracy"] == pytest.approx(4 / 8)
    for s in QUESTIONS:
        assert result["subjects"][s]["predictions"] == expected[s]
        assert result["subjects"][s]["n"] == 4
        assert result["subjects"][s]["accuracy"] == pytest.approx(right[s] / 4)
        for ours, ref in zip(result["subjects"][s]["scores"], scores[s]):
            assert ours == pytest.approx(ref, abs=1e-4)


def test_mmlu_accuracy_and_predictions_match_transformers(checkpoint, tmp_path):
    scores, expected, right = reference_and_data(checkpoint, tmp_path)
    assert len({p for preds in expected.values() for p in preds}) > 1  # the predictions vary

    model, tok = H.load_model(checkpoint), TK.Tokenizer(checkpoint)
    result = mmlu_accuracy(model, tok, tmp_path, shots=2, batch_size=3)  # the parent of data/ is accepted
    check_against_reference(result, scores, expected, right)

    limited = mmlu_accuracy(model, tok, tmp_path / "data", shots=2, limit=2)
    assert limited["n"] == 4
    assert limited["subjects"]["abstract_algebra"]["accuracy"] == pytest.approx(1.0)  # 2 of the 3 right ones
    assert limited["subjects"]["world_history"]["accuracy"] == pytest.approx(0.5)
    assert limited["subjects"]["world_history"]["predictions"] == expected["world_history"][:2]


def test_mmlu_multi_token_letters_match_transformers(split_checkpoint, tmp_path):
    """A tokenizer that splits " A" after "Answer:" into two tokens: each letter is scored by the summed
    log-probability of its tokens (teacher-forced), the same accuracy, predictions and scores as
    transformers'."""
    tok = TK.Tokenizer(split_checkpoint)
    prompt = hand_prompt(ABOUT["world_history"], DEV["world_history"], QUESTIONS["world_history"][0])
    assert [len(c) for c in letter_continuations(tok, prompt)] == [2, 2, 2, 2]
    scores, expected, right = reference_and_data(split_checkpoint, tmp_path)
    assert len({p for preds in expected.values() for p in preds}) > 1  # the predictions vary

    result = mmlu_accuracy(H.load_model(split_checkpoint), tok, tmp_path, shots=2, batch_size=3)
    check_against_reference(result, scores, expected, right)


def test_one_token_fast_path_equals_teacher_forcing(checkpoint):
    """With single-token letters, the fast path (next-token log-probs) gives what teacher-forcing gives."""
    model, tok = H.load_model(checkpoint), TK.Tokenizer(checkpoint)
    prompts = [hand_prompt(ABOUT[s], DEV[s], q) for s in QUESTIONS for q in QUESTIONS[s][:2]]
    seqs = [tok.encode(p, add_special_tokens=True) for p in prompts]
    conts = [letter_continuations(tok, p) for p in prompts]
    assert all(len(c) == 1 for letters in conts for c in letters)
    fast = batch_letter_scores(model, seqs, conts, tok.pad_id)  # (4, 4)
    forced = continuation_log_probs(
        model, [s for s in seqs for _ in "ABCD"], [c for letters in conts for c in letters], tok.pad_id
    )
    assert torch.allclose(fast, forced.view(-1, 4), atol=1e-5)


def test_continuation_log_probs_of_mixed_lengths_match_transformers(checkpoint):
    """Continuations of 1, 2 and 3 tokens after prompts of different lengths, in one left-padded forward: the
    sums transformers gives one sequence at a time."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = random_ids(1, 40, seed=3)[0].tolist()
    prompts, conts = (
        [ids[:9], ids[10:30], ids[:5], ids[20:21]],
        [ids[30:33], ids[33:34], ids[34:36], ids[1:3]],
    )
    expected = []
    for prompt, cont in zip(prompts, conts):
        with torch.no_grad():
            log_probs = ref(torch.tensor([prompt + cont])).logits[0].log_softmax(-1)  # (T, V)
        expected.append(sum(log_probs[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont)))
    ours = continuation_log_probs(H.load_model(checkpoint), prompts, conts, pad_id=0)  # (4,)
    assert ours.tolist() == pytest.approx(expected, abs=1e-4)


def merging_tokenizer(folder):
    """A byte-level BPE without the regex split, trained on "Answer: A ...": 'Answer:' + ' ' merge into one
    token, so the prompt's last tokens change when a letter follows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    tok.train_from_iterator(["Answer: A Answer: B Answer: C Answer: D"] * 50, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


def test_mmlu_errors(checkpoint, tmp_path):
    bad = tmp_path / "x_test.csv"
    write_csv(bad, [["q", "a", "b", "c", "d", "A"], ["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(ValueError, match=f"{bad}:2: expected question,A,B,C,D,answer"):
        read_mmlu_csv(bad)
    with pytest.raises(FileNotFoundError, match="no dev/ and test/"):
        mmlu_accuracy(None, None, tmp_path)
    merging = tmp_path / "merging_tokenizer"
    merging.mkdir()
    with pytest.raises(ValueError) as e:
        letter_continuations(TK.Tokenizer(merging_tokenizer(merging)), "x\nAnswer:")
    assert str(e.value).startswith(f"{merging}: the tokenizer merges ' A'") and "\n" not in str(e.value)


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
    tok = TK.Tokenizer(checkpoint)
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

    model = H.load_model(checkpoint)
    result = bbh_accuracy(model, tok, tmp_path, shots=shots, max_new_tokens=6, batch_size=2)
    assert result["n"] == 6 and result["accuracy"] == pytest.approx(3 / 6)
    for name in tasks:
        assert result["tasks"][name]["answers"] == answers[name]
        assert result["tasks"][name]["accuracy"] == pytest.approx(right[name] / 3)
