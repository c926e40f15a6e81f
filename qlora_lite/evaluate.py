"""Stage 5: base vs tuned on the held-out split, and optionally how much general language modelling was lost.

Inputs: a loaded model (the one just trained, or `load_run(run_dir)`), its recipe and run directory.
Outputs: an `EvalResult`, the run's eval.json and samples.md. The base model is the same PEFT model inside
`disable_adapter()` (for full fine-tuning, which changed the weights themselves, the base is loaded again), so
both go through one `generate` call with identical prompt tokens (data.encode_prompt, as in training) and
settings: greedy, KV cache on, an explicit max_new_tokens, stop at EOS. Where asked, the base model also generates
with k training examples before each prompt (eval.shots: fewshot.py), and both answer multiple-choice questions
(eval.knowledge: knowledge.py); eval.json gains "shots" and "knowledge".

ROUGE is rouge-score with stemming and a plain mean over examples (no bootstrap), as fractions 0..1. rougeLsum
scores the longest common subsequence sentence by sentence, and rouge-score only sees sentences at newlines:
without a split it equals rougeL. Both texts are therefore put one sentence per line first (`split_sentences`:
a break after . ! or ? followed by whitespace, and at existing newlines); eval.json also keeps the unsplit value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from qlora_lite import data as data_stage
from qlora_lite import fewshot, knowledge
from qlora_lite import model as model_stage
from qlora_lite.errors import BudgetError, UserError, error_line
from qlora_lite.experts4bit import route_lora
from qlora_lite.recipe import DATA_FILE_SUFFIXES, Recipe
from qlora_lite.rundir import RunDir, read_run, write_json
from qlora_lite.source import cache_key, file_sha256, library_versions, model_identity, read_cached, write_cached

log = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
SENTENCE_SPLIT_NOTE = (
    "rougeLsum scored with one sentence per line: texts split after . ! ? followed by whitespace, and at newlines"
)
FORGETTING_CHUNKS = 16  # text windows scored per model: seconds, not an epoch
FORGETTING_CHUNK_TOKENS = 512  # at most; train.max_length when shorter


@dataclass(frozen=True)
class Forgetting:
    source: str
    chunks: int
    tokens: int  # tokens scored per model
    base_loss: float  # mean token cross-entropy, nats
    tuned_loss: float
    base_perplexity: float
    tuned_perplexity: float
    loss_change: float  # tuned - base: above 0 means the adapter lost some general modelling
    perplexity_change_pct: float


@dataclass(frozen=True)
class EvalResult:
    split: str
    n: int
    base: dict[str, float]
    tuned: dict[str, float]
    seconds: float
    max_new_tokens: int
    batch_size: int
    forgetting: Forgetting | None
    eval_json: Path
    samples_md: Path
    prompts_truncated: int = 0  # held-out prompts whose input text was cut to fit, as training cut them
    base_from_cache: bool = False  # the base model's outputs came from an identical earlier evaluation
    shots: dict[int, dict[str, float]] = field(default_factory=dict)  # k: the base's scores with k examples, and
    # rows_lost_examples (prompts that dropped some to fit); k = 0 is `base`
    knowledge: tuple[knowledge.KnowledgeScore, knowledge.KnowledgeScore] | None = None  # base, tuned


# ---------------------------------------------------------------- loading a finished run


def load_run(run_dir: str | Path) -> tuple[Recipe, model_stage.LoadedModel]:
    """The run's recipe and its model as trained: the base loaded as training loaded it (4-bit for qlora) with
    the saved adapter on top, or the fully fine-tuned model the run saved."""
    from peft import PeftModel

    rd = RunDir(Path(run_dir))
    recipe = read_run(rd.path)
    saved = rd.saved_dir(recipe.has_adapter)
    if not recipe.has_adapter:
        model = dataclasses.replace(recipe.model, name=str(saved), gguf_file=None)
        return recipe, model_stage.load_model(model, recipe.quantization, recipe.train, recipe.method)
    loaded = model_stage.load_model(recipe.model, recipe.quantization, recipe.train, recipe.method)
    loaded.tokenizer = model_stage.load_tokenizer(str(saved), recipe.model.trust_remote_code)
    loaded.model = PeftModel.from_pretrained(loaded.model, saved)
    route_lora(loaded.model)  # LoRA on 4-bit experts: expert by expert (experts4bit)
    return recipe, loaded


@contextlib.contextmanager
def base_model(loaded: model_stage.LoadedModel, recipe: Recipe):
    """The model before training: the adapter switched off, or for full fine-tuning the base loaded again
    (unquantized, in the compute dtype) and freed afterwards."""
    if recipe.has_adapter:
        with loaded.model.disable_adapter():
            yield loaded.model
        return
    base = model_stage.load_model(recipe.model, recipe.quantization, recipe.train, base_only=True).model.eval()
    try:
        yield base
    finally:
        del base
        gc.collect()
        free_accelerator_memory(next(loaded.model.parameters()).device)


def held_out_split(recipe: Recipe, split: str | None = None) -> tuple[str, str]:
    """(split, where its data is): `split` or eval.split; "test" falls back to "eval" when data.test is unset."""
    asked, split = split, split or recipe.eval.split
    if split == "test" and recipe.data.test is None and asked is None:
        split = "eval"
    if getattr(recipe.data, split) is None:
        other = "test" if split == "eval" else "eval"
        if getattr(recipe.data, other) is not None:
            raise UserError(f"the {split} split: data.{split} is not set in the recipe; evaluate on the {other} "
                            f"split (--split {other}), or set data.{split}")
        raise UserError("evaluation needs a held-out split: set data.test or data.eval in the recipe")
    return split, getattr(recipe.data, split)


def held_out_rows(recipe: Recipe, split: str | None = None, splits: dict | None = None) -> tuple[str, list[dict]]:
    """(split as `held_out_split` picks it, its first eval.max_samples non-empty rows).
    `splits`: the splits `run` already loaded; else the one split is loaded here."""
    split, where = held_out_split(recipe, split)
    rows = (splits or data_stage.load_splits(recipe.data, recipe.prompt, names=(split,)))[split]
    kept = [row for row in rows if data_stage.usable(row, recipe.data)]
    if not kept:
        what = ("a last assistant turn with text" if recipe.data.format == "messages" else
                f"both {recipe.data.input_column!r} and {recipe.data.target_column!r} text")
        raise UserError(f"data.{split} ({where}): no rows with {what} to evaluate on")
    return split, kept[: recipe.eval.max_samples]


# ---------------------------------------------------------------- generation


def generate(model, tokenizer, prompts: list[list[int]], *, is_encoder_decoder: bool, max_new_tokens: int,
             batch_size: int, soft_prompt: bool = False) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens and stripped, in input order.

    Prompts are batched longest first (a memory problem shows in the first batch) and padded here: on the left
    for decoder-only models, so every row's last prompt token is where generation starts. `soft_prompt` (a
    decoder-only model with PEFT's prompt tuning) batches only prompts of one length: prompt tuning drops the
    position ids that make left padding harmless, so a padded row would be read at shifted positions; and it
    generates without the KV cache: with it, every token after the first came out as garbage ("Rachelleakimamm...",
    the quickstart's tuned soft prompt on transformers 5.25 / peft 0.21; peft#1391 reported the same).
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if soft_prompt:
        by_length: dict[int, list[int]] = {}
        for i in order:
            by_length.setdefault(len(prompts[i]), []).append(i)
        batches = [same[k : k + batch_size] for same in by_length.values() for k in range(0, len(same), batch_size)]
    texts = [""] * len(prompts)
    for chosen in batches:
        ids, mask = pad_batch([prompts[i] for i in chosen], pad_id, left=not is_encoder_decoder)
        try:
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                    do_sample=False, num_beams=1, use_cache=not soft_prompt,  # training turned it off: say it
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
                    # Plain greedy, whatever the model's generation_config asks (Qwen2.5's asks for 1.05).
                    repetition_penalty=1.0, no_repeat_ngram_size=0,
                )
        except torch.OutOfMemoryError:
            free_accelerator_memory(device)
            raise BudgetError(
                f"out of memory generating {len(chosen)} prompts of up to {ids.shape[1]} tokens + {max_new_tokens} "
                f"new tokens (the KV cache grows with both); lower eval.batch_size (now {batch_size}) or "
                f"eval.max_new_tokens"
            ) from None
        new = out[:, 1:] if is_encoder_decoder else out[:, ids.shape[1] :]  # drop decoder start / the prompt
        for i, text in zip(chosen, tokenizer.batch_decode(new, skip_special_tokens=True)):
            texts[i] = text.strip()
        del out, new
    free_accelerator_memory(device)
    return texts


def pad_batch(rows: list[list[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, where] = torch.tensor(row, dtype=torch.long)
        mask[i, where] = 1
    return ids, mask


def free_accelerator_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- metrics


def split_sentences(text: str) -> str:
    """One sentence per line, for rougeLsum (see the module docstring)."""
    return "\n".join(s for s in SENTENCE_BREAK.split(text.strip()) if s)


def rouge_scores(predictions: list[str], references: list[str], *, sentence_split: bool = True) -> dict[str, float]:
    """Mean F-measure of rouge1, rouge2, rougeL and rougeLsum (fractions 0..1), stemmed, no bootstrap."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, at least one: {len(predictions)}, {len(references)}")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    prepare = split_sentences if sentence_split else str
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(target=prepare(reference), prediction=prepare(prediction))
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: total / len(predictions) for key, total in totals.items()}


def bleu_score(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenizer, one reference per example) as a fraction 0..1."""
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [references]).score / 100


def score(predictions: list[str], references: list[str], metrics) -> dict[str, float]:
    scores = rouge_scores(predictions, references)
    if "bleu" in metrics:
        scores["bleu"] = bleu_score(predictions, references)
    return scores


# ---------------------------------------------------------------- base vs tuned


def evaluate_run(loaded: model_stage.LoadedModel, recipe: Recipe, run_dir: str | Path, *,
                 split: str | None = None, train_rows=None) -> EvalResult:
    """Generate with the base (adapter disabled) and the tuned model, score both, write eval.json and samples.md.
    Another split than the run's own (`eval --split eval` of a run evaluated on test) writes its own files
    (RunDir.eval_json), so the run's own evaluation, which the report and compare read, is kept. eval.json
    counts the held-out rows whose input was trained on (with `run`'s training rows, or a local data.train).
    With eval.shots the base model also generates with k training examples before each prompt (fewshot.py); with
    eval.knowledge both models answer its multiple-choice questions (knowledge.py).

    `loaded.model` must be a PEFT model; it is left in eval mode.
    """
    started = time.monotonic()
    rd = RunDir(Path(run_dir))
    own_split = held_out_split(recipe)[0]
    split, rows = held_out_rows(recipe, split)
    other = None if split == own_split else split
    eval_json, samples_md = rd.eval_json(other), rd.samples(other)
    prompts, truncated = encode_prompts(rows, recipe, loaded.tokenizer, loaded.is_encoder_decoder)
    if train_rows is None and (Path(recipe.data.train).is_file() or recipe.eval.shots):  # `eval` of a saved run
        train_rows = data_stage.load_splits(recipe.data, recipe.prompt, names=("train",))["train"]
    limit, encoder = prompt_limit(recipe, loaded.is_encoder_decoder)
    shot_sets, drawn = fewshot.prompt_sets(rows, train_rows, recipe, loaded.tokenizer, limit=limit, encoder=encoder)
    questions = knowledge.read_questions(recipe.eval.knowledge) if recipe.eval.knowledge else None
    references = [data_stage.target_text(row, recipe.data).strip() for row in rows]
    model = loaded.model
    model.eval()
    gc.collect()  # a finished trainer's optimizer state, before generation's own memory peak
    free_accelerator_memory(next(model.parameters()).device)
    chunks = None
    if recipe.eval.forgetting:
        chunk_tokens = min(recipe.train.max_length, FORGETTING_CHUNK_TOKENS)
        chunks = text_chunks(forgetting_texts(recipe.eval.forgetting), loaded.tokenizer, chunk_tokens,
                             FORGETTING_CHUNKS)
    texts, seconds, general_loss, knows = {}, {}, {}, {}
    log.info("generating for %d %s examples, base then tuned", len(rows), split)
    amp = model_stage.autocast(loaded.device, loaded.compute_dtype)
    soft_prompt = recipe.method.spec.trains == "soft prompt"
    base_key = base_cache_key(recipe, loaded, prompts, chunks, questions)
    cached = read_base_cache(base_key, len(prompts), questions)
    if cached:  # the base model's outputs on these very inputs, from an earlier evaluation
        texts["base"], general_loss["base"], seconds["base"] = cached["texts"], cached["general_loss"], 0.0
        if questions:
            knows["base"] = knowledge.KnowledgeScore.from_json(cached["knowledge"])
    shot_keys = {k: base_key and cache_key(base_cache_key(recipe, loaded, p, None), {"shots": k})
                 for k, (p, _, _) in shot_sets.items()}  # of the k-shot prompts: k, the seed, the examples drawn
    shot_texts = {k: hit["texts"] for k, key in shot_keys.items() if (hit := read_base_cache(key, len(rows)))}
    todo = [k for k in shot_sets if k not in shot_texts]

    def generated(m, these, soft_prompt=False):
        return generate(m, loaded.tokenizer, these, is_encoder_decoder=loaded.is_encoder_decoder,
                        max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size,
                        soft_prompt=soft_prompt)

    for which in ("tuned",) if cached and not todo else ("base", "tuned"):
        begun = time.monotonic()
        with base_model(loaded, recipe) if which == "base" else contextlib.nullcontext(model) as m, amp:
            if which == "tuned" or not cached:
                texts[which] = generated(m, prompts, soft_prompt and which == "tuned" and not loaded.is_encoder_decoder)
                if chunks:
                    general_loss[which] = mean_token_loss(m, chunks, loaded.is_encoder_decoder, recipe.eval.batch_size)
                if questions:
                    knows[which] = knowledge.score_questions(m, loaded.tokenizer, questions,
                                                             is_encoder_decoder=loaded.is_encoder_decoder,
                                                             batch_size=recipe.eval.batch_size)
            if which == "base" and todo:
                shots_begun = time.monotonic()
                shot_texts |= {k: generated(m, shot_sets[k][0]) for k in todo}
                seconds["shots"] = time.monotonic() - shots_begun
            del m  # no reference left when base_model frees a reloaded base and empties the allocator cache
        seconds[which] = time.monotonic() - begun - (seconds.get("shots", 0.0) if which == "base" else 0.0)
    if base_key and not cached:
        write_cached("eval", base_key, {"texts": texts["base"], "general_loss": general_loss.get("base"),
                                        "knowledge": knows["base"].to_json() if questions else None})
    for k in todo:
        if shot_keys[k]:
            write_cached("eval", shot_keys[k], {"texts": shot_texts[k], "general_loss": None})
    forgetting = None
    if chunks:
        forgetting = make_forgetting(recipe.eval.forgetting, len(chunks), general_loss["base"], general_loss["tuned"])
    seconds["total"] = time.monotonic() - started
    report = {
        "base": score(texts["base"], references, recipe.eval.metrics),
        "tuned": score(texts["tuned"], references, recipe.eval.metrics),
        "n": len(rows),
        "split": split,
        "in_train": None if train_rows is None else data_stage.rows_also_in(rows, train_rows, recipe.data),
        "generation": {
            "max_new_tokens": recipe.eval.max_new_tokens, "batch_size": recipe.eval.batch_size, "do_sample": False,
            "num_beams": 1, "repetition_penalty": 1.0, "use_cache": True, "stop": "eos",
            "prompt_max_tokens": max(len(p) for p in prompts), "prompts_truncated": truncated,
        },
        "rouge": {"package": f"rouge-score {metadata.version('rouge-score')}", "use_stemmer": True,
                  "aggregate": "mean", "sentence_split": SENTENCE_SPLIT_NOTE},
        "rougeLsum_without_sentence_split": {
            which: rouge_scores(texts[which], references, sentence_split=False)["rougeLsum"] for which in texts
        },
        "seconds": seconds,
        "base_from_cache": bool(cached),
        "forgetting": asdict(forgetting) if forgetting else None,
    }
    shots = shots_scores(recipe, report["base"], truncated, shot_sets, shot_texts, references)
    if shots:
        report["shots"] = {str(k): values for k, values in shots.items()}
        report["fewshot"] = {"seed": recipe.train.seed, "nested": True, "train_rows": drawn,
                             "from_cache": sorted(set(shot_sets) - set(todo))}
    if questions:
        report["knowledge"] = {"file": recipe.eval.knowledge, "base": knows["base"].to_json(),
                               "tuned": knows["tuned"].to_json(),
                               "summary": knowledge.compare_text(knows["base"], knows["tuned"])}
    write_json(eval_json, report)
    write_samples(samples_md, split, rows, recipe, references,
                  {**texts, **{f"base, {k}-shot": shot_texts[k] for k in shot_sets}})
    return EvalResult(
        split=split, n=len(rows), base=report["base"], tuned=report["tuned"], seconds=seconds["total"],
        max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size, forgetting=forgetting,
        eval_json=eval_json, samples_md=samples_md, prompts_truncated=truncated, base_from_cache=bool(cached),
        shots=shots, knowledge=(knows["base"], knows["tuned"]) if questions else None,
    )


def read_base_cache(key: str | None, n: int, questions: list | None = None) -> dict | None:
    """The base model's cached outputs under `key` when whole: a text for each of the n prompts, the general-text
    loss, and the knowledge score when there are questions; None when missing or damaged (generated again)."""
    cached = key and read_cached("eval", key)
    if (isinstance(cached, dict) and len(cached.get("texts", ())) == n and "general_loss" in cached
            and (questions is None or cached.get("knowledge"))):
        return cached
    return None


def shots_scores(recipe: Recipe, base: dict[str, float], truncated: int, shot_sets: dict, shot_texts: dict,
                 references: list[str]) -> dict[int, dict]:
    """{k: the base model's scores with k examples, rows_lost_examples, prompts_truncated} in eval.shots' order;
    k = 0 is the zero-shot base, not generated twice."""
    shots = {}
    for k in recipe.eval.shots:
        if k == 0:
            shots[0] = {**base, "rows_lost_examples": 0, "prompts_truncated": truncated}
            continue
        _, lost, cut = shot_sets[k]
        shots[k] = {**score(shot_texts[k], references, recipe.eval.metrics), "rows_lost_examples": lost,
                    "prompts_truncated": cut}
    return shots


def base_cache_key(recipe: Recipe, loaded: model_stage.LoadedModel, prompts: list[list[int]],
                   chunks: list[list[int]] | None, questions: list[knowledge.Question] | None = None) -> str | None:
    """A sha256 of everything the base model's generations, general-text loss and knowledge answers depend on: the
    model's files, how its base is loaded (4-bit or not, quantization, compute dtype, device), the prompt and
    general-text tokens (the template, the held-out rows, any few-shot examples, the tokenizer and the truncation
    are all in them), the questions, the generation settings, the library versions and this code. None where the
    model cannot be told apart cheaply (source.model_identity)."""
    identity = model_identity(recipe.model)
    if identity is None:
        return None
    q = recipe.quantization
    parts = {
        "model": identity,
        "base": {"4bit": recipe.load_in_4bit, "quant_type": q.quant_type, "double_quant": q.double_quant,
                 "reloaded": not recipe.has_adapter},  # full fine-tuning's base is loaded again, unquantized
        "device": loaded.device, "compute_dtype": str(loaded.compute_dtype),
        "gpu": torch.cuda.get_device_name() if loaded.device == "cuda" else None,
        "prompts": prompts, "chunks": chunks, "questions": [asdict(q) for q in questions] if questions else None,
        "generation": [recipe.eval.max_new_tokens, recipe.eval.batch_size, loaded.tokenizer.eos_token_id,
                       loaded.tokenizer.pad_token_id],
        "versions": library_versions(),
        "code": [file_sha256(Path(path)) for path in (model_stage.__file__, data_stage.__file__, knowledge.__file__,
                                                      __file__)],
    }
    return cache_key(parts)


def encode_prompts(rows: list[dict], recipe: Recipe, tokenizer, is_encoder_decoder: bool) -> tuple[list[list[int]], int]:
    """The prompt tokens training used, cut to leave room for max_new_tokens within train.max_length; and how
    many were cut (their end of input text is missing: a summary of it cannot be scored fairly)."""
    if not rows:
        raise UserError("the held-out split has no rows with both input and target text")
    limit, encoder = prompt_limit(recipe, is_encoder_decoder)
    encoded = [
        data_stage.encode_prompt(row, recipe.data, recipe.prompt, tokenizer, limit, encoder=encoder)
        for row in rows
    ]
    return [ids for ids, _ in encoded], sum(cut for _, cut in encoded)


def prompt_limit(recipe: Recipe, is_encoder_decoder: bool) -> tuple[int, bool]:
    """(most prompt tokens, whether the prompt is an encoder's): room for max_new_tokens within train.max_length."""
    if is_encoder_decoder:
        return recipe.train.max_source_length, True
    limit = recipe.train.max_length - recipe.eval.max_new_tokens
    if limit < 1:
        raise UserError(
            f"eval.max_new_tokens = {recipe.eval.max_new_tokens} leaves no room for the prompt within "
            f"train.max_length = {recipe.train.max_length}; lower eval.max_new_tokens"
        )
    return limit, False


def write_samples(path: Path, split: str, rows, recipe: Recipe, references, texts: dict[str, list[str]]) -> None:
    """Each example's input, reference and outputs: base, then any few-shot base ("base, 3-shot"), then tuned."""
    lines = [f"# Samples: base vs tuned ({split} split, {len(rows)} examples)", ""]
    order = ["base", *(label for label in texts if label not in ("base", "tuned")), "tuned"]
    for i, (row, reference) in enumerate(zip(rows, references)):
        lines += [
            f"## Example {i + 1}", "", f"**{recipe.data.input_column.capitalize()}**", "", "```text",
            data_stage.input_text(row, recipe.data).strip(), "```", "",
            f"**Reference:** {reference}", "",
        ]
        for label in order:
            lines += [f"**{label.capitalize()}:** {texts[label][i] or '(empty)'}", ""]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------- forgetting


def make_forgetting(source: str, chunks: int, base_loss: tuple[float, int], tuned_loss: tuple[float, int]):
    """Mean token loss and perplexity of base and tuned on general text (see mean_token_loss), and the change."""
    (base, tokens), (tuned, _) = base_loss, tuned_loss
    return Forgetting(
        source=source, chunks=chunks, tokens=tokens, base_loss=base, tuned_loss=tuned,
        base_perplexity=math.exp(base), tuned_perplexity=math.exp(tuned), loss_change=tuned - base,
        perplexity_change_pct=100 * (math.exp(tuned - base) - 1),
    )


def forgetting_texts(source: str) -> list[str]:
    """A .txt file (one text), a .jsonl/.json/.csv/.parquet file with a "text" column, or a dataset id/folder with
    one; a UserError for anything unusable. Writes nothing but the datasets cache and is quick the second time,
    so `run` can call it before training, where a bad source costs seconds rather than a whole training run."""
    path = Path(source)
    local = path.suffix in (".txt", *DATA_FILE_SUFFIXES)
    if local and not path.is_file():
        raise UserError(f"eval.forgetting: file {path} not found")
    if path.suffix == ".txt":  # the same checks and messages as data files (empty, not UTF-8: which line)
        texts = [data_stage.read_text_file("eval.forgetting", path)]
    else:
        rows = data_stage.load_file("eval.forgetting", path) if local else forgetting_dataset_rows(source)
        if "text" not in rows.column_names:
            raise UserError(f"eval.forgetting = {source!r}: no \"text\" column; its columns are {rows.column_names}")
        texts = rows["text"]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise UserError(f"eval.forgetting = {source!r} has no text; give general text to measure forgetting on "
                        f"(a .txt file, or rows with a \"text\" column)")
    return texts


def forgetting_dataset_rows(source: str):
    """The test split of a dataset id or folder, else validation, else train, else the first."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        splits = load_dataset(source)
    except ConnectionError:  # offline: HF_HUB_OFFLINE, which the CLI sets without a network, or unreachable
        raise UserError(f"eval.forgetting = {source!r}: cannot reach the dataset hub (and there is no folder "
                        f"{source} here); give a local .txt or .jsonl file with a text column") from None
    except (FileNotFoundError, ValueError) as e:  # no such dataset; no data files in the folder
        raise UserError(f"eval.forgetting = {source!r}: {str(e).splitlines()[0]}") from None
    except DatasetGenerationError as e:
        raise UserError(f"eval.forgetting = {source!r}: cannot read it ({error_line(e.__cause__ or e)})") from None
    return splits[next((s for s in ("test", "validation", "train") if s in splits), list(splits)[0])]


def text_chunks(texts: list[str], tokenizer, length: int, most: int) -> list[list[int]]:
    """Up to `most` windows of exactly `length` tokens (one shorter window when the text is short)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length * most:
            break
    if len(ids) < 4:
        raise UserError("eval.forgetting: the text has fewer than 4 tokens")
    if len(ids) < length:
        return [ids]
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][:most]


def mean_token_loss(model, chunks: list[list[int]], is_encoder_decoder: bool, batch_size: int) -> tuple[float, int]:
    """(mean cross-entropy per predicted token, tokens predicted); only one batch's logits exist at a time.

    Decoder-only models predict every token of a window; encoder-decoder models read its first half and predict
    the second (their natural objective: continuation given context).
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        ids = torch.tensor(chunks[start : start + batch_size], device=device)
        with torch.no_grad():
            if is_encoder_decoder:
                half = ids.shape[1] // 2
                loss = model(input_ids=ids[:, :half], labels=ids[:, half:].contiguous()).loss
                predicted = ids[:, half:].numel()
            else:
                loss = model(input_ids=ids, labels=ids).loss
                predicted = ids[:, 1:].numel()  # the first token has nothing to be predicted from
        total += loss.item() * predicted
        count += predicted
    free_accelerator_memory(device)
    return total / count, count
