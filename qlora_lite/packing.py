"""Padding-free packing ([train] packing = true) for decoder-only models: several tokenized examples share one row of
at most train.max_length tokens, and no example attends to another.

How, as tools/study_packing.py measured on this stack (transformers 5, sdpa and eager on CPU, flash-attention varlen
through transformers' own dispatch): rows are filled best-fit-decreasing by TRL's `pack_dataset` ("bfd": no example
is split); the collator keeps each packed row a row of the batch, pads the short ones with a pad "sequence" of their
own, and gives position ids that restart at 0 for every example, cu_seq_lens (int32) and max_length for the varlen
kernels, and NO attention_mask: with one, sdpa and eager attend across examples. transformers detects the packed
sequences from the restarting position ids (masking_utils) when the model runs without a KV cache. The first token of
each example is no target of the one before it: its label is -100. Then every example's logits and loss equal those
of the example run alone (tests/test_packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora_lite.data import IGNORE_INDEX

PACKED_COLUMNS = ("input_ids", "labels")


@dataclass(frozen=True)
class PackStats:
    examples: int  # tokenized examples packed
    rows: int  # packed rows they fill
    tokens: int  # real tokens (the same packed or not)
    max_length: int  # the most tokens a row holds

    @property
    def fill(self) -> float:
        """The share of the rows' room that holds tokens, not padding."""
        return self.tokens / max(1, self.rows * self.max_length)


def pack(examples, max_length: int):
    """A Dataset of tokenized examples (input_ids, labels) packed into rows of at most max_length tokens, each with
    its examples' lengths (seq_lengths); and its `PackStats`."""
    from trl import pack_dataset

    packed = pack_dataset(examples.select_columns(list(PACKED_COLUMNS)), max_length, strategy="bfd")
    tokens = sum(len(ids) for ids in examples["input_ids"])
    return packed, PackStats(len(examples), len(packed), tokens, max_length)


def collate(rows: list[dict], pad_id: int) -> dict:
    """A training batch of packed rows (input_ids, labels, seq_lengths): see the module docstring."""
    width = max(len(r["input_ids"]) for r in rows)
    ids, labels, positions, lengths = [], [], [], []
    for r in rows:
        pad = width - len(r["input_ids"])
        row_lengths = [int(n) for n in r["seq_lengths"]] + ([pad] if pad else [])
        row_positions = [p for n in row_lengths for p in range(n)]
        row_labels = list(r["labels"]) + [IGNORE_INDEX] * pad
        ids.append(list(r["input_ids"]) + [pad_id] * pad)
        labels.append([IGNORE_INDEX if p == 0 else label for p, label in zip(row_positions, row_labels)])
        positions.append(row_positions)
        lengths += row_lengths
    cu_seq_lens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions),
            "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": max(lengths),
            "max_length_k": max(lengths)}
