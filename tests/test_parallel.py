"""More than one GPU (issue 16). DDP: `run --nproc 2` on the CPU (two processes, gloo) trains what one process with
twice the gradient accumulation trains, with one set of logs and one voice; torchrun started by hand does too.
FSDP: planned per GPU (checked against a published 70B measurement), refused where it cannot shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import recipe_text

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")

STEPS = ["--set", "train.max_steps=4", "--set", "train.save_steps=2", "--set", "train.micro_batch_size=4",
         "--set", "train.gradient_checkpointing=true", "--set", "export.merge=false"]


def qlora_lite(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process with one thread per process (the same arithmetic in every run compared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", *(launcher or []), "qlora_lite", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def metrics_steps(run_dir) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r and r.get("event") != "end"]


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def two_runs(tiny_llama, tiny_data, tmp_path_factory):
    """The same recipe on two processes (micro-batch 4 each) and on one (micro-batch 4, accumulation 2)."""
    tmp = tmp_path_factory.mktemp("ddp")
    recipe = tmp / "r.toml"
    recipe.write_text(recipe_text(tiny_llama, tiny_data, tmp / "runs", name="ddp"))
    two = qlora_lite("run", str(recipe), "--nproc", "2", *STEPS)
    one = qlora_lite("run", str(recipe), *STEPS, "--set", "name=one", "--set", "train.gradient_accumulation_steps=2")
    return recipe, tmp / "runs", two, one


def test_two_processes_train_as_one_process_with_twice_the_accumulation(two_runs):
    recipe, runs, two, one = two_runs
    assert two.returncode == 0, two.stderr[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    # one voice: the setup and the training table printed once, the global batch in both
    assert two.stdout.count("effective batch 8 (4 per process x 2 processes)") == 1, two.stdout
    assert two.stdout.count("2 x cpu (DDP, gloo), 1 CPU thread each") == 1
    assert two.stdout.count("first loss") == 1 and "Traceback" not in two.stderr
    assert "effective batch 8 " in one.stdout
    # one set of logs: a row per logged step, written by rank 0 alone
    assert metrics_steps(runs / "ddp") == [1, 2, 3, 4]
    memory = [json.loads(line) for line in (runs / "ddp" / "memory.jsonl").read_text().splitlines()]
    assert [(m["step"], m["rank"]) for m in memory] == [(s, r) for s in range(5) for r in (0, 1)]  # each rank's own
    report = json.loads((runs / "ddp" / "memory_report.json").read_text())
    assert set(report["per_rank_peak_gib"]) == {"0", "1"}
    result = json.loads((runs / "ddp" / "result.json").read_text())
    assert result["processes"] == 2 and result["effective_batch"] == 8
    assert result["replicas"] == {"world_size": 2, "identical": True}
    assert result["last_loss"] < result["first_loss"]
    single = json.loads((runs / "one" / "result.json").read_text())
    assert single["effective_batch"] == 8 and single["processes"] == 1
    # the same training: each rank's batches are the single process's accumulated micro-batches
    a, b = adapter(runs / "ddp"), adapter(runs / "one")
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    assert moved > 1e-3  # LoRA B starts at zero: the comparison is of trained weights
    rows_two = [json.loads(x) for x in (runs / "ddp" / "metrics.jsonl").read_text().splitlines()]
    rows_one = [json.loads(x) for x in (runs / "one" / "metrics.jsonl").read_text().splitlines()]
    losses = lambda rows: [r["loss"] for r in rows if "loss" in r and r.get("event") != "end"]  # noqa: E731
    assert losses(rows_two) == pytest.approx(losses(rows_one), abs=1e-5)
    # a checkpoint every rank wrote its part of
    ckpt = runs / "ddp" / "checkpoints" / "checkpoint-4"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()


def test_torchrun_started_by_hand_resumes_the_run(two_runs):
    recipe, runs, two, _ = two_runs
    assert two.returncode == 0
    again = qlora_lite("run", str(recipe), "--resume", *STEPS, "--set", "train.max_steps=6",
                       launcher=["torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert metrics_steps(runs / "ddp") == [1, 2, 3, 4, 5, 6]
    assert again.stdout.count("first loss") == 1


def test_a_user_error_on_every_rank_is_said_once(tiny_llama, tiny_data, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="bad"))
    result = qlora_lite("run", str(recipe), "--nproc", "2", *STEPS, "--set", "data.input_column=nope")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error:") == 1 and "nope" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert not (tmp_path / "runs" / "bad").exists()


def test_nproc_beyond_the_machine_is_refused_before_anything_starts(tiny_llama, tiny_data, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="big"))
    cores = len(os.sched_getaffinity(0))
    result = qlora_lite("run", str(recipe), "--nproc", str(cores + 1))
    assert result.returncode == 2
    assert f"--nproc {cores + 1} on a CPU with {cores} cores" in result.stderr
    assert not (tmp_path / "runs").exists()
    result = qlora_lite("run", str(recipe), "--nproc", "0")
    assert result.returncode == 2 and "--nproc 0" in result.stderr


def test_plan_per_gpu_adds_the_ddp_buckets(tiny_llama, tiny_data, tmp_path, capsys):
    from qlora_lite import memory
    from qlora_lite.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs"))
    recipe = load_recipe(path)
    arch = memory.recipe_arch(recipe)
    one, two = memory.plan_from_arch(recipe, arch), memory.plan_from_arch(recipe, arch, world=2)
    assert "ddp_buckets" not in one.components
    assert two.components["ddp_buckets"] == pytest.approx(4 * arch.params.trainable / 2**30)
    assert two.train_peak_gib == pytest.approx(one.train_peak_gib + two.components["ddp_buckets"] * 1.0, rel=1e-9)
    assert two.world_size == 2 and any("DDP" in n for n in two.notes)
    from qlora_lite.cli import main

    assert main(["plan", str(path), "--nproc", "2", "--method", "qlora,lora"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "per GPU of 2" in said and said.count("ddp buckets") == 1


def test_ctrl_c_stops_every_process_at_one_step_with_a_checkpoint(tiny_llama, tiny_data, tmp_path):
    """A terminal's Ctrl-C reaches `run --nproc 2` and torchrun, which hands it to each process: they agree on the
    step to stop after, save one checkpoint, and the run resumes from it."""
    import signal
    import time

    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="c"))
    run_dir = tmp_path / "runs" / "c"
    steps = [*STEPS, "--set", "train.max_steps=2000", "--set", "train.save_steps=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def as_a_terminal_starts_it():  # a foreground job: SIGINT handled by default, whatever this test process set
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())

    proc = subprocess.Popen([sys.executable, "-m", "qlora_lite", "run", str(recipe), "--nproc", "2", *steps],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # its own process group, as a terminal's foreground job
                            preexec_fn=as_a_terminal_starts_it)
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").is_file() and len(metrics_steps(run_dir)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, f"{err[-2000:]}\n--- stdout:\n{out[-2000:]}"
    assert err.count("interrupted") == 1 and "--resume" in err and "Traceback" not in err, err
    checkpoints = list((run_dir / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    stopped = int(checkpoints[0].name.split("-")[1])
    assert (checkpoints[0] / "rng_state_0.pth").is_file() and (checkpoints[0] / "rng_state_1.pth").is_file()
    assert metrics_steps(run_dir) == list(range(1, stopped + 1))
    assert f"stopped by Ctrl-C: {stopped} of 2000 steps" in out
    again = qlora_lite("run", str(recipe), "--nproc", "2", "--resume", *steps, "--set",
                       f"train.max_steps={stopped + 2}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert metrics_steps(run_dir) == list(range(1, stopped + 3))


OUT_OF_MEMORY_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":  # the second process of a torchrun: its step 3 runs out of memory
    import torch
    import transformers

    real = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step + 1 == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step
"""


def test_out_of_memory_on_one_rank_stops_every_rank_with_a_checkpoint_that_resumes(tiny_llama, tiny_data, tmp_path):
    """One GPU of two runs out of memory (a sitecustomize makes rank 1's step 3 raise what CUDA raises) while the
    other waits in the gradient exchange: that rank says so once, torchrun stops the other, and --resume goes on
    from the last checkpoint (save_steps 2)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(OUT_OF_MEMORY_ON_RANK_1)
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="oom"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])}
    oom = subprocess.run([sys.executable, "-m", "qlora_lite", "run", str(recipe), "--nproc", "2", *STEPS], env=env,
                         capture_output=True, text=True, timeout=900)
    assert oom.returncode == 3, oom.stderr[-3000:]
    assert oom.stderr.count("CUDA out of memory during step 3") == 1 and "Traceback" not in oom.stderr, oom.stderr
    assert "checkpoint-2" in oom.stderr and "--resume" in oom.stderr
    run_dir = tmp_path / "runs" / "oom"
    assert metrics_steps(run_dir) == [1, 2]
    again = qlora_lite("run", str(recipe), "--nproc", "2", "--resume", *STEPS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert metrics_steps(run_dir) == [1, 2, 3, 4]


def test_resume_on_another_number_of_processes_says_what_changes(two_runs):
    recipe, runs, _, one = two_runs
    assert one.returncode == 0
    again = qlora_lite("run", str(recipe), "--nproc", "2", "--resume", *STEPS, "--set", "name=one",
                       "--set", "train.gradient_accumulation_steps=2", "--set", "train.max_steps=6")
    assert again.returncode == 0, again.stderr[-3000:]
    said = " ".join(again.stdout.split())
    assert "resuming on 2 processes a run trained on 1" in said, said
    assert "effective batch is now 16 (--set train.gradient_accumulation_steps=1 keeps the one it had)" in said
    assert metrics_steps(runs / "one") == [1, 2, 3, 4, 5, 6]
    result = json.loads((runs / "one" / "result.json").read_text())
    assert result["processes"] == 2 and result["effective_batch"] == 16


@pytest.fixture(scope="module")
def llama70b_qlora_fsdp():
    """Llama-2-70B as PEFT's FSDP+QLoRA guide trained it on 2 GPUs: micro-batch 2 x 2048 packed tokens, LoRA r 8 on
    every linear layer, double quantization, reentrant checkpointing, bf16 (docs/source/accelerate/fsdp.md,
    peft 0.21.2: "the GPU memory usage is 35.6 GB/GPU" without CPU offloading)."""
    from transformers import LlamaConfig

    from qlora_lite.memory import analyze
    from qlora_lite.recipe import EvalRecipe, LoraRecipe, ModelRecipe, Recipe, TrainRecipe

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
    train = TrainRecipe(micro_batch_size=2, gradient_accumulation_steps=2, max_length=2048, packing=True,
                        strategy="fsdp")
    recipe = Recipe(name="t", model=ModelRecipe(name="x"), train=train, lora=LoraRecipe(r=8, alpha=16, dropout=0.1),
                    eval=EvalRecipe(enabled=False))
    return recipe, analyze(recipe, config)


def test_fsdp_plans_each_gpu_a_share_of_the_model_and_the_layers_it_gathers(llama70b_qlora_fsdp):
    import dataclasses

    from qlora_lite.memory import GIB, plan_from_arch

    recipe, arch = llama70b_qlora_fsdp
    ddp = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, strategy="ddp"))
    one = plan_from_arch(ddp, arch, world=1)
    two, four = plan_from_arch(recipe, arch, world=2), plan_from_arch(recipe, arch, world=4)
    packed = sum((n + 1) // 2 for n in arch.quantized_numels) / GIB
    constants = one.components["weights_4bit"] - packed  # quantization constants: whole on every GPU
    assert two.components["weights_4bit"] == pytest.approx(packed / 2 + constants)
    assert four.components["weights_4bit"] == pytest.approx(packed / 4 + constants)
    for key in ("weights_16bit", "trainable_weights", "gradients", "optimizer"):
        assert two.components[key] == pytest.approx(one.components[key] / 2)
    assert two.components["activations"] == one.components["activations"]  # each GPU runs its own micro-batch
    assert "ddp_buckets" not in two.components and two.components["fsdp_gathered"] > 0
    assert one.peak_gib > 48 > two.peak_gib > four.peak_gib  # one 48 GiB card cannot hold it; two 40 GiB cards can
    # PEFT's guide measured 35.6 GB per GPU for this run (two GPUs, no CPU offloading): the plan within 5%
    assert two.peak_gib == pytest.approx(35.6, rel=0.05)
    assert two.strategy == "fsdp" and two.world_size == 2 and any("FSDP (2 GPUs)" in n for n in two.notes)


def test_fsdp_is_refused_where_it_cannot_shard_and_in_one_process(tiny_llama, tiny_data, tmp_path):
    from qlora_lite.errors import UserError
    from qlora_lite.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="f"))
    with pytest.raises(UserError) as e:
        load_recipe(path, ["train.strategy=fsdp", "quantization.quant_storage=uint8", "method.kind=prompt_tuning"])
    assert 'not prompt_tuning; use strategy = "ddp"' in str(e.value)
    assert 'quant_storage = "uint8" with train.strategy = "fsdp"' in str(e.value)
    result = qlora_lite("plan", str(path), "--nproc", "2", "--set", "train.strategy=fsdp")
    assert result.returncode == 0 and "per GPU of 2 (FSDP)" in " ".join(result.stdout.split())
    result = qlora_lite("run", str(path), "--set", "train.strategy=fsdp")
    assert result.returncode == 2 and "shards the model across several processes: start them with" in result.stderr
    assert not (tmp_path / "runs" / "f").exists()


def _agree(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: rank 1 alone asks to stop after a step and alone fails a stage."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from transformers import TrainerControl

    from qlora_lite import dist, train
    from qlora_lite.errors import UserError

    dist.init("cpu")
    ctrl_c = train.StopOnCtrlC(lambda event: None)
    ctrl_c.requested = rank == 1  # Ctrl-C seen by rank 1 only
    control = TrainerControl()
    for callback in (ctrl_c, train.SyncStop(ctrl_c)):  # in the trainer's order: SyncStop last
        callback.on_step_end(None, None, control)
    said = {"stop": control.should_training_stop, "save": control.should_save, "ctrl_c": ctrl_c.requested}
    try:
        with dist.together():
            if rank == 1:
                raise UserError("data.train: a bad row")
    except UserError as e:
        said.update(error=str(e), code=e.exit_code, agreed=isinstance(e, dist.AgreedError))
    dist.finish()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(said, f)


def test_a_stop_or_an_error_on_one_rank_reaches_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_agree, args=(port, str(tmp_path / "said")), nprocs=2)
    said = [json.loads((tmp_path / f"said.{r}").read_text()) for r in (0, 1)]
    for rank in (0, 1):  # both stop after the same step with a checkpoint, and both know it was a Ctrl-C
        assert said[rank]["stop"] and said[rank]["save"] and said[rank]["ctrl_c"]
        assert said[rank]["code"] == 2
    assert said[0]["error"] == "rank 1: data.train: a bad row" and said[0]["agreed"]  # rank 0 prints it
    assert said[1]["error"] == "data.train: a bad row" and not said[1]["agreed"]  # rank 1's own, not printed twice


def test_fsdp_shards_the_4bit_model_and_trains_what_ddp_trains(two_runs):
    """FSDP2 on two CPU processes (experimental): each holds half of the parameter bytes, 4-bit weights included
    (packed in fp32); it trains as DDP does (losses equal to 1e-6: gradients bit for bit, see the note below) and saves
    a PEFT adapter; its sharded checkpoint resumes, and only under FSDP with as many processes."""
    recipe, runs, two, _ = two_runs
    assert two.returncode == 0
    fsdp = qlora_lite("run", str(recipe), "--nproc", "2", *STEPS, "--set", "name=fsdp",
                      "--set", "train.strategy=fsdp")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    said = " ".join(fsdp.stdout.split())
    assert "2 x cpu (FSDP, experimental, gloo)" in said and "evaluation, merge and export need the model whole" in said
    result = json.loads((runs / "fsdp" / "result.json").read_text())
    shards = result["fsdp"]
    assert len(shards["bytes_per_rank"]) == 2
    for mine in shards["bytes_per_rank"]:
        assert mine == pytest.approx(shards["bytes_whole"] / 2, rel=0.05)
    assert result["replicas"] == {"world_size": 2, "identical": True}
    a, b = adapter(runs / "fsdp"), adapter(runs / "ddp")
    assert a.keys() == b.keys() and max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3
    # The same 4 steps as DDP. The gradients are DDP's bit for bit (build_trainer puts back PEFT's own fp32 adapter
    # after TRL's bf16 cast; casting it back rounded DDP's initial lora_A to bf16 but not FSDP's DTensor shards,
    # issue 16); only gradient clipping's norm, summed over shards, can differ by an ulp (1e-7 relative).
    rows = lambda run: [json.loads(x) for x in (runs / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    losses = lambda run: [r["loss"] for r in rows(run) if "loss" in r and r.get("event") != "end"]  # noqa: E731
    assert losses("fsdp") == pytest.approx(losses("ddp")[:4], abs=1e-6)  # (ddp may have been resumed further)
    assert losses("fsdp")[-1] < losses("fsdp")[0]
    ddp_at_4 = load_file(runs / "ddp" / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert a.keys() == ddp_at_4.keys() and max((a[k] - ddp_at_4[k]).abs().max().item() for k in a) < 1e-5
    ckpt = runs / "fsdp" / "checkpoints" / "checkpoint-4"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir()
    again = qlora_lite("run", str(recipe), "--nproc", "2", "--resume", *STEPS, "--set", "name=fsdp",
                       "--set", "train.strategy=fsdp", "--set", "train.max_steps=6")
    assert again.returncode == 0, again.stderr[-3000:]
    assert metrics_steps(runs / "fsdp") == [1, 2, 3, 4, 5, 6]
    other = qlora_lite("run", str(recipe), "--resume", *STEPS, "--set", "name=fsdp", "--set", "train.max_steps=8")
    assert other.returncode == 2 and 'saved by train.strategy = "fsdp"' in other.stderr
