"""Stage 2: load the splits (hub dataset or local files, one code path) and turn rows into training examples.

`load_splits` returns raw rows with the recipe's columns checked, before any model is loaded.
`build_examples` tokenizes them: prompt tokens are masked out of the loss (-100), the target ends with EOS, and
an over-long prompt loses the end of its input text (the template's instruction and suffix stay) while the target
is never cut: a row whose target cannot fit is dropped. Both paths report what they dropped or cut.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from qlora_lite.errors import UserError, error_line, utf8_text
from qlora_lite.recipe import DATA_FILE_SUFFIXES, DataRecipe, PromptRecipe, TrainRecipe, literal_braces, placeholders

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


def load_splits(data: DataRecipe, prompt: PromptRecipe, names: tuple[str, ...] = ("train", "eval", "test")) -> dict:
    """{"train": Dataset, "eval": Dataset?, "test": Dataset?} (those of `names` the recipe sets), each checked for
    the columns the recipe uses."""
    splits = {}
    for split in names:
        where = getattr(data, split)
        if where is not None:
            splits[split] = _load_one(data, split, where)
    needed = [data.input_column, data.target_column, *placeholders(prompt.template)]
    for split, rows in splits.items():
        missing = [c for c in dict.fromkeys(needed) if c not in rows.column_names]
        if missing:
            raise UserError(
                f"data.{split} ({getattr(data, split)}): no column {', '.join(map(repr, missing))}; "
                f"its columns are {rows.column_names}. Set data.input_column / data.target_column or fix "
                f"the placeholders in prompt.template"
            )
        if len(rows) == 0:
            raise UserError(f"data.{split} ({getattr(data, split)}): has no rows")
    if data.max_train_samples is not None and "train" in splits:
        splits["train"] = splits["train"].select(range(min(data.max_train_samples, len(splits["train"]))))
    return splits


def _load_one(data: DataRecipe, split: str, where: str):
    from datasets import load_dataset

    try:
        if where.endswith(DATA_FILE_SUFFIXES):
            return load_file(f"data.{split}", Path(where))
        return load_dataset(data.source, split=where)
    except (FileNotFoundError, ValueError) as e:
        # datasets raises ValueError for unknown splits and FileNotFoundError/DatasetNotFoundError for ids
        raise UserError(f"data.{split} = {where!r} (source {data.source!r}): {str(e).splitlines()[0]}") from None
    except Exception as e:  # offline hub lookups raise connection errors of several kinds
        if "connect" in type(e).__name__.lower() or "offline" in str(e).lower():
            raise UserError(
                f"data.source = {data.source!r}: cannot reach the dataset hub ({type(e).__name__}); "
                f"download the data and point data.train/eval/test at local files"
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
    row: dict, prompt: PromptRecipe, tokenizer, input_column: str, max_tokens: int, *, encoder: bool = False,
    shots: list[tuple[dict, str]] = (),
) -> tuple[list[int], bool]:
    """Prompt ids within `max_tokens`, cutting the end of the input text; (ids, was_truncated).

    The text before the end of the input and the text after it are tokenized separately so the suffix
    ("Summary: ", the chat template's assistant header) always survives. Generation uses this same function,
    so training and inference see identical prompt tokens. `shots`: examples before the prompt (render_prompt).
    """
    text = render_prompt(row, prompt, tokenizer, shots)
    value = str(row[input_column])
    cut = text.rfind(value) + len(value) if value and value in text else len(text)
    head = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    tail = tokenizer(text[cut:], add_special_tokens=False)["input_ids"] if cut < len(text) else []
    before, after = special_tokens(tokenizer)
    if prompt.chat_template:
        before = []  # the chat template writes its own BOS
    if not encoder:
        after = []  # a decoder-only prompt must not end in EOS: the target follows
    room = max_tokens - len(before) - len(tail) - len(after)
    truncated = len(head) > room
    head = head[: max(room, 0)]
    return before + head + tail + after, truncated


def rows_also_in(rows: list[dict], train_rows, column: str) -> int:
    """How many of `rows` have an input text that some training row has too: their scores measure memory."""
    seen = {str(row[column]).strip() for row in train_rows}
    return sum(str(row[column]).strip() in seen for row in rows)


def encode_target(row: dict, target_column: str, tokenizer) -> list[int]:
    """Target ids ending with EOS, so the model learns to stop (also when pad == eos)."""
    ids = tokenizer(str(row[target_column]), add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


# ---------------------------------------------------------------- examples


def build_examples(rows, tokenizer, data: DataRecipe, prompt: PromptRecipe, train: TrainRecipe, is_encoder_decoder,
                   split: str = "train"):
    """Tokenized examples and their `DataStats`.

    Decoder-only: input_ids = prompt + target + EOS, labels = -100 over the prompt.
    Encoder-decoder: input_ids = the prompt only (the encoder never sees the target), labels = target + EOS.
    """
    from datasets import Dataset

    examples, empty, too_long, truncated = [], 0, 0, 0
    prompt_max = target_max = total = 0
    columns = list(dict.fromkeys([data.input_column, data.target_column, *placeholders(prompt.template)]))
    for number, row in enumerate(rows, 1):
        for column in columns:
            if isinstance(row[column], (list, dict)):
                raise UserError(f"data.{split} ({getattr(data, split)}), row {number}: column {column!r} holds a "
                                f"{type(row[column]).__name__}, not text ({str(row[column])[:60]})")
        if any(row[c] is None or not str(row[c]).strip() for c in (data.input_column, data.target_column)):
            empty += 1
            continue
        target = encode_target(row, data.target_column, tokenizer)
        if is_encoder_decoder:
            if len(target) > train.max_target_length:
                too_long += 1
                continue
            ids, cut = encode_prompt(row, prompt, tokenizer, data.input_column, train.max_source_length, encoder=True)
            example = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": target}
        else:
            ids, cut = encode_prompt(row, prompt, tokenizer, data.input_column, train.max_length - len(target))
            if len(ids) + len(target) > train.max_length:
                too_long += 1
                continue
            example = {
                "input_ids": ids + target,
                "attention_mask": [1] * (len(ids) + len(target)),
                "labels": [IGNORE_INDEX] * len(ids) + target,
            }
        truncated += cut
        prompt_max, target_max = max(prompt_max, len(ids)), max(target_max, len(target))
        total += len(ids) + len(target)
        examples.append(example)
    stats = DataStats(len(examples), empty, too_long, truncated, prompt_max, target_max, total)
    if not examples:
        raise UserError(
            f"data.{split} ({getattr(data, split)}): no usable rows: {empty} empty, {too_long} with targets "
            f"longer than the length limit (train.max_length / train.max_target_length); raise the limit or check "
            f"the columns"
        )
    return Dataset.from_list(examples), stats
