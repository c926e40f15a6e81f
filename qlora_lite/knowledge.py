"""Stage 5, optional: a multiple-choice knowledge probe, base vs tuned, scored as lm-evaluation-harness scores MMLU.

Inputs: a JSON Lines file of questions (`read_questions`), a model and its tokenizer (`score_questions`, run once
with the adapter disabled and once with it on, as evaluate does).
Outputs: a `KnowledgeScore` per model (accuracy, 95% Wilson interval, chance, per subject, the chosen letters) and
one sentence comparing two of them (`compare_text`).

Scoring is the harness's `multiple_choice` output type with MMLU's default template: the prompt lists the choices
as lettered lines and ends in "Answer:", each candidate continuation is the target delimiter " " then a letter, and
the letter whose continuation has the highest log-likelihood (summed over its tokens, no length normalisation)
wins. A fine-tune that lost general knowledge shows as a drop here while its own task improves.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qlora_lite.errors import BudgetError, UserError, utf8_text

log = logging.getLogger(__name__)

KEY = "eval.knowledge"
LETTERS = "ABCDEFGHIJ"  # MMLU uses A-D; MMLU-Pro's ten choices A-J
MIN_CHOICES, MAX_CHOICES = 2, len(LETTERS)
TARGET_DELIMITER = " "  # the harness's default target_delimiter, between "Answer:" and the letter
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class Question:
    id: str
    subject: str | None
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


@dataclass(frozen=True)
class KnowledgeScore:
    n: int
    correct: int
    accuracy: float
    ci_low: float  # 95% Wilson interval of the accuracy
    ci_high: float
    chance: float  # expected accuracy of a uniform guess: mean of 1 / number of choices
    per_subject: dict[str, tuple[int, int]]  # subject: (correct, n); questions without a subject are left out
    predictions: list[int]  # chosen choice index per question, in input order

    def to_json(self) -> dict:
        plain = asdict(self)
        plain["per_subject"] = {s: list(pair) for s, pair in self.per_subject.items()}
        return plain

    @classmethod
    def from_json(cls, plain: dict) -> KnowledgeScore:
        """The score `to_json` wrote (eval.json, the base evaluation's cache)."""
        return cls(**{**plain, "per_subject": {s: tuple(pair) for s, pair in plain["per_subject"].items()}})


# ---------------------------------------------------------------- reading


def read_questions(path: str | Path) -> list[Question]:
    """The questions of a JSON Lines file, one object a line (blank lines skipped); the first bad line raises a
    UserError naming the file, the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{KEY}: file {path} not found; give a JSON Lines file of questions, one a line: "
                        f'{{"question": "...", "choices": ["...", "..."], "answer": "B"}}')
    try:
        text = utf8_text(path.read_bytes())
    except ValueError as e:
        raise UserError(f"{KEY} ({path}): {e}; save it as UTF-8") from None
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        q = _question(line, number, path)
        if q.id in seen:
            raise UserError(f"{KEY} ({path}) line {number}: id {q.id!r} is also the id of line {seen[q.id]}; "
                            f"give each question its own id")
        seen[q.id] = number
        questions.append(q)
    if not questions:
        raise UserError(f"{KEY} ({path}): the file has no questions; write one JSON object a line with "
                        f'"question", "choices" and "answer"')
    return questions


def _question(line: str, number: int, path: Path) -> Question:
    where = f"{KEY} ({path}) line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not JSON ({e.msg} at column {e.colno}); write one JSON object a line") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: a JSON {type(row).__name__}, not an object; write one JSON object a line "
                        f'with "question", "choices" and "answer"')
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        what = "missing" if question is None else "empty" if isinstance(question, str) else "not a string"
        raise UserError(f'{where}: "question" is {what}; give the question as text')
    choices = row.get("choices")
    shape = f"between {MIN_CHOICES} and {MAX_CHOICES} distinct, non-empty strings"
    if not isinstance(choices, list) or not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        got = "missing" if choices is None else f"{len(choices)} choices" if isinstance(choices, list) else \
            f"a {type(choices).__name__}"
        raise UserError(f'{where}: "choices" must be a list of {shape}; it is {got}')
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise UserError(f'{where}: "choices" must be a list of {shape}; one is empty or not a string')
    choices = tuple(c.strip() for c in choices)  # a trailing newline would break the prompt's lettered lines
    if len(set(choices)) < len(choices):
        twice = next(c for c in choices if choices.count(c) > 1)
        raise UserError(f'{where}: "choices" must be a list of {shape}; {twice!r} is there twice')
    letters = LETTERS[: len(choices)]
    answer = row.get("answer")
    if isinstance(answer, str) and answer in letters:
        index = letters.index(answer)
    elif isinstance(answer, str) and answer.strip() in choices:
        index = choices.index(answer.strip())
    else:
        raise UserError(f'{where}: "answer" {answer!r} is not one of its choices; give a letter '
                        f'{", ".join(letters)} or the exact text of one choice')
    subject = row.get("subject")
    if subject is not None and not (isinstance(subject, str) and subject.strip()):
        raise UserError(f'{where}: "subject" must be non-empty text when given; it is {subject!r}')
    qid = row.get("id", f"line-{number}")
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or not str(qid).strip():
        raise UserError(f'{where}: "id" must be non-empty text or a number when given; it is {qid!r}')
    return Question(id=str(qid), subject=subject.strip() if subject else None, question=question,
                    choices=choices, answer=index)


# ---------------------------------------------------------------- prompting


def prompt_text(q: Question) -> str:
    """MMLU's zero-shot prompt, as lm-evaluation-harness writes it (lm_eval/tasks/mmlu/default/_default_template_yaml:
    doc_to_text "{{question.strip()}}\\nA. {{choices[0]}}\\n...D. {{choices[3]}}\\nAnswer:", doc_to_choice
    ["A", "B", "C", "D"]), with as many lettered lines as the question has choices."""
    lines = [q.question.strip(), *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))]
    return "\n".join(lines) + "\nAnswer:"


def _encode(q: Question, tokenizer, is_encoder_decoder: bool) -> tuple[list[int], list[list[int]]]:
    """(context tokens, each letter's continuation tokens) as the harness's TemplateLM._encode_pair makes them.
    Decoder-only: the continuation is what encoding context + continuation adds after the context's own tokens
    (so a merge across the boundary is not double counted); encoder-decoder: the context with the tokenizer's
    special tokens for the encoder, the continuation alone without them. The special tokens are the tokenizer's
    default (the harness's add_bos_token=None): Llama's BOS is there."""
    context = prompt_text(q)
    context_ids = tokenizer(context)["input_ids"]
    continuations = []
    for letter in LETTERS[: len(q.choices)]:
        if is_encoder_decoder:
            ids = tokenizer(TARGET_DELIMITER + letter, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(context + TARGET_DELIMITER + letter)["input_ids"][len(context_ids):]
        if not ids:
            raise ValueError(f"the tokenizer gives no tokens for the answer {letter!r} after question {q.id}")
        continuations.append(ids)
    return context_ids, continuations


# ---------------------------------------------------------------- scoring


def score_questions(model, tokenizer, questions: list[Question], *, is_encoder_decoder: bool,
                    batch_size: int = 8) -> KnowledgeScore:
    """Each question's answer: the letter with the highest log-likelihood after its prompt. The model is put in
    eval mode and given back in the mode it came in."""
    log.info("knowledge probe: scoring %d questions", len(questions))
    scores = _loglikelihoods(model, tokenizer, questions, is_encoder_decoder=is_encoder_decoder,
                             batch_size=batch_size)
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]  # the first of ties, as np.argmax
    return _summary(questions, predictions)


def _loglikelihoods(model, tokenizer, questions: list[Question], *, is_encoder_decoder: bool,
                    batch_size: int) -> list[list[float]]:
    """log P(continuation | prompt) for every letter of every question, in nats, summed over the letter's tokens."""
    rows, requests = _plan(questions, tokenizer, is_encoder_decoder)
    found = _score_rows(model, rows, requests, pad_id=_pad_id(tokenizer), is_encoder_decoder=is_encoder_decoder,
                        batch_size=batch_size)
    scores = [[0.0] * len(q.choices) for q in questions]
    for (qi, li, row, first, cont), value in zip(requests, found):
        scores[qi][li] = value
    return scores


def _plan(questions: list[Question], tokenizer, is_encoder_decoder: bool):
    """(forward rows, requests (question, letter, row, first position read, continuation)).

    Requests share rows. A decoder-only row is the context and the continuation but its last token: when every
    letter is one token (the usual case) one row serves all of a question's letters, read at the last prompt
    position. An encoder-decoder row is (context, labels): the model feeds its decoder the start token and the
    labels but their last token, so labels that differ only in their last token share a row.
    """
    rows: dict[tuple, int] = {}
    inputs: list[tuple[list[int], list[int] | None]] = []
    requests = []
    for qi, q in enumerate(questions):
        context, continuations = _encode(q, tokenizer, is_encoder_decoder)
        for li, cont in enumerate(continuations):
            if is_encoder_decoder:
                key, first, row_input = (tuple(context), tuple(cont[:-1])), 0, (context, cont)
            else:
                key, first, row_input = (tuple(context + cont[:-1]),), len(context) - 1, (context + cont[:-1], None)
            if key not in rows:
                rows[key] = len(inputs)
                inputs.append(row_input)
            requests.append((qi, li, rows[key], first, cont))
    return inputs, requests


def _score_rows(model, rows, requests, *, pad_id: int, is_encoder_decoder: bool, batch_size: int) -> list[float]:
    """Each request's log-likelihood, in request order. Rows go longest first (a memory problem shows in the first
    batch), right-padded: real tokens keep positions 0.. with no position ids given (GPT-2's learned positions
    would shift under left padding), and no real token attends to a pad after it."""
    wanted: dict[int, list[int]] = {}
    for i, (_, _, row, _, _) in enumerate(requests):
        wanted.setdefault(row, []).append(i)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]) - len(rows[r][1] or ()))
    device = next(model.parameters()).device
    found = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            ids, mask = _right_pad([rows[r][0] for r in chosen], pad_id)
            kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if is_encoder_decoder:
                kwargs["labels"] = _right_pad([rows[r][1] for r in chosen], pad_id)[0].to(device)
            try:
                with torch.no_grad():
                    logits = model(**kwargs).logits
            except torch.OutOfMemoryError:
                _empty_cache(device)
                raise BudgetError(f"out of memory scoring the knowledge probe, {len(chosen)} prompts of up to "
                                  f"{ids.shape[1]} tokens at once; lower eval.batch_size (now {batch_size})") from None
            # PEFT's prompt tuning puts its virtual tokens before a decoder-only model's input, and their logits
            shift = 0 if is_encoder_decoder else logits.shape[1] - ids.shape[1]
            for b, r in enumerate(chosen):
                for i in wanted[r]:
                    first, cont = requests[i][3], requests[i][4]
                    at = torch.arange(first, first + len(cont), device=logits.device) + shift
                    logprobs = torch.log_softmax(logits[b, at].float(), dim=-1)
                    found[i] = logprobs.gather(1, torch.tensor(cont, device=logits.device)[:, None]).sum().item()
            del logits
    finally:
        model.train(was_training)
    _empty_cache(device)
    return found


def _pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else EOS (Llama's has none); only ever read where the mask is 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _summary(questions: list[Question], predictions: list[int]) -> KnowledgeScore:
    n = len(questions)
    hits = [p == q.answer for p, q in zip(predictions, questions)]
    correct = sum(hits)
    per_subject: dict[str, tuple[int, int]] = {}
    for q, hit in zip(questions, hits):
        if q.subject is not None:
            right, total = per_subject.get(q.subject, (0, 0))
            per_subject[q.subject] = (right + hit, total + 1)
    low, high = wilson_interval(correct, n)
    return KnowledgeScore(n=n, correct=correct, accuracy=correct / n if n else 0.0, ci_low=low, ci_high=high,
                          chance=sum(1 / len(q.choices) for q in questions) / n if n else 0.0,
                          per_subject=dict(sorted(per_subject.items())), predictions=list(predictions))


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: unlike p ± z·se it stays in 0..1 and is not empty at 0 or n."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # exactly 0 and 1 at the ends, where rounding would leave 1e-17 and 0.9999999999999999
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


# ---------------------------------------------------------------- comparing


def compare_text(base: KnowledgeScore, tuned: KnowledgeScore) -> str:
    """One sentence: base -> tuned accuracy with their intervals and chance, and a warning when both intervals
    include chance (the probe cannot then tell the model from guessing, let alone the two models apart)."""
    if base.n != tuned.n:
        raise ValueError(f"base and tuned were scored on different questions: {base.n} and {tuned.n}")

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    text = (f"knowledge probe ({base.n} questions): {pct(base.accuracy)} -> {pct(tuned.accuracy)} "
            f"(95% CI {pct(base.ci_low)}-{pct(base.ci_high)} -> {pct(tuned.ci_low)}-{pct(tuned.ci_high)}), "
            f"chance {100 * base.chance:.3g}%")
    if all(s.ci_low <= s.chance <= s.ci_high for s in (base, tuned)):
        text += "; near chance: this model is too small for the probe to tell"
    return text
