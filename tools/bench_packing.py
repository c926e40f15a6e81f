"""Packing vs padded batches on the quickstart, side by side in one process: real (non-padding) tokens trained per
second, the share of padded tokens in the batches, and the loss after the same number of examples.

    python tools/bench_packing.py            # about 10 minutes on 2 CPU cores
    python tools/bench_packing.py --examples 48 --recipe recipes/quickstart.toml

Both runs make one pass over the same training examples (`--examples`, default 64): the padded run in
examples / (micro-batch x accumulation) steps, the packed one in as many steps as its rows need. Evaluation and
export are off. Padding of the packed run: the rows' unused room (batches of rows are padded to their longest too).
Ratios matter, not seconds: this machine is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_lite import events  # noqa: E402
from qlora_lite.cli import quiet_libraries  # noqa: E402
from qlora_lite.recipe import load_recipe  # noqa: E402
from qlora_lite.rundir import RunDir  # noqa: E402


def padded_share(lengths: list[int], batch: int) -> float:
    """Padding in batches of `batch` consecutive sequences, each padded to its longest (the Trainer's random
    order is not reproduced: this is the expected share for batches drawn from these lengths)."""
    padded = sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch]) for i in range(0, len(lengths), batch))
    return 1 - sum(lengths) / padded


def training_examples(recipe):
    """The recipe's tokenized training examples, as run builds them."""
    from qlora_lite import data as data_stage
    from qlora_lite.model import load_tokenizer
    from qlora_lite.source import resolve_model_source

    splits = data_stage.load_splits(recipe.data, recipe.prompt, ("train",))
    tokenizer = load_tokenizer(resolve_model_source(recipe.model), name=recipe.model.name)
    examples, _ = data_stage.build_examples(splits["train"], tokenizer, recipe.data, recipe.prompt, recipe.train, False)
    return examples


def one_run(recipe, out: Path, packing: bool, steps: int) -> dict:
    from qlora_lite.run import run

    recipe = dataclasses.replace(
        recipe, name="packed" if packing else "padded", output=dataclasses.replace(recipe.output, dir=str(out)),
        train=dataclasses.replace(recipe.train, max_steps=steps, packing=packing))
    seen: list = []
    result = run(recipe, notify=seen.append)
    setup = next(e for e in seen if isinstance(e, events.SetUp))
    losses = [loss for _, loss in RunDir(result.run_dir).losses()]
    return {"steps": result.train.steps, "seconds": result.train.train_seconds,
            "real_tokens_per_s": setup.data.tokens_total / result.train.train_seconds,  # one pass over the examples
            "last_loss": losses[-1] if losses else None,
            "rows": setup.packed.rows if setup.packed else setup.data.rows,
            "fill": setup.packed.fill if setup.packed else None}


def main() -> int:
    from qlora_lite import packing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.toml")
    parser.add_argument("--examples", type=int, default=64)
    args = parser.parse_args()
    quiet_libraries(False)
    recipe = load_recipe(args.recipe, [f"data.max_train_samples={args.examples}", "eval.enabled=false",
                                       "export.merge=false"])
    t = recipe.train
    effective = t.micro_batch_size * t.gradient_accumulation_steps
    examples = training_examples(recipe)
    lengths = [len(ids) for ids in examples["input_ids"]]
    _, stats = packing.pack(examples, t.max_length)
    with tempfile.TemporaryDirectory() as folder:
        padded = one_run(recipe, Path(folder), False, math.ceil(len(lengths) / effective))
        packed = one_run(recipe, Path(folder), True, math.ceil(stats.rows / effective))
    print(f"{len(lengths)} examples of {args.recipe}, one pass, micro-batch {t.micro_batch_size} x accumulation "
          f"{t.gradient_accumulation_steps}, max_length {t.max_length}")
    print(f"{'':10} {'rows':>5} {'steps':>6} {'seconds':>8} {'real tok/s':>11} {'padding':>8} {'last loss':>10}")
    for name, r, pad in (("padded", padded, padded_share(lengths, t.micro_batch_size)),
                         ("packed", packed, 1 - packed["fill"])):
        loss = "-" if r["last_loss"] is None else f"{r['last_loss']:.4f}"
        print(f"{name:10} {r['rows']:>5} {r['steps']:>6} {r['seconds']:>8.1f} {r['real_tokens_per_s']:>11.1f} "
              f"{100 * pad:>7.1f}% {loss:>10}")
    print(f"packed / padded: real tokens/s x{packed['real_tokens_per_s'] / padded['real_tokens_per_s']:.2f}, "
          f"time for the same examples x{packed['seconds'] / padded['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
