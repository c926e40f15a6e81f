"""Budgets in a run: refusal before any weights load, auto-fit, a budget crossed mid-run, the report files,
and the memory callback on a machine without NVML or a GPU."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from qlora_lite import events, memory, monitor
from qlora_lite.memory import GIB
from qlora_lite import model as model_stage
from qlora_lite import train as train_stage
from qlora_lite.cli import main
from qlora_lite.errors import BudgetError
from qlora_lite.run import run
from qlora_lite.rundir import RunDir
from qlora_lite.train import train
from test_train import make_recipe, train_directly


def test_impossible_budget_is_refused_before_loading_weights(tmp_path, tiny_llama, tiny_data, monkeypatch):
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=["budget.gpu_memory_gib=0.5"])
    monkeypatch.setattr(model_stage, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(BudgetError) as e:
        run(recipe)
    message = str(e.value)
    assert "exceeds the budget of 0.5 GiB" in message and "predicted peak" in message
    assert not recipe.run_dir.exists()


def test_cli_refusal_exits_3(tmp_path, tiny_llama, tiny_data, capsys):
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data)
    path = tmp_path / "t.toml"
    assert main(["run", str(path), "--set", "budget.gpu_memory_gib=0.5"]) == 3
    err = " ".join(capsys.readouterr().err.split())  # rich folds long lines
    assert "exceeds the budget of 0.5 GiB" in err and "Traceback" not in err
    assert not recipe.run_dir.exists()


def test_plan_command_json(tmp_path, tiny_llama, tiny_data, capsys):
    make_recipe(tmp_path, tiny_llama, tiny_data)
    assert main(["plan", str(tmp_path / "t.toml"), "--json", "--set", "budget.gpu=rtx-3060-12gb"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["budget_gib"] == 12 and plan["fits"] is True
    assert abs(sum(plan["components"].values()) - plan["peak_gib"]) < 1e-6


def test_sequences_longer_than_the_model_positions_are_refused_before_loading(tmp_path, tiny_llama, tiny_t5,
                                                                            tiny_gpt2, tiny_data, capsys, monkeypatch):
    make_recipe(tmp_path, tiny_llama, tiny_data)  # its config: max_position_embeddings = 512
    path = str(tmp_path / "t.toml")
    monkeypatch.setattr(model_stage, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    assert main(["run", path, "--set", "train.max_length=600"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "train.max_length = 600 is longer than the model's context" in err
    assert "max_position_embeddings = 512; set train.max_length to 512 or less" in err
    assert main(["plan", path, "--set", "train.max_length=512"]) == 0
    prompt_tuning = ["--set", "method.kind=prompt_tuning", "--set", "method.num_virtual_tokens=20"]
    assert main(["plan", path, "--set", "train.max_length=500", *prompt_tuning]) == 2
    assert "method.num_virtual_tokens = 520" in capsys.readouterr().err
    make_recipe(tmp_path, tiny_gpt2, tiny_data, name="gpt2")  # the limit under the name config.json gives it
    assert main(["plan", str(tmp_path / "gpt2.toml"), "--set", "train.max_length=257"]) == 2
    assert "its config sets n_positions = 256" in " ".join(capsys.readouterr().err.split())
    make_recipe(tmp_path, tiny_t5, tiny_data, name="t5")  # relative positions: no limit to check
    assert main(["plan", str(tmp_path / "t5.toml"), "--set", "train.max_length=4096"]) == 0


def test_encoder_decoder_lengths_and_generation_stay_within_learned_positions(tmp_path, tiny_data, capsys):
    """BART's learned positions: a longer source or target, or generating past them in evaluation (an IndexError
    after training), is refused by plan from config.json alone."""
    from transformers import BartConfig

    folder = tmp_path / "bart"
    BartConfig(vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
               max_position_embeddings=64).save_pretrained(folder)
    make_recipe(tmp_path, folder, tiny_data)
    plan = ["plan", str(tmp_path / "t.toml"), "--set", "eval.enabled=true"]
    lengths = ["--set", "train.max_source_length=64", "--set", "train.max_target_length=64"]
    assert main([*plan, *lengths, "--set", "eval.max_new_tokens=63"]) == 0
    capsys.readouterr()
    assert main([*plan, *lengths, "--set", "eval.max_new_tokens=64"]) == 2
    assert "set eval.max_new_tokens to 63 or less" in capsys.readouterr().err
    assert main([*plan, "--set", "train.max_source_length=64", "--set", "train.max_target_length=65"]) == 2
    assert "set train.max_target_length to 64 or less" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("targets, said", [
    ('["q_proj", "v_prj"]', "'v_prj' matches no layer of this model (did you mean 'v_proj'?)"),  # PEFT took it
    ('["self_attn"]', "'self_attn' is a LlamaAttention, not a layer LoRA adapts"),  # PEFT printed the block
])
def test_lora_targets_each_name_a_layer(tmp_path, tiny_llama, tiny_data, capsys, monkeypatch, targets, said):
    make_recipe(tmp_path, tiny_llama, tiny_data)
    monkeypatch.setenv("QLORA_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_stage, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    assert main(["run", str(tmp_path / "t.toml"), "--set", f"lora.target_modules={targets}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert said in err and "its linear and embedding layers: down_proj, embed_tokens, gate_proj, k_proj" in err


@pytest.mark.parametrize("target, said", [("gate_up_proj", "names"), ("experts", "holds")])
def test_fused_expert_weights_are_reached_only_through_all_linear(tmp_path, tiny_data, capsys, target, said):
    """Mixtral's experts are 3-D tensors, not layers: naming them was refused as a typo, or printed the block."""
    from transformers import MixtralConfig

    folder = tmp_path / "mixtral"
    MixtralConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, num_local_experts=4).save_pretrained(folder)
    make_recipe(tmp_path, folder, tiny_data)
    assert main(["plan", str(tmp_path / "t.toml"), "--set", f'lora.target_modules=["q_proj", "{target}"]']) == 2
    assert (f"'{target}' {said} fused expert weights (3-D tensors), not a layer: PEFT adapts them only under "
            f'target_modules = "all-linear"') in " ".join(capsys.readouterr().err.split())


def test_auto_fit_shrinks_the_micro_batch_and_keeps_the_effective_batch(tmp_path, tiny_llama, tiny_data):
    big = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=["train.max_steps=2"])
    config = memory.load_model_config(big.model)
    small = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=[
        "train.max_steps=2", "train.micro_batch_size=1", "train.gradient_accumulation_steps=8"])
    peak_big, peak_small = (memory.plan_memory(r, config).peak_gib for r in (big, small))
    assert peak_small < peak_big
    budget = (peak_big + peak_small) / 2
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=[
        "train.max_steps=2", f"budget.gpu_memory_gib={budget}", "budget.auto_fit=true"])
    seen = []
    result = run(recipe, notify=seen.append)
    (fitted,) = [e for e in seen if isinstance(e, events.AutoFitted)]
    assert "micro_batch_size 8 →" in fitted.change
    saved = (result.run_dir / "recipe.toml").read_text()
    train_saved = [line for line in saved.splitlines() if line.startswith(("micro_batch", "gradient_acc"))]
    micro, accum = (int(line.split("=")[1]) for line in train_saved)
    assert micro < 8 and micro * accum == 8
    assert result.plan.fits


def test_budget_crossed_mid_run_stops_with_adapter_and_checkpoint(tmp_path, tiny_llama, tiny_data, monkeypatch):
    """A fake measurement says the process used 3 GiB from step 4 on: the run stops there, resumable."""
    calls = []

    def fake_sample(probe):
        calls.append(1)
        return {"process_used_gib": 3.0 if len(calls) > 4 else 0.9}

    monkeypatch.setattr(monitor, "sample", fake_sample)
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=["budget.gpu_memory_gib=2.0"])
    with pytest.raises(BudgetError) as e:
        run(recipe)
    assert "budget crossed at step 4" in str(e.value) and "--resume" in str(e.value)
    d = recipe.run_dir
    assert (d / "adapter" / "adapter_model.safetensors").is_file()
    assert RunDir(d).last_checkpoint().name == "checkpoint-4"
    report = json.loads((d / "memory_report.json").read_text())
    assert report["measured"]["process_peak_gib"] == 3.0 and report["budget_gib"] == 2.0
    assert report["headroom_gib"] == pytest.approx(-1.0)
    steps = [step for step, _ in RunDir(d).losses()]
    assert steps[-1] == 4


class OutOfMemoryAt(TrainerCallback):
    """Raises what CUDA raises when a step's activations do not fit, at the start of step `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def out_of_memory_at(monkeypatch, step):
    real = train_stage.build_trainer

    def build_trainer(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(OutOfMemoryAt(step))
        return trainer

    monkeypatch.setattr(train_stage, "build_trainer", build_trainer)


def test_out_of_memory_mid_run_saves_a_checkpoint_that_resumes_with_a_smaller_micro_batch(
    tmp_path, tiny_llama, tiny_data, monkeypatch
):
    """Steps 1-5 finish, step 6 runs out of memory (save_steps is 6: no checkpoint of the trainer's own yet)."""
    out_of_memory_at(monkeypatch, 6)
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data)
    with pytest.raises(BudgetError) as e:
        run(recipe)
    message = str(e.value)
    assert "out of memory during step 6" in message and "checkpoint-5" in message and "--resume" in message
    assert (recipe.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (recipe.run_dir / "memory_report.json").is_file()
    assert RunDir(recipe.run_dir).last_checkpoint().name == "checkpoint-5"

    monkeypatch.undo()  # the smaller micro-batch fits: same effective batch, continue from checkpoint-5
    smaller = make_recipe(tmp_path, tiny_llama, tiny_data,
                          overrides=["train.micro_batch_size=4", "train.gradient_accumulation_steps=2"])
    result = run(smaller, resume=True)
    steps = [step for step, _ in RunDir(result.run_dir).losses()]
    assert steps == list(range(1, 13)) and result.train.steps == 12  # no step lost, none repeated


def test_out_of_memory_in_the_first_step_says_there_is_nothing_to_resume(
    tmp_path, tiny_llama, tiny_data, monkeypatch
):
    out_of_memory_at(monkeypatch, 1)
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data)
    with pytest.raises(BudgetError, match="nothing to resume") as e:
        run(recipe)
    assert "--resume" not in str(e.value) and RunDir(recipe.run_dir).last_checkpoint() is None


def test_warn_keeps_training(tmp_path, tiny_llama, tiny_data):
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=["train.max_steps=4"])
    loaded, ds = train_directly(recipe)
    seen = []
    watcher = monitor.MemoryMonitor(recipe.run_dir / "memory.jsonl", monitor.Probe("cpu"), 1.0, "warn",
                                    notify=seen.append, measure=lambda p: {"process_used_gib": 5.0})
    result = train(loaded, ds, None, recipe.train, RunDir(recipe.run_dir), callbacks=[watcher])
    crossed = [e for e in seen if isinstance(e, events.BudgetCrossed)]
    assert result.steps == 4 and crossed == [events.BudgetCrossed(1, 5.0, 1.0, stopping=False)]  # warned once


def test_monitor_without_nvml_or_gpu_records_rss_and_says_what_is_missing(tmp_path, tiny_llama, tiny_data,
                                                                          monkeypatch):
    """A GPU machine without the NVML library (faked: a CUDA machine has it), then a run on the CPU."""
    import pynvml

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    probe = monitor.open_probe("cuda")
    assert probe.nvml_handle is None
    assert probe.missing == ["device memory used, utilization, temperature, power: NVML unavailable "
                             "(NVMLError_LibraryNotFound); torch.cuda counters recorded"]
    cpu = monitor.open_probe("cpu")
    assert cpu.missing and "CPU" in cpu.missing[0]
    row = monitor.sample(cpu)
    assert row["rss_gib"] > 0 and "cuda_allocated_gib" not in row

    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=["train.max_steps=3"])
    result = run(recipe)
    d = result.run_dir
    rows = RunDir(d).memory_samples()
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(r["rss_gib"] > 0 for r in rows)
    report = json.loads((d / "memory_report.json").read_text())
    assert report["peak_source"] == "predicted" and report["missing"] == cpu.missing
    assert report["predicted"]["peak_gib"] == pytest.approx(result.plan.peak_gib)
    assert (d / "memory_timeline.png").stat().st_size > 1000
    md = (d / "memory_report.md").read_text()
    assert "not measured" in md and "memory_timeline.png" in md


def test_monitor_on_a_gpu_reads_each_figure_and_survives_one_nvml_refuses(monkeypatch):
    """A GPU machine, faked: NVML answers memory, utilization, temperature and power but refuses the process
    list (as in many containers and MIG slices); torch.cuda gives its counters."""
    import pynvml

    opened = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: opened.append(index) or "handle")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: SimpleNamespace(used=7 * GIB, total=24 * GIB))

    def refused(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", refused)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda h: SimpleNamespace(gpu=97, memory=40))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature", lambda h, sensor: 71)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", lambda h: 312_500)  # milliwatts
    counters = {"memory_allocated": 3, "memory_reserved": 4, "max_memory_allocated": 5, "max_memory_reserved": 6}
    for name, gib in counters.items():
        monkeypatch.setattr(torch.cuda, name, lambda gib=gib: gib * GIB)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # torch's device 0 is NVML's device 1

    probe = monitor.open_probe("cuda")
    assert probe.missing == [] and opened == [1]
    row = monitor.sample(probe)
    assert (row["device_used_gib"], row["device_total_gib"], row["gpu_util_pct"]) == (7, 24, 97)
    assert (row["temperature_c"], row["power_w"]) == (71, 312.5)
    assert (row["cuda_allocated_gib"], row["cuda_peak_reserved_gib"]) == (3, 6) and "process_used_gib" not in row
    assert monitor.footprint_gib(row) == 6 + memory.CUDA_CONTEXT_GIB  # no per-process figure: reserve + context

    mine = SimpleNamespace(pid=os.getpid(), usedGpuMemory=int(6.5 * GIB))
    other = SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=GIB)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", lambda h: [other, mine])
    row = monitor.sample(probe)
    assert row["process_used_gib"] == 6.5 and monitor.footprint_gib(row) == 6.5


def test_report_without_nvml_counts_the_footprint_the_budget_stopped_on():
    """No NVML figure (a container): the budget stops on the allocator's peak reserve plus the CUDA context, and
    the report must say the same, not show the plan's headroom for a run the budget stopped."""
    samples = [{"step": 0, "cuda_peak_reserved_gib": 1.0}, {"step": 2, "cuda_peak_reserved_gib": 3.0}]
    assert monitor.footprint_gib(samples[-1]) == 3.0 + memory.CUDA_CONTEXT_GIB > 3.2  # what stopped the run
    report = monitor.memory_report(None, samples, budget_gib=3.2, missing=[])
    assert report["peak_source"] == "measured" and report["peak_gib"] == 3.0 + memory.CUDA_CONTEXT_GIB
    assert report["headroom_gib"] == pytest.approx(3.2 - 3.0 - memory.CUDA_CONTEXT_GIB)
