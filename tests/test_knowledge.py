"""The knowledge probe: one test per bad line of a questions file; MMLU's prompt; letter log-likelihoods checked
against an unbatched forward pass (one-token and several-token letters, decoder-only and T5); a tiny Llama
trained on eight questions answers all of them, batched as one by one; an untrained one scores near chance."""

import json
import random
import re

import pytest
import torch

from conftest import train_tokenizer
from qlora_lite.errors import UserError
from qlora_lite.knowledge import (
    LETTERS, KnowledgeScore, Question, _loglikelihoods, compare_text, prompt_text, read_questions, score_questions,
    wilson_interval,
)

FACTS = [  # (question, choices, answer index): two answers at each letter
    ("What colour is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
    ("Which animal barks?", ["cat", "dog", "fish", "bird"], 1),
    ("What do bees make?", ["milk", "silk", "honey", "wool"], 2),
    ("Which planet do we live on?", ["Mars", "Venus", "Jupiter", "Earth"], 3),
    ("What is frozen water called?", ["ice", "steam", "sand", "glass"], 0),
    ("How many legs does a spider have?", ["six", "eight", "four", "ten"], 1),
    ("Which gas do plants take in?", ["oxygen", "helium", "carbon dioxide", "neon"], 2),
    ("What is the capital of France?", ["Rome", "Berlin", "Madrid", "Paris"], 3),
]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "mirror", "rocket",
         "garden", "violin", "desert", "island", "engine", "feather", "castle", "pepper", "window"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small run fastest on one thread; two threads on a busy machine ran training 50 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fact_questions() -> list[Question]:
    return [Question(id=f"f{i}", subject="facts" if i % 2 else "nature", question=text, choices=tuple(choices),
                     answer=answer) for i, (text, choices, answer) in enumerate(FACTS)]


def random_questions(n: int, seed: int) -> list[Question]:
    """Questions about nothing, the right answer's letter cycling A, B, C, D: a model that cannot know picks it
    a quarter of the time, whichever letter it prefers."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(WORDS, 2)
        out.append(Question(id=str(i), subject=None, question=f"Which word goes with {a} and {b}?",
                            choices=tuple(rng.sample(WORDS, 4)), answer=i % 4))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    texts = [prompt_text(q) + f" {letter}" for q in fact_questions() + random_questions(40, seed=9)
             for letter in "ABCD"]
    return train_tokenizer(texts, bos=True, specials=["<unk>", "<s>", "</s>"])


def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def trained_llama(tokenizer, tmp_path_factory):
    """A tiny Llama taught the eight facts (loss on the answer letter only), saved and loaded back as a run is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_llama(tokenizer)
    rows, labels = [], []
    for q in fact_questions():
        context = tokenizer(prompt_text(q))["input_ids"]
        whole = tokenizer(prompt_text(q) + " " + LETTERS[q.answer])["input_ids"]
        rows.append(whole)
        labels.append([-100] * len(context) + whole[len(context):])
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05, loss.item()
    out = tmp_path_factory.mktemp("trained-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)


def reference_loglikelihood(model, context: list[int], continuation: list[int], *, encoder_decoder=False) -> float:
    """log P(continuation | context) from one unpadded forward pass over exactly these tokens."""
    with torch.no_grad():
        if encoder_decoder:
            loss = model(input_ids=torch.tensor([context]), labels=torch.tensor([continuation])).loss
            return -loss.item() * len(continuation)
        logits = model(input_ids=torch.tensor([context + continuation])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(logprobs[len(context) - 1 + k, token].item() for k, token in enumerate(continuation))


# ---------------------------------------------------------------- reading


def write(tmp_path, *lines, raw: bytes | None = None):
    path = tmp_path / "questions.jsonl"
    path.write_bytes(raw if raw is not None else "".join(line + "\n" for line in lines).encode())
    return path


GOOD = json.dumps({"question": "2 + 2?", "choices": ["3", "4"], "answer": "B"})


def test_reads_questions_with_letter_or_text_answers(tmp_path):
    path = write(tmp_path, GOOD, "",
                 json.dumps({"id": "k2", "subject": "geo", "question": " Capital of Italy? ",
                             "choices": ["Rome", "Oslo", "Lima"], "answer": "Oslo"}))
    first, second = read_questions(path)
    assert first == Question(id="line-1", subject=None, question="2 + 2?", choices=("3", "4"), answer=1)
    assert (second.id, second.subject, second.choices, second.answer) == ("k2", "geo", ("Rome", "Oslo", "Lima"), 1)
    assert prompt_text(second) == "Capital of Italy?\nA. Rome\nB. Oslo\nC. Lima\nAnswer:"


def test_prompt_is_mmlu_default_template():
    q = Question(id="1", subject=None, question="Q?", choices=("w", "x", "y", "z"), answer=0)
    assert prompt_text(q) == "Q?\nA. w\nB. x\nC. y\nD. z\nAnswer:"


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"eval.knowledge: file .*nope.jsonl not found"):
        read_questions(tmp_path / "nope.jsonl")


def test_not_utf8_names_the_line(tmp_path):
    path = write(tmp_path, raw=GOOD.encode() + b'\n{"question": "caf\xe9?"}\n')
    with pytest.raises(UserError, match=r"not UTF-8 text \(byte 0xe9 on line 2\); save it as UTF-8"):
        read_questions(path)


def test_empty_file(tmp_path):
    with pytest.raises(UserError, match="the file has no questions"):
        read_questions(write(tmp_path, "", "  "))


BAD_LINES = {
    "not JSON": ("{question: 1", r"line 2: not JSON \(.*\); write one JSON object a line"),
    "not an object": ('["a", "b"]', r"line 2: a JSON list, not an object"),
    "no question": ('{"choices": ["a", "b"], "answer": "A"}', r'line 2: "question" is missing'),
    "empty question": ('{"question": "  ", "choices": ["a", "b"], "answer": "A"}', r'line 2: "question" is empty'),
    "choices not a list": ('{"question": "q", "choices": "a b", "answer": "A"}',
                           r'line 2: "choices" must be a list of between 2 and 10 .*; it is a str'),
    "one choice": ('{"question": "q", "choices": ["a"], "answer": "A"}', r"line 2: .*it is 1 choices"),
    "eleven choices": (json.dumps({"question": "q", "choices": list("abcdefghijk"), "answer": "A"}),
                       r"line 2: .*it is 11 choices"),
    "empty choice": ('{"question": "q", "choices": ["a", " "], "answer": "A"}', r"line 2: .*one is empty or not a"),
    "choice twice": ('{"question": "q", "choices": ["a", "b", "a"], "answer": "A"}', r"line 2: .*'a' is there twice"),
    "letter out of range": ('{"question": "q", "choices": ["a", "b", "c", "d"], "answer": "E"}',
                            r"line 2: \"answer\" 'E' is not one of its choices; give a letter A, B, C, D or the exact"),
    "text not a choice": ('{"question": "q", "choices": ["a", "b"], "answer": "c"}',
                          r"line 2: \"answer\" 'c' is not one of its choices; give a letter A, B or"),
    "no answer": ('{"question": "q", "choices": ["a", "b"]}', r"line 2: \"answer\" None is not one of its choices"),
    "same id": ('{"id": "line-1", "question": "q", "choices": ["a", "b"], "answer": "A"}',
                r"line 2: id 'line-1' is also the id of line 1"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_line_names_file_line_and_problem(tmp_path, case):
    line, message = BAD_LINES[case]
    path = write(tmp_path, GOOD, line)
    with pytest.raises(UserError) as caught:
        read_questions(path)
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"eval.knowledge ({path}) line 2: ")
    assert re.search(message, text), text


# ---------------------------------------------------------------- scoring


def test_letter_loglikelihoods_match_an_unbatched_forward(tokenizer):
    model = tiny_llama(tokenizer).eval()
    questions = random_questions(5, seed=3)
    got = _loglikelihoods(model, tokenizer, questions, is_encoder_decoder=False, batch_size=3)
    for q, scores in zip(questions, got):
        context = tokenizer(prompt_text(q))["input_ids"]
        whole = [tokenizer(prompt_text(q) + " " + letter)["input_ids"] for letter in "ABCD"]
        expected = [reference_loglikelihood(model, context, w[len(context):]) for w in whole]
        assert scores == pytest.approx(expected, abs=1e-4)


def test_padding_leaves_absolute_positions_alone(tiny_gpt2):
    """GPT-2's learned positions, unlike Llama's rotary ones, would shift under left padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    questions = random_questions(4, seed=6)
    questions[0] = Question(id="long", subject=None, question="Which word goes with " + " and ".join(WORDS) + "?",
                            choices=("a", "b"), answer=0)
    got = _loglikelihoods(model, tokenizer, questions, is_encoder_decoder=False, batch_size=4)
    for q, scores in zip(questions, got):
        context = tokenizer(prompt_text(q))["input_ids"]
        letters = LETTERS[: len(q.choices)]
        whole = [tokenizer(prompt_text(q) + " " + letter)["input_ids"] for letter in letters]
        assert scores == pytest.approx([reference_loglikelihood(model, context, w[len(context):]) for w in whole],
                                       abs=1e-4)


def test_prompt_tuning_virtual_tokens_are_skipped():
    """PEFT's prompt tuning returns logits for its virtual tokens before the input's: the reference prepends the
    same soft prompt to the base model by hand."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    tokenizer = byte_tokenizer()
    base = tiny_llama(tokenizer).eval()
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5)).eval()
    questions = random_questions(3, seed=7)
    got = _loglikelihoods(model, tokenizer, questions, is_encoder_decoder=False, batch_size=3)
    soft = model.get_prompt(batch_size=1).detach()
    for q, scores in zip(questions, got):
        context = tokenizer(prompt_text(q))["input_ids"]
        expected = []
        for letter in "ABCD":
            cont = tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                embeds = torch.cat([soft, base.get_input_embeddings()(torch.tensor([context + cont]))], dim=1)
                logprobs = torch.log_softmax(base(inputs_embeds=embeds).logits[0], dim=-1)
            expected.append(sum(logprobs[5 + len(context) - 1 + k, token].item() for k, token in enumerate(cont)))
        assert scores == pytest.approx(expected, abs=1e-4)


def byte_tokenizer():
    """Byte-level BPE without merges: " A" is two tokens, so a letter's log-likelihood is a sum."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_several_token_letters_are_summed_and_batch_like_one_by_one():
    tokenizer = byte_tokenizer()
    assert len(tokenizer(" A", add_special_tokens=False)["input_ids"]) == 2
    model = tiny_llama(tokenizer).eval()
    questions = random_questions(4, seed=4)
    got = _loglikelihoods(model, tokenizer, questions, is_encoder_decoder=False, batch_size=4)
    for q, scores in zip(questions, got):
        context = tokenizer(prompt_text(q))["input_ids"]
        expected = [reference_loglikelihood(model, context, tokenizer(" " + letter, add_special_tokens=False)
                                            ["input_ids"]) for letter in "ABCD"]
        assert scores == pytest.approx(expected, abs=1e-4)
    alone = [_loglikelihoods(model, tokenizer, [q], is_encoder_decoder=False, batch_size=1)[0] for q in questions]
    for one, together in zip(alone, got):
        assert one == pytest.approx(together, abs=1e-4)


def test_trained_llama_answers_every_question_batched_as_one_by_one(trained_llama):
    model, tokenizer = trained_llama
    assert tokenizer.pad_token_id is None  # the scorer pads with EOS, as a Llama tokenizer leaves it to
    questions = fact_questions()
    model.train()
    batched = score_questions(model, tokenizer, questions, is_encoder_decoder=False, batch_size=3)
    assert model.training  # given back in the mode it came in
    model.eval()
    alone = [score_questions(model, tokenizer, [q], is_encoder_decoder=False, batch_size=1).predictions[0]
             for q in questions]
    assert batched.predictions == alone == [q.answer for q in questions]
    assert (batched.n, batched.correct, batched.accuracy, batched.chance) == (8, 8, 1.0, 0.25)
    assert batched.per_subject == {"facts": (4, 4), "nature": (4, 4)}
    assert batched.ci_low == pytest.approx(wilson_interval(8, 8)[0]) and batched.ci_high == 1.0
    assert json.loads(json.dumps(batched.to_json()))["per_subject"] == {"facts": [4, 4], "nature": [4, 4]}


def test_untrained_llama_scores_near_chance(tokenizer):
    questions = random_questions(200, seed=1)
    assert [sum(q.answer == i for q in questions) for i in range(4)] == [50, 50, 50, 50]
    score = score_questions(tiny_llama(tokenizer), tokenizer, questions, is_encoder_decoder=False, batch_size=32)
    # a scorer leaking the answer would score 1.0; one ignoring the model, 0.25 exactly: the trained test catches it
    assert 0.10 <= score.accuracy <= 0.45, score.accuracy
    assert score.ci_low <= 0.25 <= score.ci_high and score.chance == 0.25
    assert len(score.predictions) == 200 and score.per_subject == {}
    assert compare_text(score, score).endswith("near chance: this model is too small for the probe to tell")


def test_t5_scores_letters_as_decoder_labels(tiny_t5):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    questions = random_questions(6, seed=5)
    score = score_questions(model, tokenizer, questions, is_encoder_decoder=True, batch_size=4)
    assert score.n == len(score.predictions) == 6
    got = _loglikelihoods(model, tokenizer, questions, is_encoder_decoder=True, batch_size=4)
    for q, scores in zip(questions, got):
        context = tokenizer(prompt_text(q))["input_ids"]
        expected = [reference_loglikelihood(model, context, tokenizer(" " + letter, add_special_tokens=False)
                                            ["input_ids"], encoder_decoder=True) for letter in "ABCD"]
        assert scores == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- comparing


def made_score(correct: int, n: int = 200, chance: float = 0.25) -> KnowledgeScore:
    low, high = wilson_interval(correct, n)
    return KnowledgeScore(n=n, correct=correct, accuracy=correct / n, ci_low=low, ci_high=high, chance=chance,
                          per_subject={}, predictions=[0] * n)


def test_compare_text():
    text = compare_text(made_score(140), made_score(120))
    assert text == ("knowledge probe (200 questions): 70.0% -> 60.0% (95% CI 63.3%-75.9% -> 53.1%-66.5%), "
                    "chance 25%")
    assert "near chance" in compare_text(made_score(52), made_score(49))
    assert "near chance" not in compare_text(made_score(52), made_score(120))
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
