"""Stage 1: read a TOML recipe into typed, frozen dataclasses, validated once.

This module is the only home of defaults. `load_recipe` refuses unknown keys (with a did-you-mean hint),
wrong types and out-of-range values, collects every problem and raises one `RecipeError`.
Relative data paths are resolved against the recipe file's folder; `output.dir` against the working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qlora_lite.errors import UserError, utf8_text
from qlora_lite.methods import METHODS, Method

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# [lora] init: PEFT's init_lora_weights by another name ("default" is its True); lora.py says which a run can use
LORA_INITS = ("default", "gaussian", "olora", "loftq", "eva", "pissa", "corda")


class RecipeError(UserError):
    """Every problem found in a recipe, reported at once."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source} has {len(problems)} {noun}:\n{lines}")


def _opt(default, *, lo=None, hi=None, doc=""):
    """A field with an inclusive range check (lo/hi) and a one-line description for the reference."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "doc": doc})


@dataclass(frozen=True)
class ModelRecipe:
    name: str = _opt("", doc="hub id, local directory, or package:<python package> holding the weights")
    gguf_file: str | None = _opt(None, doc="a .gguf file inside `name` (converted once, cached)")
    trust_remote_code: bool = _opt(False, doc="allow model code from the hub")


# [data] format: how a row holds its example. "columns": input and target columns and a prompt template;
# "messages": a list of {role, content} turns in the tokenizer's chat template; "prompt_completion": TRL's names.
DATA_FORMATS = ("columns", "messages", "prompt_completion")
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class MixRecipe:
    """One [[data.mix]] table: another dataset drawn into training as `weight` of the examples (e.g. general
    instructions replayed against forgetting). Its prompts take [prompt] chat_template and system from the main task."""
    train: str = _opt("", doc="a split of `source`, or a .jsonl/.json/.csv/.parquet path (required)")
    weight: float = _opt(0.0, lo=0, hi=1, doc="share of the training examples drawn from it (required)")
    source: str | None = _opt(None, doc="hub dataset id or local folder; optional when train is a file")
    eval: str | None = _opt(None, doc="its held-out split: the eval loss is also reported for this source")
    format: Literal[DATA_FORMATS] = _opt("columns", doc="as data.format")  # type: ignore[valid-type]
    input_column: str = _opt("dialogue", doc="columns format: column the prompt is built from")
    target_column: str = _opt("summary", doc="columns format: column the model learns to produce")
    messages_column: str = _opt("messages", doc="messages format: the column of turns")
    train_on: Literal["all", "last"] = _opt("all", doc="messages format: as data.train_on")
    template: str | None = _opt(None, doc="columns format: its prompt template (default: the input column alone)")


@dataclass(frozen=True)
class DataRecipe:
    source: str | None = _opt(None, doc="hub dataset id or local folder; optional when splits are files")
    train: str = _opt("train", doc="a split of `source`, or a .jsonl/.json/.csv/.parquet path")
    eval: str | None = _opt(None, doc="held-out split used during training and evaluation")
    test: str | None = _opt(None, doc="final held-out split for evaluation")
    format: Literal[DATA_FORMATS] = _opt(  # type: ignore[valid-type]
        "columns", doc='"columns" (input_column, target_column, prompt.template), "messages" (chat turns in '
                       'messages_column, the chat template), "prompt_completion" (columns prompt and completion)')
    input_column: str = _opt("dialogue", doc="column the prompt is built from")
    target_column: str = _opt("summary", doc="column the model learns to produce")
    messages_column: str = _opt("messages", doc='format "messages": the column holding a list of {role, content}')
    train_on: Literal["all", "last"] = _opt("all", doc='format "messages": the loss covers all assistant turns, or '
                                                       'the last one only')
    max_train_samples: int | None = _opt(None, lo=1, doc="use only the first N training rows")
    mix: list[MixRecipe] = _opt((), doc="[[data.mix]] tables: other datasets mixed into training (keys below)")

    @property
    def mix_keys(self) -> list[str]:
        """The recipe key of each [[data.mix]] table, numbered from 1 ("data.mix[1]"), as errors, the setup table
        and result.json name the sources."""
        return [f"data.mix[{i}]" for i in range(1, len(self.mix) + 1)]

    @property
    def main_weight(self) -> float:
        """The main task's share of the training examples when others are mixed in."""
        return 1.0 - sum(m.weight for m in self.mix)


@dataclass(frozen=True)
class PromptRecipe:
    template: str = _opt("{dialogue}", doc="prompt text with {column} placeholders")
    chat_template: bool = _opt(False, doc="wrap the prompt in the tokenizer's chat template")
    system: str | None = _opt(None, doc="system message when chat_template = true")


@dataclass(frozen=True)
class MethodRecipe:
    kind: Literal[tuple(METHODS)] = _opt(  # type: ignore[valid-type]  (the names of methods.METHODS)
        "qlora", doc="qlora = LoRA on a 4-bit base; lora = on a 16-bit base; full = every weight; prompt_tuning; "
                     "ln_tuning = the norm layers; ia3 = scaling vectors"
    )
    num_virtual_tokens: int = _opt(20, lo=1, hi=512, doc="prompt_tuning: trainable soft-prompt tokens")
    prompt_tuning_init_text: str | None = _opt(
        None, doc="prompt_tuning: text the virtual tokens start from (default: the template's own words)"
    )

    @property
    def spec(self) -> Method:
        """What this method is (methods.METHODS): what trains, whether the base is 4-bit, what merges."""
        return METHODS[self.kind]


@dataclass(frozen=True)
class QuantizationRecipe:
    load_in_4bit: bool = _opt(True, doc="4-bit base for prompt_tuning (qlora always, lora and full never)")
    quant_type: Literal["nf4", "fp4"] = _opt("nf4", doc="4-bit data type")
    double_quant: bool = _opt(True, doc="quantize the quantization constants too (~0.37 bit/param saved)")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = _opt(
        "auto", doc="auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU"
    )
    quant_storage: Literal["auto", "uint8", "compute_dtype"] = _opt(
        "auto", doc="the dtype 4-bit weights are packed in: auto = uint8, or the compute dtype under "
                    "train.strategy = \"fsdp\" (FSDP shards float parameters only)")


@dataclass(frozen=True)
class LoraRecipe:
    r: int = _opt(16, lo=1, hi=1024, doc="rank of the update matrices")
    alpha: float = _opt(32, lo=0, doc="scale: the update is multiplied by alpha / r")
    dropout: float = _opt(0.05, lo=0, hi=0.99, doc="dropout on the LoRA input")
    target_modules: str | list[str] = _opt("all-linear", doc='"all-linear" or a list of module names')
    use_rslora: bool = _opt(False, doc="rank-stabilized LoRA: scale the update by alpha / sqrt(r) instead")
    use_dora: bool = _opt(False, doc="DoRA: also train each layer's weight magnitude (slower: a weight norm per "
                                     "layer and step)")
    init: Literal[LORA_INITS] = _opt(  # type: ignore[valid-type]
        "default", doc="LoRA's starting weights: default (B = 0), gaussian, loftq (4-bit base: fits the adapter to "
                       "the rounding error); olora, pissa, corda, eva are refused (see lora.py)")


@dataclass(frozen=True)
class TrainRecipe:
    max_steps: int | None = _opt(None, lo=1, doc="optimizer steps; set this or epochs")
    epochs: float | None = _opt(None, lo=0.01, doc="passes over the training split (default 1)")
    micro_batch_size: int = _opt(4, lo=1, doc="sequences per forward pass")
    gradient_accumulation_steps: int = _opt(4, lo=1, doc="micro-batches per optimizer step")
    learning_rate: float = _opt(2e-4, lo=0, hi=1, doc="peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _opt("cosine", doc="learning-rate schedule after warmup")
    warmup_ratio: float = _opt(0.03, lo=0, hi=0.99, doc="fraction of steps spent warming up")
    weight_decay: float = _opt(0.0, lo=0, doc="AdamW weight decay on the LoRA weights")
    max_grad_norm: float = _opt(0.3, lo=0, doc="gradient clipping (0.3 as in the QLoRA paper)")
    max_length: int = _opt(512, lo=8, doc="decoder-only: prompt + target tokens")
    max_source_length: int = _opt(512, lo=8, doc="encoder-decoder: prompt tokens")
    max_target_length: int = _opt(128, lo=2, doc="encoder-decoder: target tokens (with EOS)")
    gradient_checkpointing: bool = _opt(True, doc="recompute activations in backward to save memory")
    group_by_length: bool = _opt(False, doc="batch sequences of similar length (less padding; the loss curve "
                                            "zigzags more)")
    packing: bool = _opt(False, doc="decoder-only: several examples per row of max_length, no attention between "
                                    "them (no padding work)")
    loraplus_lr_ratio: float | None = _opt(None, lo=1, doc="LoRA+: lora_B trains at learning_rate x this "
                                                           "(e.g. 16); LoRA methods only")
    optimizer: Literal[
        "auto", "adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_bnb_8bit", "adafactor"
    ] = _opt("auto", doc="auto = paged_adamw_8bit on CUDA, adamw_torch on CPU")
    seed: int = _opt(42, doc="seeds the adapter's initial weights, shuffling and dropout")
    deterministic: bool = _opt(False, doc="CUDA: deterministic kernels, bit-reproducible and slower (CPU runs "
                                          "already are)")
    logging_steps: int = _opt(10, lo=1, doc="a metrics.jsonl line every N steps")
    report_to: list[Literal["tensorboard", "wandb"]] = _opt(
        (), doc='live curves: "tensorboard" (RUN_DIR/tensorboard/), "wandb" (installed and logged in)')
    save_steps: int = _opt(100, lo=1, doc="checkpoint every N steps (for --resume)")
    save_total_limit: int = _opt(2, lo=1, doc="checkpoints kept")
    eval_steps: int | None = _opt(None, lo=1, doc="eval loss every N steps (needs data.eval)")
    device: Literal["auto", "cuda", "cpu"] = _opt("auto", doc="auto = cuda when available")
    strategy: Literal["ddp", "fsdp"] = _opt("ddp", doc="with several GPUs (run --nproc N): ddp = each holds the "
                                                      "whole model (faster); fsdp = the model sharded across them "
                                                      "(FSDP2, experimental: for a model larger than one GPU)")

    def optimizer_on(self, device: str) -> str:
        """The optimizer this recipe trains with on `device`: auto = paged 8-bit AdamW on CUDA (optimizer state off
        the GPU's critical path), plain AdamW on CPU. The trainer builds it and the planner counts its state."""
        if self.optimizer == "auto":
            return "paged_adamw_8bit" if device == "cuda" else "adamw_torch"
        return self.optimizer


@dataclass(frozen=True)
class BudgetRecipe:
    gpu_memory_gib: float | None = _opt(None, lo=0.5, doc="memory budget in GiB")
    gpu: str | None = _opt(None, doc='a named card, e.g. "rtx-3060-12gb" (sets gpu_memory_gib)')
    on_exceed: Literal["stop", "warn"] = _opt("stop", doc="what to do when training crosses the budget")
    auto_fit: bool = _opt(False, doc="shrink the micro-batch (keeping the effective batch) to fit")


@dataclass(frozen=True)
class EvalRecipe:
    enabled: bool = _opt(True, doc="evaluate base vs tuned at the end of run")
    split: Literal["test", "eval"] = _opt("test", doc="which held-out split (falls back to eval)")
    max_new_tokens: int = _opt(128, lo=1, doc="generation length cap (always explicit)")
    batch_size: int = _opt(8, lo=1, doc="prompts generated at once (its own memory peak)")
    max_samples: int | None = _opt(None, lo=1, doc="evaluate on the first N examples")
    metrics: list[Literal["rouge", "bleu"]] = _opt(("rouge",), doc='ROUGE always; add "bleu" for sacrebleu BLEU')
    forgetting: str | None = _opt(None, doc="a .txt/.jsonl (column text) file or dataset id: loss before/after")
    knowledge: str | None = _opt(None, doc="a .jsonl of multiple-choice questions (question, choices, answer): "
                                           "base vs tuned accuracy")
    shots: list[int] = _opt((), doc="few-shot baselines, e.g. [0, 1, 3]: the base model with k training examples "
                                    "before each prompt")


@dataclass(frozen=True)
class ExportRecipe:
    merge: bool = _opt(False, doc="merge the adapter into a full-precision copy at the end of run")
    dtype: Literal["bf16", "fp16", "fp32"] = _opt("bf16", doc="dtype of the merged export")
    base: Literal["dequantized", "original"] = _opt("dequantized", doc="merge into the NF4-rounded base")
    gguf: Literal["f16", "bf16", "q8_0"] | None = _opt(
        None, doc="also write the merged model as GGUF for llama.cpp/Ollama (RUN_DIR/gguf-<type>/), checked"
    )


@dataclass(frozen=True)
class OutputRecipe:
    dir: str = _opt("runs", doc="run directory = <dir>/<name>")


SECTIONS: dict[str, type] = {
    "model": ModelRecipe,
    "data": DataRecipe,
    "prompt": PromptRecipe,
    "method": MethodRecipe,
    "quantization": QuantizationRecipe,
    "lora": LoraRecipe,
    "train": TrainRecipe,
    "budget": BudgetRecipe,
    "eval": EvalRecipe,
    "export": ExportRecipe,
    "output": OutputRecipe,
}


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelRecipe
    data: DataRecipe = DataRecipe()
    prompt: PromptRecipe = PromptRecipe()
    method: MethodRecipe = MethodRecipe()
    quantization: QuantizationRecipe = QuantizationRecipe()
    lora: LoraRecipe = LoraRecipe()
    train: TrainRecipe = TrainRecipe()
    budget: BudgetRecipe = BudgetRecipe()
    eval: EvalRecipe = EvalRecipe()
    export: ExportRecipe = ExportRecipe()
    output: OutputRecipe = OutputRecipe()

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.name

    @property
    def load_in_4bit(self) -> bool:
        """Whether the base loads in 4-bit: as the method says, or as [quantization] says where the method lets it."""
        return self.method.spec.quantizes(self.quantization.load_in_4bit)

    @property
    def has_adapter(self) -> bool:
        """A PEFT adapter on a frozen base (every method but full fine-tuning)."""
        return self.method.spec.has_adapter

    def with_method(self, kind: str) -> Recipe:
        """This recipe trained by another method; a method that needs a 4-bit base brings it (load_recipe refuses
        quantization.load_in_4bit = false with it)."""
        quant = self.quantization
        if METHODS[kind].base_in_4bit:
            quant = dataclasses.replace(quant, load_in_4bit=True)
        return dataclasses.replace(self, method=dataclasses.replace(self.method, kind=kind), quantization=quant)


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = (), *, files_must_exist: bool = True) -> Recipe:
    """Read, override (`a.b=value`), validate and resolve a recipe file. A finished run's saved recipe is read
    with files_must_exist=False: its eval, merge and report need no training file, which may have moved since."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path} is a folder, not a recipe file" if path.is_dir() else f"no recipe file at {path}"],
                          source=str(path))
    try:
        text = utf8_text(path.read_bytes())
    except ValueError as e:
        raise RecipeError([f"{e}: save the file as UTF-8"], source=str(path)) from None
    if not text.strip():
        raise RecipeError(['the file is empty; a recipe needs at least name = "..." and [model] name = "..." '
                           '(see recipes/quickstart.toml)'], source=str(path))
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        twice = " (a key or [section] written twice: keep one)" if "Cannot overwrite" in str(e) or \
            "Cannot declare" in str(e) else ""
        raise RecipeError([f"not valid TOML: {e}{twice}"], source=str(path)) from None
    return recipe_from_dict(raw, overrides, base_dir=path.parent, source=str(path), files_must_exist=files_must_exist)


def recipe_from_dict(raw: dict, overrides=(), base_dir: Path = Path("."), source="recipe",
                     files_must_exist: bool = True) -> Recipe:
    problems: list[str] = []
    raw = _apply_overrides(raw, overrides, problems)
    sections = {}
    for key in raw:
        if key != "name" and key not in SECTIONS:
            what = f"section [{key}]" if isinstance(raw[key], dict) else f"top-level key {key}"
            problems.append(f"unknown {what}{_home(key) or _hint(key, ['name', *SECTIONS])}")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        problems.append(
            f"name: expected a run name of letters, digits, '.', '_' or '-' (it names the run directory), "
            f"got {name!r}"
        )
    for section, cls in SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            problems.append(f"{section}: expected a table [{section}], got {_tname(table)}")
            table = {}
        sections[section] = _build(cls, section, table, problems)
    if not problems:  # a format's problems do not hide the others: both are said at once
        format_problems: list[str] = []
        sections["data"], sections["prompt"] = _apply_formats(sections["data"], sections["prompt"], raw,
                                                              format_problems)
        problems += format_problems + _cross_checks(sections, base_dir, files_must_exist)
    if problems:
        raise RecipeError(problems, source=source)
    sections["data"] = _resolve_data_paths(sections["data"], base_dir)
    sections["model"] = _resolve_model_path(sections["model"], base_dir)
    sections["eval"] = _resolve_forgetting_path(sections["eval"], base_dir)
    return Recipe(name=name, **sections)


def _apply_formats(data: DataRecipe, prompt: PromptRecipe, raw: dict, problems: list[str]):
    """The columns and prompt each data format implies, for the main task and each [[data.mix]] source, so that
    every later stage reads input_column, target_column and a template whatever the format. A key the user set
    that the format does not use is refused rather than silently ignored."""
    raw_data, raw_prompt = raw.get("data", {}), raw.get("prompt", {})
    data = dataclasses.replace(data, **_format_columns(data, "data", raw_data, problems))
    if data.format == "prompt_completion" and "template" not in raw_prompt:
        prompt = dataclasses.replace(prompt, template="{prompt}")
    if data.format == "messages":
        if raw_prompt.get("chat_template") is False:
            problems.append('prompt.chat_template = false with data.format = "messages": a conversation is rendered '
                            'with the tokenizer\'s chat template; remove prompt.chat_template')
        if raw_prompt.get("template", prompt.template) not in (PromptRecipe().template,
                                                               "{" + data.messages_column + "}"):
            problems.append('prompt.template: not used with data.format = "messages" (the conversation is the '
                            'prompt); remove it')
        prompt = dataclasses.replace(prompt, template="{" + data.messages_column + "}", chat_template=True)
    mix = []
    for key, source, table in zip(data.mix_keys, data.mix, raw_data.get("mix", ())):
        source = dataclasses.replace(source, **_format_columns(source, key, table, problems))
        if source.format == "messages" and source.template not in (None, "{" + source.messages_column + "}"):
            problems.append(f'{key}.template: not used with format = "messages" (the conversation is the '
                            f'prompt); remove it')
        elif source.format == "messages":
            source = dataclasses.replace(source, template="{" + source.messages_column + "}")
        elif source.template is None:
            source = dataclasses.replace(source, template="{" + source.input_column + "}")
        mix.append(source)
    return dataclasses.replace(data, mix=tuple(mix)), prompt


def _format_columns(data: DataRecipe | MixRecipe, key: str, table: dict, problems: list[str]) -> dict:
    """{input_column, target_column} as `data.format` names them; a conflicting column the user set is a problem."""
    if data.format == "columns":
        return {}
    if data.format == "prompt_completion":
        implied, why = {"input_column": "prompt", "target_column": "completion"}, (
            'it reads the columns "prompt" and "completion"; for other names use format = "columns"')
    else:
        implied, why = dict.fromkeys(("input_column", "target_column"), data.messages_column), (
            "the conversation in messages_column is both prompt and target")
    for column, value in implied.items():
        if column in table and table[column] != value:
            problems.append(f'{key}.{column}: not used with {key}.format = "{data.format}" ({why}); remove it')
    return implied


def mix_as_data(source: MixRecipe, prompt: PromptRecipe) -> tuple[DataRecipe, PromptRecipe]:
    """A [[data.mix]] source as the data and prompt recipes of a task of its own, for data.py to load and encode
    like the main task: its own columns and template (resolved by load_recipe), the main task's chat template and
    system message."""
    data = DataRecipe(source=source.source, train=source.train, eval=source.eval, format=source.format,
                      input_column=source.input_column, target_column=source.target_column,
                      messages_column=source.messages_column, train_on=source.train_on)
    return data, dataclasses.replace(prompt, template=source.template,
                                     chat_template=prompt.chat_template or source.format == "messages")


def _apply_overrides(raw: dict, overrides, problems: list[str]) -> dict:
    """`--set train.max_steps=30`: the value parses as TOML, else it is taken as a bare string."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected section.key=value, e.g. train.max_steps=30")
            continue
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        parts = key.split(".")
        if not all(part.strip() for part in parts):
            problems.append(f"--set {item!r}: expected section.key=value, e.g. train.max_steps=30 (an empty name "
                            f"in {key!r})")
            continue
        if len(parts) == 1:
            raw[key] = value
        elif len(parts) == 2:
            table = raw.setdefault(parts[0], {})
            if isinstance(table, dict):
                table[parts[1]] = value
        else:
            problems.append(f"--set {item!r}: expected section.key=value (one dot), got {key!r}")
    return raw


def _build(cls, section: str, table: dict, problems: list[str]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        where = f"{section}.{key}"
        if key not in fields:
            hint = _home(key, section) or _hint(key, list(fields), prefix=section + ".")  # an exact key first
            problems.append(f"unknown key {where}{hint}")
            continue
        item = _table_of(hints[key])
        if item is not None:  # [[data.mix]]: a list of tables, each built and checked as a section of its own
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                problems.append(f"{where}: expected tables, each written [[{where}]], got {_tname(value)} {value!r}")
            else:
                values[key] = tuple(_build(item, f"{where}[{i}]", v, problems) for i, v in enumerate(value, 1))
            continue
        problem = _check_type(value, hints[key])
        if problem is None:
            meta = fields[key].metadata
            lo, hi = meta.get("lo"), meta.get("hi")
            if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
                problem = f"expected a finite number, got {value!r}"
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                if lo is not None and value < lo or hi is not None and value > hi:
                    problem = f"expected a value in [{lo}, {'∞' if hi is None else hi}], got {value!r}"
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        if isinstance(value, list):
            value = tuple(value)
        if hints[key] is float or float in typing.get_args(hints[key]):
            value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
        values[key] = value
    try:
        return cls(**values)
    except TypeError:  # only reached with problems already recorded
        return cls()


def _table_of(hint):
    """The dataclass of a `list[SomeRecipe]` field (a TOML array of tables), else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _check_type(value, hint) -> str | None:
    """None when `value` fits the type hint, else what was expected."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return None
        return f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}{_hint(str(value), choices)}"
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if any(_check_type(value, a) is None for a in options):
            return None
        return f"expected {' or '.join(_describe(a) for a in options)}, got {_tname(value)} {value!r}"
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            return f"expected {_describe(hint)}, got {_tname(value)} {value!r}"
        for v in value:
            problem = _check_type(v, item)
            if problem:
                return f"list item {v!r}: {problem}"
        return None
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[hint](value)
    return None if ok else f"expected {_describe(hint)}, got {_tname(value)} {value!r}"


def _describe(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if typing.get_origin(item) is Literal:
            return "a list of values from " + ", ".join(repr(c) for c in typing.get_args(item))
        return f"a list of {_describe(item).removeprefix('an ').removeprefix('a ')}s"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _tname(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}.get(
        type(value), type(value).__name__
    )


def _hint(word: str, choices, prefix: str = "") -> str:
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    close = close or sorted((c for c in choices if word.startswith(c) or c.startswith(word)), key=len)[-1:]
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _home(key: str, not_in: str = "") -> str:
    """' (max_steps is a key of [train])' for a key written in the wrong section, or above every section."""
    homes = [name for name, cls in SECTIONS.items()
             if name != not_in and key in {f.name for f in dataclasses.fields(cls)}]
    return f" ({key} is a key of [{'], ['.join(homes)}]: write it under that section)" if homes else ""


def parse_methods(text: str | None, flag: str = "--methods") -> list[str]:
    """"qlora,full" -> ["qlora", "full"]; None or "all" -> every method. Unknown names are a UserError."""
    if text is None or text == "all":
        return list(METHODS)
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise UserError(f"{flag}: unknown method {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(METHODS)} (comma-separated) or all")
    return list(dict.fromkeys(chosen))


def placeholders(template: str) -> list[str]:
    """Column names a prompt template refers to: `{dialogue}`; `{{` and `}}` are literal braces."""
    return re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", template)


def literal_braces(text: str) -> str:
    """A template's text with its escaped braces as they read: `{{` -> `{`, `}}` -> `}`."""
    return text.replace("{{", "{").replace("}}", "}")


def _cross_checks(s: dict, base_dir: Path, files_must_exist: bool = True) -> list[str]:
    problems = []
    model, data, prompt, train, budget = s["model"], s["data"], s["prompt"], s["train"], s["budget"]
    method = s["method"]
    if method.kind == "qlora" and not s["quantization"].load_in_4bit:
        problems.append(
            'quantization.load_in_4bit = false with method.kind = "qlora": QLoRA is LoRA on a 4-bit base; '
            'for LoRA on a 16-bit base set [method] kind = "lora"'
        )
    if train.strategy == "fsdp" and not method.spec.uses_lora:
        problems.append(f'train.strategy = "fsdp": qlora_lite shards the LoRA methods (qlora, lora), not '
                        f'{method.kind}; use strategy = "ddp"')
    if train.strategy == "fsdp" and s["quantization"].quant_storage == "uint8":
        problems.append('quantization.quant_storage = "uint8" with train.strategy = "fsdp": FSDP shards float '
                        'parameters only, so uint8 4-bit weights would stay whole on every GPU; set quant_storage '
                        '= "auto" (the compute dtype under FSDP)')
    if method.kind != "prompt_tuning" and method.prompt_tuning_init_text is not None:
        problems.append('method.prompt_tuning_init_text: only used with [method] kind = "prompt_tuning"')
    problems += _lora_variant_checks(s)
    if not model.name:
        problems.append('model.name: required, e.g. name = "google/flan-t5-base" or a local folder')
    if model.gguf_file is not None and not model.gguf_file.endswith(".gguf"):
        problems.append(f"model.gguf_file: expected a file name ending in .gguf, got {model.gguf_file!r}")
    targets = s["lora"].target_modules
    if isinstance(targets, str) and targets != "all-linear":
        problems.append(f'lora.target_modules: expected "all-linear" or a list of module names, got {targets!r}; '
                        f'for one module write ["{targets}"]')
    if not isinstance(targets, str) and not targets:
        problems.append('lora.target_modules: the list is empty; name the layers to adapt, e.g. ["q_proj", '
                        '"v_proj"], or write "all-linear"')
    if train.max_steps is not None and train.epochs is not None:
        problems.append("train: set max_steps or epochs, not both")
    if not placeholders(prompt.template):
        problems.append(
            f"prompt.template: has no {{column}} placeholder, so every prompt would be the same; "
            f'e.g. template = "Summarize:\\n{{{data.input_column}}}\\n"'
        )
    if data.format != "messages" and data.target_column in placeholders(prompt.template):
        problems.append(f"prompt.template: uses {{{data.target_column}}}, the target column: the model would read "
                        f"the answer in its prompt; use the input column {{{data.input_column}}}")
    export = s["export"]
    if export.gguf is not None and method.spec.not_merged and method.spec.has_adapter:
        problems.append(f"export.gguf: {method.spec.not_merged}; GGUF export needs a model with the training in "
                        f"its weights: remove export.gguf")
    elif export.gguf is not None and not export.merge and method.spec.has_adapter:
        problems.append("export.gguf: the GGUF file is made from the merged model: set [export] merge = true too")
    if train.packing and method.spec.trains == "soft prompt":
        problems.append("train.packing: prompt tuning puts its virtual tokens before each row, so packed examples "
                        "would share one soft prompt and see each other; set packing = false for prompt_tuning")
    if train.packing and train.group_by_length:
        problems.append("train.packing: rows are already packed to train.max_length; remove train.group_by_length")
    if prompt.system is not None and not prompt.chat_template:
        problems.append("prompt.system: only used with prompt.chat_template = true")
    if s["eval"].enabled and data.test is None and data.eval is None:
        problems.append("eval.enabled (the default) needs a held-out split to evaluate on: set data.test or "
                        "data.eval, or [eval] enabled = false")
    elif s["eval"].enabled and s["eval"].split == "eval" and data.eval is None:
        problems.append('eval.split = "eval" but data.eval is not set; set data.eval, or eval.split = "test"')
    if train.eval_steps is not None and data.eval is None:
        problems.append("train.eval_steps: the eval loss needs data.eval (a validation split); set it or remove "
                        "train.eval_steps")
    forgetting = s["eval"].forgetting

    def missing(value: str) -> bool:
        return files_must_exist and not (base_dir / value).is_file()

    if forgetting and forgetting.endswith((".txt", *DATA_FILE_SUFFIXES)) and missing(forgetting):
        problems.append(_not_found("eval.forgetting", forgetting, base_dir))
    if s["eval"].knowledge and missing(s["eval"].knowledge):
        problems.append(_not_found("eval.knowledge", s["eval"].knowledge, base_dir))
    problems += _shots_checks(s["eval"].shots, data.max_train_samples)
    if budget.gpu is not None and budget.gpu_memory_gib is not None:
        problems.append("budget: set gpu or gpu_memory_gib, not both")
    for split in ("train", "eval", "test"):
        problems += _split_problems("data", split, getattr(data, split), data.source, base_dir, missing)
    problems += _mix_checks(data, prompt, base_dir, missing)
    return problems


def _split_problems(key: str, split: str, value: str | None, source: str | None, base_dir: Path, missing) -> list:
    """What is wrong with where a split is: a missing file, a folder, a file of another kind, a split name with no
    source to take it from."""
    where = f"{key}.{split}"
    if value is None:
        return []
    if value.endswith(DATA_FILE_SUFFIXES):
        return [_not_found(where, value, base_dir)] if missing(value) else []
    if source is None and (base_dir / value).is_dir():
        return [f"{where}: {value} is a folder; set {key}.source = {value!r} and {where} to a split name (a file's "
                f"name without its extension), or point it at a file"]
    if source is None and (base_dir / value).is_file():
        return [f"{where}: {value} is not a data file qlora_lite reads; convert it to .jsonl/.json/.csv/.parquet"]
    if source is None:
        return [f"{where}: {value!r} is a split name but {key}.source is not set; set {key}.source to a dataset id "
                f"or folder, or point {where} to a .jsonl/.json/.csv/.parquet file"]
    return []


def _mix_checks(data: DataRecipe, prompt: PromptRecipe, base_dir: Path, missing) -> list[str]:
    """[[data.mix]]: each source needs a train split and a weight, its template a column, and the weights must
    leave the main task a share."""
    problems = []
    for key, source in zip(data.mix_keys, data.mix):
        if not source.train:
            problems.append(f'{key}.train: required: a .jsonl/.json/.csv/.parquet file or a split of {key}.source, '
                            f'e.g. train = "data/replay/train.jsonl"')
        if source.weight <= 0 or source.weight >= 1:
            problems.append(f"{key}.weight: required, the share of training examples drawn from this source, "
                            f"between 0 and 1 (e.g. 0.2); got {source.weight!r}")
        for split in ("train", "eval"):
            if getattr(source, split):
                problems += _split_problems(key, split, getattr(source, split), source.source, base_dir, missing)
        template = mix_as_data(source, prompt)[1].template
        if source.format != "messages" and not placeholders(template):
            problems.append(f"{key}.template: has no {{column}} placeholder; e.g. template = "
                            f'"{{{source.input_column}}}"')
        if source.format != "messages" and source.target_column in placeholders(template):
            problems.append(f"{key}.template: uses {{{source.target_column}}}, the target column: the model would "
                            f"read the answer in its prompt")
    total = sum(source.weight for source in data.mix)
    if data.mix and total >= 1 and all(0 < source.weight < 1 for source in data.mix):
        problems.append(f"data.mix: the weights sum to {total:g}, leaving the main task nothing (it keeps 1 - their "
                        f"sum of the training examples); keep their sum below 1 (e.g. 0.2 for 20% replay)")
    return problems


def _lora_variant_checks(s: dict) -> list[str]:
    """LoRA's variants need a method that trains LoRA, and an init that works on the base the method loads."""
    from qlora_lite.lora import init_problem  # lora.py reads LoraRecipe from here

    lora, method, train = s["lora"], s["method"], s["train"]
    lora_methods = ", ".join(f'"{k}"' for k, m in METHODS.items() if m.uses_lora)
    used = [f"lora.{k} = {_toml_value(getattr(lora, k))}" for k in ("use_dora", "use_rslora", "init")
            if getattr(lora, k) != getattr(LoraRecipe(), k)]
    if train.loraplus_lr_ratio is not None:
        used.append(f"train.loraplus_lr_ratio = {train.loraplus_lr_ratio!r}")
    if not method.spec.uses_lora:
        return [f'{key}: a LoRA setting, but method.kind = "{method.kind}" trains no LoRA; remove it or set '
                f'[method] kind to {lora_methods}' for key in used]
    four_bit = method.spec.quantizes(s["quantization"].load_in_4bit)
    problem = init_problem(lora.init, four_bit)
    if problem:
        return [f"lora.init = {_toml_value(lora.init)}: {problem}"]
    if lora.init == "loftq" and s["export"].base == "original":
        return ['lora.init = "loftq" with export.base = "original": the adapter starts at the NF4 rounding error of '
                'the base weights, and merged into the original weights it would add that correction twice; set '
                'export.base = "dequantized"']
    if lora.init == "loftq" and lora.use_dora:  # DoRA's magnitudes are taken from the weights before LoftQ moves them
        return ['lora.init = "loftq" with lora.use_dora = true: not supported together; drop one of them']
    return []


def _shots_checks(shots: tuple[int, ...], max_train_samples: int | None) -> list[str]:
    """eval.shots: distinct k >= 0, each at most the training rows where data.max_train_samples bounds them (run
    checks the rows it loaded)."""
    problems = [f"eval.shots: {k} is negative; give numbers of examples, 0 or more, e.g. shots = [0, 1, 3]"
                for k in shots if k < 0]
    twice = sorted({k for k in shots if shots.count(k) > 1})
    if twice:
        problems.append(f"eval.shots: {', '.join(map(str, twice))} given more than once; give each k once")
    over = [k for k in shots if max_train_samples is not None and k > max_train_samples]
    if over:
        problems.append(f"eval.shots: {max(over)} examples, more than the training rows data.max_train_samples = "
                        f"{max_train_samples} keeps; lower eval.shots to at most {max_train_samples} or raise "
                        f"data.max_train_samples")
    return problems


def _not_found(key: str, value: str, base_dir: Path) -> str:
    return f"{key}: file {value} not found (looked in {(base_dir / value).resolve()})"


def _resolve_data_paths(data: DataRecipe | MixRecipe, base_dir: Path) -> DataRecipe | MixRecipe:
    changes = {}
    for split in ("train", "eval", "test"):
        value = getattr(data, split, None)
        if value is not None and value.endswith(DATA_FILE_SUFFIXES):
            changes[split] = str((base_dir / value).resolve())
    if data.source is not None and (base_dir / data.source).is_dir():
        changes["source"] = str((base_dir / data.source).resolve())
    if getattr(data, "mix", ()):
        changes["mix"] = tuple(_resolve_data_paths(source, base_dir) for source in data.mix)
    return dataclasses.replace(data, **changes)


def _resolve_forgetting_path(ev: EvalRecipe, base_dir: Path) -> EvalRecipe:
    """eval.forgetting and eval.knowledge, when they name files, against the recipe's folder."""
    changes = {key: str((base_dir / value).resolve()) for key in ("forgetting", "knowledge")
               if (value := getattr(ev, key)) is not None and (base_dir / value).exists()}
    return dataclasses.replace(ev, **changes)


def _resolve_model_path(model: ModelRecipe, base_dir: Path) -> ModelRecipe:
    if (base_dir / model.name).is_dir() and not model.name.startswith("package:"):
        return dataclasses.replace(model, name=str((base_dir / model.name).resolve()))
    return model


# ---------------------------------------------------------------- writing


def recipe_to_toml(recipe: Recipe) -> str:
    """The fully resolved recipe, every default spelled out; `load_recipe` reads it back unchanged."""
    lines = [f"name = {_toml_value(recipe.name)}"]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(SECTIONS[section]):
            value = getattr(getattr(recipe, section), f.name)
            if value is None:
                lines.append(f"# {f.name} is not set")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def changed_settings(recipe: Recipe) -> list[str]:
    """"section.key = value" for each setting that differs from its default here (the name first): what a person
    reads before a run, where the whole resolved recipe is some 80 lines."""
    lines = [f"name = {_toml_value(recipe.name)}"]
    for section, cls in SECTIONS.items():
        defaults = cls()
        for f in dataclasses.fields(cls):
            value = getattr(getattr(recipe, section), f.name)
            if value != getattr(defaults, f.name):
                lines.append(f"{section}.{f.name} = {'(unset)' if value is None else _toml_value(value)}")
    return lines


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if dataclasses.is_dataclass(value):  # a [[data.mix]] table, inline: {train = "...", weight = 0.2, ...}
        return "{" + ", ".join(f"{f.name} = {_toml_value(getattr(value, f.name))}" for f in dataclasses.fields(value)
                               if getattr(value, f.name) is not None) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def reference() -> list[tuple[str, str, str]]:
    """(key, default, description) for every recipe key, for the README's reference table."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = "(unset)" if f.default is None else _toml_value(f.default)
            rows.append((f"{section}.{f.name}", default, f.metadata.get("doc", "")))
            if (table := _table_of(typing.get_type_hints(cls)[f.name])) is not None:
                rows += [(f"{section}.{f.name}[].{g.name}", "(unset)" if g.default is None else _toml_value(g.default),
                          g.metadata.get("doc", "")) for g in dataclasses.fields(table)]
    return rows
