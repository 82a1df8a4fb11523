"""Pack several SFT examples into one row of at most max_length tokens.

A packed row is the examples' tokens back to back, with position_ids restarting at 0 for each
example. The batch passes no attention mask to the model. transformers 5 (5.25 checked) then
reads the restarts in position_ids as sequence boundaries
(`masking_utils.find_packed_sequence_indices`) and builds a block-diagonal causal mask for the
sdpa and eager attention implementations, so no token attends to another example. It does this
only when the forward pass builds no KV cache, hence `use_cache=False` in the loss.
`tests/test_sft.py` checks that packed logits equal unpacked logits per example.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgelm.train.chat import IGNORE_INDEX
from edgelm.train.curriculum import rank_by_difficulty


def pack_examples(lengths: Sequence[int], scores: Sequence[float], max_length: int, groups: int, seed: int = 0) -> list[list[int]]:
    """Group example indices into rows of at most `max_length` tokens.

    The examples are ranked by score and split into `groups` equal-size difficulty groups. Inside a
    group, first-fit decreasing by length fills the rows, so a row contains examples of similar
    difficulty and the curriculum can order rows as it orders examples.
    """
    too_long = [length for length in lengths if length > max_length]
    if too_long:
        raise ValueError(f"an example of {too_long[0]} tokens does not fit in max_length={max_length}")
    ranked = rank_by_difficulty(scores, seed)
    groups = max(1, min(groups, len(ranked)))
    rows: list[list[int]] = []
    for group in range(groups):
        members = ranked[group * len(ranked) // groups : (group + 1) * len(ranked) // groups]
        group_rows: list[list[int]] = []
        free: list[int] = []
        for index in sorted(members, key=lambda i: -lengths[i]):
            slot = next((row for row, space in enumerate(free) if space >= lengths[index]), None)
            if slot is None:
                group_rows.append([index])
                free.append(max_length - lengths[index])
            else:
                group_rows[slot].append(index)
                free[slot] -= lengths[index]
        rows.extend(group_rows)
    return rows


def collate_packed(rows: list[list[dict]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Build a packed batch from rows of encoded examples: input_ids, labels, position_ids, attention_mask.

    Rows are right-padded to the longest row of the batch; the padding gets its own position_ids
    run, so it forms a separate block. attention_mask (1 on example tokens) only counts tokens.
    The trainer must not pass it to the model, because with a mask the packed mask is not built.
    The first label of every example is -100: its logits would come from the previous example.
    """
    row_ids, row_labels, row_positions = [], [], []
    for row in rows:
        input_ids, labels, positions = [], [], []
        for example in row:
            input_ids += example["input_ids"]
            labels += [IGNORE_INDEX] + list(example["labels"][1:])
            positions += range(len(example["input_ids"]))
        row_ids.append(input_ids)
        row_labels.append(labels)
        row_positions.append(positions)

    width = max(len(ids) for ids in row_ids)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
    }
    for index, (input_ids, labels, positions) in enumerate(zip(row_ids, row_labels, row_positions)):
        length = len(input_ids)
        batch["input_ids"][index, :length] = torch.tensor(input_ids)
        batch["labels"][index, :length] = torch.tensor(labels)
        batch["position_ids"][index, :length] = torch.tensor(positions)
        batch["position_ids"][index, length:] = torch.arange(width - length)
        batch["attention_mask"][index, :length] = 1
    return batch
