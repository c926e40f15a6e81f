"""Stage 5, optional: few-shot baselines, what the base model does with k training examples before each prompt.

Inputs: the training rows, the recipe's eval.shots and train.seed, the held-out rows. Outputs: the drawn
examples (`draw_examples`) and each row's k-shot prompt tokens (`fewshot_prompts`), which evaluate generates from
with the base model, as it does for the zero-shot base.

As HELM does, the examples are drawn once, not per row: one seeded shuffle of the usable training rows (input and
target both non-empty), and k-shot takes its first k, so the examples are nested (the 3-shot prompts start with the
1-shot example). A held-out row whose input is one of them gets the next drawn example in its place: a row never
sees its own answer. The examples are rendered as the template renders a prompt, each followed by its target
(data.render_prompt: a blank line between them, or earlier user/assistant turns in the chat template). A prompt
that does not fit loses examples, the last first, before any of its own input text is cut, and is counted.
"""

from __future__ import annotations

import random

from qlora_lite import data as data_stage
from qlora_lite.errors import UserError
from qlora_lite.recipe import DataRecipe, Recipe

KEY = "eval.shots"


def check_shots(shots, train_rows, data: DataRecipe) -> None:
    """A UserError when some k is more than the usable training rows (known once the data is loaded)."""
    need, count = max(shots, default=0), 0
    for row in train_rows:
        count += data_stage.usable(row, data)
        if count >= need:
            return
    if need > count:
        raise UserError(f"{KEY}: {max(shots)} examples, but data.train ({data.train}) has {count} usable rows "
                        f"(input and target both non-empty); lower eval.shots to at most {count}, or add data")


def draw_examples(train_rows, data: DataRecipe, seed: int, most: int) -> tuple[list[dict], list[int]]:
    """(up to `most` usable training rows in the seeded order, their positions in `train_rows`)."""
    drawn, where = [], []
    for i in random.Random(seed).sample(range(len(train_rows)), len(train_rows)):
        if len(drawn) == most:
            break
        if data_stage.usable(train_rows[i], data):
            drawn.append(dict(train_rows[i]))
            where.append(i)
    return drawn, where


def prompt_sets(rows: list[dict], train_rows, recipe: Recipe, tokenizer, *, limit: int,
                encoder: bool) -> tuple[dict[int, tuple[list[list[int]], int, int]], list[int]]:
    """({k: fewshot_prompts(...)} for each k > 0 of eval.shots, the positions in data.train of the examples
    drawn: the first max(k) of them, which every row sees but the one whose own input is among them)."""
    ks = [k for k in recipe.eval.shots if k > 0]
    if not ks:
        return {}, []
    check_shots(ks, train_rows, recipe.data)
    drawn, where = draw_examples(train_rows, recipe.data, recipe.train.seed, max(ks) + len(rows))
    sets = {k: fewshot_prompts(rows, drawn, k, recipe, tokenizer, limit=limit, encoder=encoder) for k in ks}
    return sets, where[: max(ks)]


def examples_for(row: dict, drawn: list[dict], k: int, data: DataRecipe) -> list[dict]:
    """The first k drawn examples whose input is not the row's own."""
    own = data_stage.input_text(row, data).strip()
    return [ex for ex in drawn if data_stage.input_text(ex, data).strip() != own][:k]


def fewshot_prompts(rows: list[dict], drawn: list[dict], k: int, recipe: Recipe, tokenizer, *, limit: int,
                    encoder: bool) -> tuple[list[list[int]], int, int]:
    """(each row's k-shot prompt ids within `limit` tokens, rows that lost examples, rows whose input was cut)."""
    prompts, lost, cut = [], 0, 0
    for row in rows:
        examples = examples_for(row, drawn, k, recipe.data)
        ids, kept, truncated = encode_with_examples(row, examples, recipe, tokenizer, limit, encoder)
        prompts.append(ids)
        lost += kept < k
        cut += truncated
    return prompts, lost, cut


def encode_with_examples(row: dict, examples: list[dict], recipe: Recipe, tokenizer, limit: int,
                         encoder: bool) -> tuple[list[int], int, bool]:
    """(prompt ids, examples kept, input cut): examples dropped from the last while the whole prompt does not fit;
    with none left the input text is cut, as for a zero-shot prompt."""
    def encode(shown: list[dict]) -> tuple[list[int], bool]:
        shots = [(ex, data_stage.target_text(ex, recipe.data).strip()) for ex in shown]
        return data_stage.encode_prompt(row, recipe.data, recipe.prompt, tokenizer, limit,
                                        encoder=encoder, shots=shots)

    for kept in range(len(examples), 0, -1):
        ids, truncated = encode(examples[:kept])
        if not truncated:
            return ids, kept, False
    ids, truncated = encode([])
    return ids, 0, truncated
