"""Stage 2: load the splits (hub dataset or local files, one code path) and turn rows into training examples.

`load_splits` returns raw rows with the recipe's columns checked, before any model is loaded.
`build_examples` tokenizes them: prompt tokens are masked out of the loss (-100), the target ends with EOS, and
an over-long prompt loses the end of its input text (the template's instruction and suffix stay) while the target
is never cut: a row whose target cannot fit is dropped. Both paths report what they dropped or cut.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from qlora_lite.errors import UserError, error_line, utf8_text
from qlora_lite.recipe import (CHAT_ROLES, DATA_FILE_SUFFIXES, DataRecipe, PromptRecipe, TrainRecipe, literal_braces,
                               mix_as_data, placeholders)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips
SHOT_DELIMITER = "\n\n"  # after each few-shot example: lm-evaluation-harness's default fewshot_delimiter


@dataclass(frozen=True)
class DataStats:
    rows: int  # rows kept
    dropped_empty: int  # input or target missing or blank
    dropped_too_long: int  # target (with the template's fixed text) longer than the length limit
    truncated_prompts: int  # input text cut to fit
    prompt_tokens_max: int
    target_tokens_max: int
    tokens_total: int  # prompt + target tokens over the kept rows


# ---------------------------------------------------------------- loading rows


def load_splits(data: DataRecipe, prompt: PromptRecipe, names: tuple[str, ...] = ("train", "eval", "test"),
                key: str = "data") -> dict:
    """{"train": Dataset, "eval": Dataset?, "test": Dataset?} (those of `names` the recipe sets), each checked for
    the columns the recipe uses (a conversation turn by turn). `key`: the recipe table errors name ("data.mix[1]")."""
    splits = {}
    for split in names:
        where = getattr(data, split)
        if where is not None:
            splits[split] = _load_one(data, f"{key}.{split}", where)
    needed = [data.messages_column] if data.format == "messages" else [
        data.input_column, data.target_column, *placeholders(prompt.template)]
    for split, rows in splits.items():
        missing = [c for c in dict.fromkeys(needed) if c not in rows.column_names]
        if missing:
            raise UserError(
                f"{key}.{split} ({getattr(data, split)}): no column {', '.join(map(repr, missing))}; "
                f"its columns are {rows.column_names}. {_columns_hint(data, key)}"
            )
        if len(rows) == 0:
            raise UserError(f"{key}.{split} ({getattr(data, split)}): has no rows")
        if data.format == "messages":
            check_conversations(rows, data.messages_column, f"{key}.{split} ({getattr(data, split)})")
    if data.max_train_samples is not None and "train" in splits:
        splits["train"] = splits["train"].select(range(min(data.max_train_samples, len(splits["train"]))))
    return splits


def _columns_hint(data: DataRecipe, key: str) -> str:
    if data.format == "messages":
        return f"Set {key}.messages_column to the column that holds the conversation"
    if data.format == "prompt_completion":
        return f'{key}.format = "prompt_completion" reads the columns prompt and completion; for other names use ' \
               f'format = "columns" with input_column and target_column'
    return f"Set {key}.input_column / {key}.target_column or fix the placeholders in the prompt template"


def _load_one(data: DataRecipe, key: str, where: str):
    from datasets import load_dataset

    try:
        if where.endswith(DATA_FILE_SUFFIXES):
            return load_file(key, Path(where))
        return load_dataset(data.source, split=where)
    except (FileNotFoundError, ValueError) as e:
        # datasets raises ValueError for unknown splits and FileNotFoundError/DatasetNotFoundError for ids
        raise UserError(f"{key} = {where!r} (source {data.source!r}): {str(e).splitlines()[0]}") from None
    except Exception as e:  # offline hub lookups raise connection errors of several kinds
        if "connect" in type(e).__name__.lower() or "offline" in str(e).lower():
            raise UserError(
                f"{key.rsplit('.', 1)[0]}.source = {data.source!r}: cannot reach the dataset hub "
                f"({type(e).__name__}); download the data and point the splits at local files"
            ) from None
        raise


def load_file(key: str, path: Path):
    """A local file through `datasets`, with what is wrong with it named after its recipe key (`data.train`):
    datasets raises StopIteration for an empty file, DatasetGenerationError for a bad line, and reads Latin-1 bytes
    in only to fail at tokenization."""
    from datasets import load_dataset

    kind = {"jsonl": "json"}.get(path.suffix[1:], path.suffix[1:])
    if kind != "parquet":
        read_text_file(key, path)  # for its checks: datasets reads the file itself
    try:
        return load_dataset(kind, data_files=str(path), split="train")
    except (FileNotFoundError, UserError):
        raise
    except Exception as e:  # noqa: BLE001: every parser failure becomes one message naming the file
        cause = e.__cause__ or e
        where = _first_bad_json_line(path) if kind == "json" else None
        detail = where or error_line(cause)
        raise UserError(f"{key} ({path}): cannot read it as {path.suffix[1:]}: {detail}") from None


def read_text_file(key: str, path: Path) -> str:
    """The file's text; an empty file or one that is not UTF-8 refused, naming the line of the first bad byte."""
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"{key} ({path}): the file is empty")
    if path.suffix == ".csv" and len(raw.strip().splitlines()) < 2:
        raise UserError(f"{key} ({path}): has a header line but no rows")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{key} ({path}): the file is UTF-16 text; save it as UTF-8")
    try:
        return utf8_text(raw)
    except ValueError as e:
        raise UserError(f"{key} ({path}): {e}; save it as UTF-8, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}` for Latin-1") from None


def _first_bad_json_line(path: Path) -> str | None:
    """Where a JSON file goes wrong: 'line N ...' for the first line of a JSON Lines file that is not a JSON object,
    or the parser's position in a .json document; None when the JSON itself is fine."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".json":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as e:
            if not text.lstrip().startswith("{"):  # else maybe JSON Lines in a .json file: read it line by line
                return f"line {e.lineno}, column {e.colno}: {e.msg}"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number} is not valid JSON (column {e.colno}: {e.msg}); JSON Lines hold one object a line"
        if not isinstance(value, dict):
            return f"line {number} is a JSON {type(value).__name__}, not an object with the recipe's columns"
    return None


# ---------------------------------------------------------------- rows of any format


def input_text(row: dict, data: DataRecipe) -> str:
    """What the model is given, as a person reads it: the input column, or a conversation's turns before its last
    assistant turn ("user: ..." lines)."""
    if data.format != "messages":
        return str(row[data.input_column])
    turns = row[data.messages_column]
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns[: last_assistant(turns)])


def target_text(row: dict, data: DataRecipe) -> str:
    """What the model should produce: the target column, or the content of the conversation's last assistant turn
    (the held-out answer evaluation scores)."""
    if data.format != "messages":
        return str(row[data.target_column])
    turns = row[data.messages_column]
    return str(turns[last_assistant(turns)]["content"])


def usable(row: dict, data: DataRecipe) -> bool:
    """Both the input and the target have text."""
    if data.format == "messages":
        return bool(target_text(row, data).strip())
    return all(row[c] is not None and str(row[c]).strip() for c in (data.input_column, data.target_column))


# ---------------------------------------------------------------- conversations (format "messages")


def check_conversations(rows, column: str, where: str) -> None:
    """Every row's conversation is a list of {role, content} turns of known roles, with a user turn before the
    first assistant turn and at least one assistant turn; a UserError naming the first row that is not."""
    for number, row in enumerate(rows, 1):
        turns = row[column]
        problem = _turns_problem(turns) if isinstance(turns, list) else (
            f"column {column!r} holds a {type(turns).__name__} ({str(turns)[:60]!r}), not a list of {{role, content}} "
            f"turns")
        if problem:
            raise UserError(f"{where}, row {number}: {problem}")


def _turns_problem(turns: list) -> str | None:
    seen_user = seen_assistant = False
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
            return f"turn {i} is not a {{role, content}} table: {str(turn)[:60]}"
        if turn["role"] not in CHAT_ROLES:
            return (f"turn {i} has the role {turn['role']!r}; the roles are {', '.join(CHAT_ROLES)} (rename it, or "
                    f"drop the turn)")
        if not isinstance(turn["content"], str):
            return f"turn {i} ({turn['role']}): its content is a {type(turn['content']).__name__}, not text"
        if turn["role"] == "assistant" and not seen_user:
            return f"turn {i} is an assistant turn before any user turn"
        seen_user |= turn["role"] == "user"
        seen_assistant |= turn["role"] == "assistant"
    if not seen_assistant:
        return "the conversation has no assistant turn: nothing to learn from or to score"
    return None


def last_assistant(turns: list[dict]) -> int:
    return max(i for i, turn in enumerate(turns) if turn["role"] == "assistant")


def plain_turns(turns: list[dict]) -> list[dict]:
    """Turns as {role, content} dicts only (datasets gives every turn each key any turn of the column has)."""
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def split_system(turns: list[dict]) -> tuple[list[dict], list[dict]]:
    """([the system turn] or [], the turns after it)."""
    system = [t for t in turns[:1] if t["role"] == "system"]
    return system, turns[len(system):]


def with_system(turns: list[dict], prompt: PromptRecipe) -> list[dict]:
    """The row's turns, as plain {role, content} dicts, after prompt.system when the row has no system turn."""
    turns = plain_turns(turns)
    if prompt.system and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": prompt.system})
    return turns


def render_chat(tokenizer, turns: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001: jinja2's TemplateError, or the template's own raise_exception
        raise UserError(f"the tokenizer's chat template refused a conversation ({error_line(e)}); its turns: "
                        f"{', '.join(t['role'] for t in turns)}") from None


def chat_pieces(tokenizer, turns: list[dict]) -> list[tuple[str, int | None]]:
    """The conversation as the chat template writes it, cut into (text, turn index) pieces: each assistant turn's
    text (its content and end-of-turn token, without the whitespace after it) with its index, and the text before
    and between them with None. Found by rendering each prefix: the text of turns[:k] with the assistant header is
    where turn k starts, and turns[:k + 1] where it ends. Text after the last assistant turn is left out."""
    full = render_chat(tokenizer, turns, False)
    pieces, at = [], 0
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before, upto = render_chat(tokenizer, turns[:k], True), render_chat(tokenizer, turns[: k + 1], False)
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= at):
            raise UserError("the tokenizer's chat template writes a conversation's earlier turns differently once "
                            "later turns follow (e.g. it drops earlier reasoning), so the assistant turns cannot be "
                            "found in it; use a model whose template renders a prefix as a prefix, or "
                            'format = "prompt_completion"')
        end = len(upto.rstrip())
        pieces += [(full[at : len(before)], None), (full[len(before) : end], k)]
        at = end
    return pieces


def encode_chat(tokenizer, turns: list[dict], train_on: str) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, where the last assistant turn starts): every piece tokenized on its own, so that a
    turn's tokens are the same whatever follows; labels are the ids of the assistant turns trained on ("all", or
    the "last"), -100 elsewhere. The ids before the last turn are exactly the prompt evaluation generates from."""
    ids, labels, start = [], [], 0
    last = last_assistant(turns)
    for text, k in chat_pieces(tokenizer, turns):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if k == last:
            start = len(ids)
        learned = k is not None and (train_on == "all" or k == last)
        ids += piece
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    return ids, labels, start


def fit_chat(tokenizer, turns: list[dict], train_on: str, fits) -> tuple[list[int], list[int], int, bool] | None:
    """encode_chat of the conversation, its oldest exchanges dropped (the system turn kept) until `fits(ids,
    start)`: (ids, labels, start, whether turns were dropped), or None when even its last exchange does not fit."""
    system, rest = split_system(turns[: last_assistant(turns) + 1])
    dropped = False
    while True:
        ids, labels, start = encode_chat(tokenizer, system + rest, train_on)
        if fits(ids, start):
            return ids, labels, start, dropped
        users = [i for i, t in enumerate(rest) if t["role"] == "user" and i > 0]
        if not users:
            return None
        rest, dropped = rest[users[0]:], True


# ---------------------------------------------------------------- prompts


def render_prompt(row: dict, prompt: PromptRecipe, tokenizer, shots: list[tuple[dict, str]] = ()) -> str:
    """The prompt text for one row: the template filled in, wrapped in the chat template when asked.

    `shots`: (row, target) examples shown first (few-shot): each filled in and followed by its target, a blank
    line after each; in the chat template, earlier user and assistant turns (lm-evaluation-harness's
    fewshot_as_multiturn), after the system message."""
    text = fill_template(row, prompt.template)
    if not prompt.chat_template:
        return "".join(fill_template(example, prompt.template) + target + SHOT_DELIMITER
                       for example, target in shots) + text
    turns = [{"role": role, "content": content} for example, target in shots
             for role, content in (("user", fill_template(example, prompt.template)), ("assistant", target))]
    messages = ([{"role": "system", "content": prompt.system}] if prompt.system else []) + turns + [
        {"role": "user", "content": text}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def fill_template(row: dict, template: str) -> str:
    text = template
    for column in dict.fromkeys(placeholders(template)):
        text = text.replace("{" + column + "}", str(row[column]))
    return literal_braces(text)


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before (BOS) and after (T5's </s>) a text, found by encoding a probe."""
    core = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(core) + 1):
        if full[i : i + len(core)] == core:
            return full[:i], full[i + len(core) :]
    return [], []


def encode_prompt(
    row: dict, data: DataRecipe, prompt: PromptRecipe, tokenizer, max_tokens: int, *, encoder: bool = False,
    shots: list[tuple[dict, str]] = (),
) -> tuple[list[int], bool]:
    """Prompt ids within `max_tokens`, cutting the end of the input text; (ids, was_truncated).

    The text before the end of the input and the text after it are tokenized separately so the suffix
    ("Summary: ", the chat template's assistant header) always survives. Generation uses this same function,
    so training and inference see identical prompt tokens. `shots`: examples before the prompt (render_prompt).
    A conversation (format "messages") is its turns before the last assistant turn, as training tokenized them,
    its oldest exchanges dropped to fit.
    """
    before, after = special_tokens(tokenizer)
    if not encoder:
        after = []  # a decoder-only prompt must not end in EOS: the target follows
    if data.format == "messages":
        return _encode_chat_prompt(row, data, prompt, tokenizer, max_tokens - len(after), shots, after)
    text = render_prompt(row, prompt, tokenizer, shots)
    value = str(row[data.input_column])
    cut = text.rfind(value) + len(value) if value and value in text else len(text)
    head = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    tail = tokenizer(text[cut:], add_special_tokens=False)["input_ids"] if cut < len(text) else []
    if prompt.chat_template:
        before = []  # the chat template writes its own BOS
    room = max_tokens - len(before) - len(tail) - len(after)
    truncated = len(head) > room
    head = head[: max(room, 0)]
    return before + head + tail + after, truncated


def _encode_chat_prompt(row, data: DataRecipe, prompt: PromptRecipe, tokenizer, max_tokens: int, shots,
                        after: list[int]) -> tuple[list[int], bool]:
    """A conversation's prompt: few-shot examples' turns (each example's conversation up to its last assistant
    turn) after the system turn, then the row's turns up to its last assistant turn, whose header ends it."""
    system, own = split_system(with_system(row[data.messages_column], prompt))
    shown = [t for example, _ in shots
             for t in plain_turns(example[data.messages_column][: last_assistant(example[data.messages_column]) + 1])
             if t["role"] != "system"]
    turns = system + shown + own
    fitted = fit_chat(tokenizer, turns, "last", lambda ids, start: start <= max_tokens)
    if fitted is None:  # even its last user turn is too long: its end is kept, with the assistant header
        ids, _, start = encode_chat(tokenizer, turns[: last_assistant(turns) + 1], "last")
        return ids[max(start - max_tokens, 0) : start] + after, True
    ids, _, start, dropped = fitted
    return ids[:start] + after, dropped


def rows_also_in(rows: list[dict], train_rows, data: DataRecipe) -> int:
    """How many of `rows` have an input text that some training row has too: their scores measure memory."""
    seen = {input_text(row, data).strip() for row in train_rows}
    return sum(input_text(row, data).strip() in seen for row in rows)


def encode_target(text: str, tokenizer) -> list[int]:
    """Target ids ending with EOS, so the model learns to stop (also when pad == eos)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


# ---------------------------------------------------------------- examples


def build_examples(rows, tokenizer, data: DataRecipe, prompt: PromptRecipe, train: TrainRecipe, is_encoder_decoder,
                   split: str = "train", key: str = "data"):
    """Tokenized examples and their `DataStats`.

    Decoder-only: input_ids = prompt + target + EOS, labels = -100 over the prompt; a conversation is its turns in
    the chat template with labels on the assistant turns trained on (data.train_on), each with its end-of-turn
    token, and loses its oldest exchanges when too long.
    Encoder-decoder: input_ids = the prompt only (the encoder never sees the target), labels = target + EOS (of a
    conversation, its last assistant turn).
    """
    from datasets import Dataset

    examples, empty, too_long, truncated = [], 0, 0, 0
    prompt_max = target_max = total = 0
    columns = list(dict.fromkeys([data.input_column, data.target_column, *placeholders(prompt.template)]))
    for number, row in enumerate(rows, 1):
        for column in columns if data.format != "messages" else ():
            if isinstance(row[column], (list, dict)):
                raise UserError(f"{key}.{split} ({getattr(data, split)}), row {number}: column {column!r} holds a "
                                f"{type(row[column]).__name__}, not text ({str(row[column])[:60]})")
        if not usable(row, data):
            empty += 1
            continue
        if data.format == "messages" and not is_encoder_decoder:
            try:
                fitted = fit_chat(tokenizer, with_system(row[data.messages_column], prompt), data.train_on,
                                  lambda ids, start: len(ids) <= train.max_length)
            except UserError as e:  # the chat template refused it: say which row
                raise UserError(f"{key}.{split} ({getattr(data, split)}), row {number}: {e}") from None
            if fitted is None:
                too_long += 1
                continue
            ids, labels, _, cut = fitted
            learned = sum(label != IGNORE_INDEX for label in labels)
            example = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
            prompt_len, target_len = len(ids) - learned, learned
        else:
            target = encode_target(target_text(row, data), tokenizer)
            if is_encoder_decoder:
                if len(target) > train.max_target_length:
                    too_long += 1
                    continue
                ids, cut = encode_prompt(row, data, prompt, tokenizer, train.max_source_length, encoder=True)
                example = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": target}
            else:
                ids, cut = encode_prompt(row, data, prompt, tokenizer, train.max_length - len(target))
                if len(ids) + len(target) > train.max_length:
                    too_long += 1
                    continue
                example = {
                    "input_ids": ids + target,
                    "attention_mask": [1] * (len(ids) + len(target)),
                    "labels": [IGNORE_INDEX] * len(ids) + target,
                }
            prompt_len, target_len = len(ids), len(target)
        truncated += cut
        prompt_max, target_max = max(prompt_max, prompt_len), max(target_max, target_len)
        total += prompt_len + target_len
        examples.append(example)
    stats = DataStats(len(examples), empty, too_long, truncated, prompt_max, target_max, total)
    if not examples:
        raise UserError(
            f"{key}.{split} ({getattr(data, split)}): no usable rows: {empty} empty, {too_long} with targets "
            f"longer than the length limit (train.max_length / train.max_target_length); raise the limit or check "
            f"the columns"
        )
    return Dataset.from_list(examples), stats


# ---------------------------------------------------------------- mixing ([[data.mix]])


@dataclass(frozen=True)
class MixedSource:
    key: str  # "data" for the main task, "data.mix[1]" for the first [[data.mix]] table
    weight: float  # the share asked
    rows: int  # training examples drawn from it
    available: int  # its usable examples (fewer than rows: some were drawn twice)


def load_mix(data: DataRecipe, prompt: PromptRecipe) -> list[dict]:
    """Each [[data.mix]] source's splits (train, and eval where set), its columns checked as the main task's are:
    loaded before the model, so a missing file or column fails at once."""
    return [load_splits(*mix_as_data(source, prompt), names=("train", "eval"), key=key)
            for key, source in zip(data.mix_keys, data.mix)]


def mix_examples(main, mix_splits: list[dict], tokenizer, data: DataRecipe, prompt: PromptRecipe,
                 train: TrainRecipe, is_encoder_decoder: bool, seed: int):
    """(the training examples drawn from the main task and each mix source, a MixedSource each, the mix sources'
    eval examples by key).

    datasets.interleave_datasets draws each example from source i with probability weight_i (the main task
    1 - sum of weights), seeded, until the main task's examples are used up: one pass over the main task with the
    others in proportion. A source too small for its share is repeated (after a seeded shuffle) rather than ending
    the draw early."""
    from datasets import concatenate_datasets, interleave_datasets

    sources, available, evals = [main.add_column("_source", [0] * len(main))], [len(main)], {}
    expected_total = len(main) / data.main_weight
    for i, (key, source, splits) in enumerate(zip(data.mix_keys, data.mix, mix_splits), 1):
        mix_data, mix_prompt = mix_as_data(source, prompt)
        examples, _ = build_examples(splits["train"], tokenizer, mix_data, mix_prompt, train, is_encoder_decoder,
                                     key=key)
        examples = examples.shuffle(seed=seed)
        available.append(len(examples))
        needed = math.ceil(expected_total * source.weight * 1.5) + 20  # never the first to run out
        copies = math.ceil(needed / len(examples))
        sources.append(concatenate_datasets([examples] * copies).add_column("_source", [i] * len(examples) * copies))
        if "eval" in splits:
            evals[key] = build_examples(splits["eval"], tokenizer, mix_data, mix_prompt, train, is_encoder_decoder,
                                        split="eval", key=key)[0]
    weights = [data.main_weight, *(source.weight for source in data.mix)]
    mixed = interleave_datasets(sources, probabilities=weights, seed=seed, stopping_strategy="first_exhausted")
    drawn = mixed["_source"]
    stats = [MixedSource(key, weight, drawn.count(i), available[i])
             for i, (key, weight) in enumerate(zip(["data", *data.mix_keys], weights))]
    return mixed.remove_columns("_source"), stats, evals
