"""Training on tiny 4-bit models: the loss falls, only LoRA weights move, the encoder never sees the target,
runs resume from their checkpoint and are never overwritten."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import make_rows, recipe_text, write_jsonl
from qlora_lite import data as data_stage
from qlora_lite import events
from qlora_lite import model as model_stage
from qlora_lite.cli import main
from qlora_lite.errors import UserError
from qlora_lite.recipe import load_recipe
from qlora_lite.run import run
from qlora_lite.rundir import RunDir
from qlora_lite.train import train


def make_recipe(tmp_path, model_dir, data_dir, name="t", overrides=(), **extra):
    path = tmp_path / f"{name}.toml"
    path.write_text(recipe_text(model_dir, data_dir, tmp_path / "runs", name=name, **extra))
    return load_recipe(path, list(overrides))


def losses(run_dir: Path) -> list[float]:
    return [loss for _, loss in RunDir(run_dir).losses()]


def falls(values: list[float]) -> bool:
    return sum(values[-3:]) / 3 < sum(values[:3]) / 3 - 0.1


def train_directly(recipe):
    """The stages `run` calls, with the model kept so the test can inspect it."""
    recipe.run_dir.mkdir(parents=True)
    loaded = model_stage.load_model(recipe.model, recipe.quantization, recipe.train, recipe.method)
    rows = data_stage.load_splits(recipe.data, recipe.prompt)["train"]
    ds, _ = data_stage.build_examples(rows, loaded.tokenizer, recipe.data, recipe.prompt, recipe.train,
                                      loaded.is_encoder_decoder)
    model_stage.attach_method(loaded, recipe)
    return loaded, ds


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_t5"])
def test_4bit_training_moves_only_lora_weights_and_loss_falls(model_fixture, request, tmp_path, tiny_data):
    import bitsandbytes as bnb

    recipe = make_recipe(tmp_path, request.getfixturevalue(model_fixture), tiny_data)
    loaded, ds = train_directly(recipe)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    assert loaded.compute_dtype == torch.float32 and loaded.device == "cpu"
    before = snapshot(loaded.model)
    result = train(loaded, ds, None, recipe.train, RunDir(recipe.run_dir))
    after = snapshot(loaded.model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    lora = {n for n, p in loaded.model.named_parameters() if "lora_" in n}
    assert lora and moved == lora  # every adapter weight trained, no base weight touched
    # fp32 adapters, as PEFT makes them and the planner counts them (TRL would cast a 4-bit model's to bf16)
    assert {p.dtype for n, p in loaded.model.named_parameters() if n in lora} == {torch.float32}
    assert falls(losses(recipe.run_dir)), losses(recipe.run_dir)
    assert result.steps == 12
    assert (result.saved_dir / "adapter_config.json").is_file()
    assert (result.saved_dir / "adapter_model.safetensors").is_file()


def test_encoder_never_sees_the_target(tmp_path, tiny_t5, tiny_data):
    recipe = make_recipe(tmp_path, tiny_t5, tiny_data, overrides=["train.max_steps=3"])
    loaded, ds = train_directly(recipe)
    seen = []
    encoder = loaded.model.get_base_model().get_encoder()
    encoder.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone()),
                                      with_kwargs=True)
    train(loaded, ds, None, recipe.train, RunDir(recipe.run_dir))
    assert seen
    for batch in seen:
        for ids in batch:
            text = loaded.tokenizer.decode(ids, skip_special_tokens=True)
            assert "Summarize:" in text and "brings" not in text  # every target says "X brings the ..."


def test_run_writes_the_run_directory(tmp_path, tiny_llama, tiny_data):
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data)
    seen = []
    result = run(recipe, notify=seen.append)
    d = result.run_dir
    assert load_recipe(d / "recipe.toml") == recipe  # fully resolved, reads back identically
    env = json.loads((d / "env.json").read_text())
    assert env["device"] == "cpu" and env["packages"]["peft"]
    rows = RunDir(d).metrics_rows()
    assert all("step" in r for r in rows) and [r["step"] for r in rows if "loss" in r][:3] == [1, 2, 3]
    kinds = {type(e) for e in seen}
    assert {events.RecipeResolved, events.SetUp, events.StepLogged, events.Trained} <= kinds
    logged = [e.step for e in seen if isinstance(e, events.StepLogged)]
    assert logged == [r["step"] for r in rows if "loss" in r]  # one event per logged step, as metrics.jsonl
    assert result.trainable_params < result.total_params


def test_existing_run_directory_is_refused(tmp_path, tiny_llama, tiny_data):
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data)
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="--resume"):
        run(recipe)
    assert (recipe.run_dir / "mine.txt").read_text() == "keep me"


def test_failed_run_leaves_nothing_behind(tmp_path, tiny_llama, tiny_data):
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=["data.target_column=abstract"])
    with pytest.raises(UserError, match="'abstract'"):
        run(recipe)
    assert not recipe.run_dir.exists()  # a fixed recipe can run under the same name


def test_output_dir_that_is_a_file_is_refused_before_loading(tmp_path, tiny_data):
    (tmp_path / "runs").write_text("my notes")
    recipe = make_recipe(tmp_path, tmp_path / "never-loaded", tiny_data)
    with pytest.raises(UserError, match=r"output.dir = .*runs is a file, not a folder"):
        run(recipe)
    assert (tmp_path / "runs").read_text() == "my notes"


@pytest.mark.parametrize("remove, expected", [
    ("model.safetensors", "cannot load its weights"),
    ("tokenizer.json", "cannot load its tokenizer (none of tokenizer.json"),
])
def test_model_folder_missing_weights_or_tokenizer_is_named(tmp_path, tiny_llama, tiny_data, remove, expected):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    for name in ([remove, "tokenizer_config.json"] if remove == "tokenizer.json" else [remove]):
        (folder / name).unlink()
    recipe = make_recipe(tmp_path, folder, tiny_data)
    with pytest.raises(UserError) as e:
        run(recipe)
    assert f"model.name = '{folder}'" in str(e.value) and expected in str(e.value)
    assert not recipe.run_dir.exists()


def test_chat_template_the_tokenizer_lacks_is_refused_before_the_weights_load(tmp_path, tiny_llama, tiny_data,
                                                                              monkeypatch):
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=["prompt.chat_template=true"])
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded before the tokenizer was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(UserError, match="prompt.chat_template = true, but the tokenizer of .* has no chat template"):
        model_stage.load_model(recipe.model, recipe.quantization, recipe.train, recipe.method, recipe.prompt)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_compute_dtype_refused_on_cpu_before_loading(tmp_path, tiny_data, dtype):
    recipe = make_recipe(tmp_path, tmp_path / "never-loaded", tiny_data,
                         overrides=[f"quantization.compute_dtype={dtype}"])
    with pytest.raises(UserError, match=f"compute_dtype = '{dtype}' needs a CUDA GPU"):
        run(recipe)


def test_eval_length_that_leaves_no_room_for_the_prompt_is_refused_before_training(tmp_path, tiny_llama, tiny_data):
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=["eval.enabled=true", "train.max_length=64",
                                                                      "eval.max_new_tokens=64"])
    with pytest.raises(UserError, match="eval.max_new_tokens = 64 leaves no room for the prompt"):
        run(recipe)
    assert not recipe.run_dir.exists()


def test_cuda_only_optimizer_refused_on_cpu_before_loading(tmp_path, tiny_data):
    recipe = make_recipe(tmp_path, tmp_path / "never-loaded", tiny_data, overrides=["train.optimizer=paged_adamw_8bit"])
    with pytest.raises(UserError, match="train.optimizer"):
        run(recipe)


def test_resume_continues_from_the_last_checkpoint(tmp_path, tiny_llama, tiny_data):
    first = make_recipe(tmp_path, tiny_llama, tiny_data)
    run(first)
    longer = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=["train.max_steps=18"])
    result = run(longer, resume=True)
    steps = [step for step, _ in RunDir(result.run_dir).losses()]
    assert steps == list(range(1, 19))  # 1-12, then 13-18 from checkpoint-12: no step repeated
    assert result.train.steps == 18


def test_resume_refuses_a_changed_model_or_data(tmp_path, tiny_llama, tiny_data):
    run(make_recipe(tmp_path, tiny_llama, tiny_data))
    changed = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=["lora.r=4"])
    with pytest.raises(UserError, match=r"differs from the run in .* \(lora.r: 8 → 4\)"):
        run(changed, resume=True)


def test_resume_without_a_run_is_refused(tmp_path, tiny_llama, tiny_data):
    with pytest.raises(UserError, match="no run"):
        run(make_recipe(tmp_path, tiny_llama, tiny_data), resume=True)


def test_cli_run_end_to_end(tmp_path, tiny_llama, tiny_data, capsys):
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="cli"))
    assert main(["run", str(path), "--set", "train.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "trained weights saved to" in out and "trainable" in out
    assert main(["run", str(path)]) == 2  # the run directory now exists
    assert "already exists" in capsys.readouterr().err


def test_cli_recipe_error_exits_2_without_traceback(tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_text('name = "x"\n[model]\nname = "m"\n[lora]\nrank = 8\n')
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "lora.rank" in err and "Traceback" not in err


def test_cli_error_keeps_its_section_names(tmp_path, capsys):
    """A message naming [method] must reach the screen whole: rich would read it as markup and drop it."""
    path = tmp_path / "r.toml"
    path.write_text('name = "x"\n[model]\nname = "m"\n[quantization]\nload_in_4bit = false\n')
    assert main(["run", str(path)]) == 2
    assert 'for LoRA on a 16-bit base set [method] kind = "lora"' in capsys.readouterr().err


def test_cli_unknown_model_is_a_clean_error(tmp_path, tiny_data, capsys):
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tmp_path / "no-such-model", tiny_data, tmp_path / "runs"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.name" in err and "Traceback" not in err


def test_lora_on_fused_experts_names_the_dropout_and_trains_without_it():
    """transformers 5 fuses Mixtral's experts into 3-D parameters; PEFT wraps them only without LoRA dropout."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from qlora_lite.recipe import LoraRecipe, TrainRecipe

    config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, num_local_experts=4, num_experts_per_tok=2)

    def attach(dropout):
        loaded = model_stage.LoadedModel(AutoModelForCausalLM.from_config(config), None, False, "cpu",
                                         torch.float32, "tiny-mixtral")
        return model_stage.attach_lora(loaded, LoraRecipe(dropout=dropout), TrainRecipe(gradient_checkpointing=False))

    with pytest.raises(UserError, match=r"^lora\.dropout: .*Set lora\.dropout = 0"):
        attach(0.05)
    model = attach(0.0)
    assert any("experts" in name and p.requires_grad for name, p in model.named_parameters())


def test_resume_with_more_steps_follows_the_new_schedule_from_the_first_resumed_step(tmp_path, tiny_llama, tiny_data):
    """A decaying schedule ends at 0 after max_steps: the optimizer's saved lr is 0. Resumed with more steps, the
    schedule spans the new total, and the first resumed step trains at its rate on it (it used to train at 0)."""
    linear = ["train.lr_scheduler=linear", "train.max_steps=6"]
    run(make_recipe(tmp_path, tiny_llama, tiny_data, overrides=linear))
    adapter = tmp_path / "runs" / "t" / "adapter" / "adapter_model.safetensors"
    before = adapter.read_bytes()
    longer = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=[*linear[:1], "train.max_steps=7"])
    result = run(longer, resume=True)
    rates = {r["step"]: r["learning_rate"] for r in RunDir(result.run_dir).metrics_rows() if "learning_rate" in r}
    assert rates[6] == pytest.approx(5e-3 * (1 - 5 / 6))  # the rate each step trained at, on a 6-step schedule
    assert rates[7] == pytest.approx(5e-3 * (1 - 6 / 7))  # on the 7-step schedule
    assert result.train.steps == 7 and adapter.read_bytes() != before  # step 7 moved the weights


def test_resume_of_a_run_that_trained_all_its_steps_says_so(tmp_path, tiny_llama, tiny_data):
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=["train.max_steps=6"])  # checkpoint-6 at the end
    run(recipe)
    with pytest.raises(UserError, match=r"already trained 6 steps .*raise train\.max_steps"):
        run(recipe, resume=True)  # the Trainer would have trained a 7th step


def test_a_micro_batch_larger_than_the_data_is_refused(tmp_path, tiny_llama, tiny_data):
    """It trained on one batch of every row while the setup table and the memory plan used micro_batch_size."""
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=["train.micro_batch_size=65"])  # 64 rows
    with pytest.raises(UserError, match=r"train.micro_batch_size = 65 is more than the 64 usable rows of data.train"):
        run(recipe)
    assert not recipe.run_dir.exists()
    assert run(make_recipe(tmp_path, tiny_llama, tiny_data, name="all", overrides=[
        "train.micro_batch_size=64", "train.max_steps=1"])).train.steps == 1


def test_resume_with_a_new_learning_rate_trains_at_it_and_exports_again(tmp_path, tiny_llama, tiny_data):
    """The checkpoint's scheduler kept the old peak: the resumed steps followed 5e-3 while result.json, recipe.toml
    and the report said 1e-3. And the run's merged/ is exported again, not refused as someone's folder."""
    linear = ["train.lr_scheduler=linear", "train.max_steps=6", "export.merge=true", "export.dtype=fp32"]
    run(make_recipe(tmp_path, tiny_llama, tiny_data, overrides=linear))
    merged = tmp_path / "runs" / "t" / "merged" / "model.safetensors"
    six_steps = merged.read_bytes()
    lower = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=[*linear[:1], *linear[2:], "train.max_steps=8",
                                                                    "train.learning_rate=1e-3"])
    result = run(lower, resume=True)  # its merged/ is replaced by the 8-step export (the merge refused the folder)
    assert result.merged.check.passed and merged.read_bytes() != six_steps
    rates = {r["step"]: r["learning_rate"] for r in RunDir(result.run_dir).metrics_rows() if "learning_rate" in r}
    assert rates[6] == pytest.approx(5e-3 * (1 - 5 / 6))
    assert rates[7] == pytest.approx(1e-3 * (1 - 6 / 8)) and rates[8] == pytest.approx(1e-3 * (1 - 7 / 8))
    assert json.loads((result.run_dir / "result.json").read_text())["learning_rate"] == 1e-3


@pytest.mark.parametrize("damage", ["optimizer.pt", "scheduler.pt", "adapter_model.safetensors", "trainer_state.json"])
def test_resume_names_a_damaged_last_checkpoint_and_the_one_before_it(tmp_path, tiny_llama, tiny_data, damage):
    """A save cut short (a crash, a full disk) left a checkpoint the Trainer failed on with a traceback."""
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data)  # checkpoints 6 and 12
    run(recipe)
    last = recipe.run_dir / "checkpoints" / "checkpoint-12"
    (last / damage).write_bytes(b"junk\n")
    longer = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=["train.max_steps=14"])
    with pytest.raises(UserError, match=rf"checkpoint-12 cannot be loaded \({damage}: .*remove it to continue from "
                                        rf"checkpoint-6: rm -r {last}$") as e:
        run(longer, resume=True)
    if damage.endswith(".pt"):  # torch's own errors read "KeyError: 174812789" or suggested weights_only=False
        assert f"({damage}: ValueError: not a PyTorch file that loads)" in str(e.value)
    import shutil

    shutil.rmtree(last)
    assert run(longer, resume=True).train.steps == 14


def test_a_second_run_of_a_model_says_how_long_it_will_take_and_reuses_the_base_evaluation(tmp_path, tiny_llama,
                                                                                           tiny_data, monkeypatch):
    """The first run measures its speed; the next run of the same model and method is told, in its setup, how
    long training and evaluation will take, and takes the base model's outputs from the cache."""
    monkeypatch.setenv("QLORA_LITE_CACHE", str(tmp_path / "cache"))  # nothing measured by the tests before
    first = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=[
        "eval.enabled=true", "eval.max_samples=4", "eval.max_new_tokens=8", "train.max_steps=4"])
    setups = []
    keep = lambda e: setups.append(e) if isinstance(e, events.SetUp) else None  # noqa: E731
    before = run(first, notify=keep)
    after = run(dataclasses.replace(first, name="second"), notify=keep)
    assert setups[0].expected_train_s is None and setups[0].expected_eval_s is None  # nothing measured yet
    assert 0 < setups[1].expected_train_s < 600 and 0 < setups[1].expected_eval_s < 600
    assert not before.evaluation.base_from_cache and after.evaluation.base_from_cache
    assert after.evaluation.base == before.evaluation.base


def test_group_by_length_batches_sequences_of_similar_length(tmp_path, tiny_llama):
    """Random batches are padded to their longest sequence; train.group_by_length batches similar lengths."""
    from qlora_lite.train import build_trainer

    data = tmp_path / "data"
    data.mkdir()
    rows = make_rows(64, seed=1)
    for i, row in enumerate(rows):  # dialogues of 1 to 4 repeats: lengths from ~40 to ~150 tokens
        row["dialogue"] = "\n".join([row["dialogue"]] * (1 + i % 4))
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:4])
    write_jsonl(data / "test.jsonl", rows[:4])
    padding = {}
    for grouped in (False, True):
        recipe = make_recipe(tmp_path, tiny_llama, data, name=f"g{grouped}", overrides=[
            f"train.group_by_length={str(grouped).lower()}", "train.micro_batch_size=4", "train.max_length=256"])
        loaded, ds = train_directly(recipe)
        trainer = build_trainer(loaded, ds, None, recipe.train, RunDir(recipe.run_dir), [])
        batches = list(trainer.get_train_dataloader())
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        assert real == sum(map(len, ds["input_ids"]))  # every example once
        padding[grouped] = sum(b["attention_mask"].numel() for b in batches) / real - 1
    assert padding[True] < padding[False] / 3 and padding[False] > 0.2, padding  # measured: 0.08 and 0.34
