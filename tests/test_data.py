"""Data: label masks, EOS, truncation that keeps the target, the encoder that never sees the target, column errors."""

import pytest

from conftest import make_rows, write_jsonl
from qlora_lite.data import IGNORE_INDEX, build_examples, encode_prompt, load_splits, special_tokens
from qlora_lite.errors import UserError
from qlora_lite.model import load_tokenizer
from qlora_lite.recipe import DataRecipe, PromptRecipe, TrainRecipe

PROMPT = PromptRecipe(template="Summarize:\n{dialogue}\nSummary: ")
DATA = DataRecipe(train="x.jsonl")


def rows(n=6):
    return make_rows(n, seed=5)


def test_decoder_labels_hide_the_prompt_and_end_with_eos(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    ds, stats = build_examples(rows(), tok, DATA, PROMPT, TrainRecipe(max_length=128), is_encoder_decoder=False)
    for example, row in zip(ds, rows()):
        prompt_ids, _ = encode_prompt(row, DATA, PROMPT, tok, 128)
        labels, ids = example["labels"], example["input_ids"]
        assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        assert ids[: len(prompt_ids)] == prompt_ids
        target = labels[len(prompt_ids):]
        assert IGNORE_INDEX not in target and target[-1] == tok.eos_token_id
        assert tok.decode(target, skip_special_tokens=True) == row["summary"]
    assert stats.rows == 6 and stats.dropped_empty == 0


def test_prompt_starts_with_bos_and_has_no_eos(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    ids, _ = encode_prompt(rows(1)[0], DATA, PROMPT, tok, 128)
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids


def test_eos_is_learned_when_pad_is_eos(tiny_llama):
    """pad == eos here; the collator must pad labels by position, keeping the real EOS in the loss."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = load_tokenizer(str(tiny_llama))
    assert tok.pad_token_id == tok.eos_token_id
    ds, _ = build_examples(rows(4), tok, DATA, PROMPT, TrainRecipe(max_length=128), is_encoder_decoder=False)
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)([ds[i] for i in range(4)])
    for labels, mask in zip(batch["labels"], batch["attention_mask"]):
        last_real = int(mask.sum()) - 1
        assert labels[last_real] == tok.eos_token_id  # learned
        assert (labels[last_real + 1:] == IGNORE_INDEX).all()  # padding ignored


def test_long_prompt_is_cut_but_target_and_suffix_kept(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    row = dict(rows(1)[0], dialogue=" ".join(["Ana: blah blah blah"] * 60))
    ds, stats = build_examples([row], tok, DATA, PROMPT, TrainRecipe(max_length=64), is_encoder_decoder=False)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert len(ids) <= 64 and stats.truncated_prompts == 1
    target = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(target, skip_special_tokens=True) == row["summary"]
    prompt_text = tok.decode(ids[: len(ids) - len(target)], skip_special_tokens=True)
    assert prompt_text.startswith("Summarize:\n") and prompt_text.endswith("\nSummary: ")


def test_rows_whose_target_cannot_fit_are_dropped_and_counted(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    good, bad, empty = rows(3)
    bad = dict(bad, summary="the end " * 80)
    empty = dict(empty, summary="  ")
    ds, stats = build_examples([good, bad, empty], tok, DATA, PROMPT, TrainRecipe(max_length=64), False)
    assert (stats.rows, stats.dropped_too_long, stats.dropped_empty) == (1, 1, 1)


def test_encoder_input_is_the_prompt_only(tiny_t5):
    tok = load_tokenizer(str(tiny_t5))
    before, after = special_tokens(tok)
    assert before == [] and after == [tok.eos_token_id]  # T5 style: </s> after the text
    ds, _ = build_examples(rows(), tok, DATA, PROMPT, TrainRecipe(), is_encoder_decoder=True)
    for example, row in zip(ds, rows()):
        encoder_text = tok.decode(example["input_ids"], skip_special_tokens=True)
        assert row["summary"] not in encoder_text and row["dialogue"] in encoder_text
        assert example["input_ids"][-1] == tok.eos_token_id
        assert example["labels"][-1] == tok.eos_token_id
        assert tok.decode(example["labels"], skip_special_tokens=True) == row["summary"]


def test_chat_template_prompt(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    prompt = PromptRecipe(template="Sum: {dialogue}", chat_template=True, system="Be brief.")
    ids, _ = encode_prompt(rows(1)[0], DATA, prompt, tok, 256)
    text = tok.decode(ids)
    assert text.startswith("<system>Be brief.\n<user>Sum: ") and text.endswith("<assistant>")


def test_missing_column_names_it_and_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"dialog": "a", "summary": "b"}])
    with pytest.raises(UserError) as e:
        load_splits(DataRecipe(train=str(path)), PROMPT)
    assert "'dialogue'" in str(e.value) and "dialog" in str(e.value) and "data.train" in str(e.value)


def test_csv_and_jsonl_load_the_same(tmp_path):
    import csv

    data = rows(3)
    write_jsonl(tmp_path / "t.jsonl", data)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "dialogue", "summary"])
        writer.writeheader()
        writer.writerows(data)
    a = load_splits(DataRecipe(train=str(tmp_path / "t.jsonl")), PROMPT)["train"]
    b = load_splits(DataRecipe(train=str(tmp_path / "t.csv")), PROMPT)["train"]
    assert a["summary"] == b["summary"] and a["dialogue"] == b["dialogue"]


def test_local_dataset_folder_with_split_names(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(4))
    write_jsonl(tmp_path / "validation.jsonl", rows(2))
    splits = load_splits(DataRecipe(source=str(tmp_path), train="train", eval="validation"), PROMPT)
    assert len(splits["train"]) == 4 and len(splits["eval"]) == 2


def test_unknown_split_is_a_user_error(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(4))
    with pytest.raises(UserError, match="data.eval"):
        load_splits(DataRecipe(source=str(tmp_path), train="train", eval="valid"), PROMPT)


@pytest.mark.parametrize("content, expected", [
    (b"", "the file is empty"),
    (b"\n  \n", "the file is empty"),
    ('{"dialogue": "a", "summary": "b"}\n{"dialogue": "c", "summ'.encode(), "line 2 is not valid JSON"),
    (b'{"dialogue": "a", "summary": "b"}\n[1, 2]\n', "line 2 is a JSON list"),
    ('{"dialogue": "caf\u00e9", "summary": "b"}\n'.encode("utf-16"), "UTF-16"),
    (b'{"dialogue": "a", "summary": "b"}\n{"dialogue": "caf\xe9", "summary": "b"}\n', "byte 0xe9 on line 2"),
    (b'\xef\xbb\xbf{"dialogue": "a", "summary": "b"}\n{"dialogue": "caf\xe9", "summary": "b"}\n', "byte 0xe9 on line 2"),
])
def test_unreadable_data_file_is_named_with_the_line_at_fault(tmp_path, content, expected):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_splits(DataRecipe(train=str(path)), PROMPT)
    assert f"data.train ({path})" in str(e.value) and expected in str(e.value)


def test_a_json_document_error_gives_its_line_and_a_csv_error_its_parser(tmp_path):
    (tmp_path / "t.json").write_text('[{"dialogue": "a", "summary": "b"},\n {"dialogue": "c" "summary": "d"}]\n')
    with pytest.raises(UserError, match=r"data.train .*t.json.*line 2, column 19: Expecting .,. delimiter"):
        load_splits(DataRecipe(train=str(tmp_path / "t.json")), PROMPT)
    (tmp_path / "t.csv").write_text('dialogue,summary\n"a,b\n')
    with pytest.raises(UserError, match=r"data.train .*t.csv.*cannot read it as csv: ParserError"):
        load_splits(DataRecipe(train=str(tmp_path / "t.csv")), PROMPT)


def test_a_list_or_object_where_text_belongs_is_refused_and_a_number_is_text(tiny_llama, tmp_path):
    tok = load_tokenizer(str(tiny_llama))
    path = write_jsonl(tmp_path / "t.jsonl", [{"dialogue": "a: hi", "summary": "hi"},
                                              {"dialogue": ["a", "b"], "summary": "x"}])
    rows = load_splits(DataRecipe(train=str(path)), PROMPT)["train"]
    with pytest.raises(UserError, match=r"data.train \(.*t.jsonl\), row 2: column 'dialogue' holds a list, not text"):
        build_examples(rows, tok, DataRecipe(train=str(path)), PROMPT, TrainRecipe(), False)
    numbers = [{"dialogue": "score?", "summary": 0}, {"dialogue": 7, "summary": 5}]
    _, stats = build_examples(numbers, tok, DataRecipe(), PROMPT, TrainRecipe(), False)
    assert stats.rows == 2 and stats.dropped_empty == 0  # 0 is an answer, not an empty row


def test_a_csv_with_only_its_header_is_named(tmp_path):
    (tmp_path / "t.csv").write_text("dialogue,summary\n")
    with pytest.raises(UserError, match="has a header line but no rows"):
        load_splits(DataRecipe(train=str(tmp_path / "t.csv")), PROMPT)
