"""Examples for a Hugging Face ``Trainer``: tokenised rows, a padding collator, and labels of rows.

* :func:`tokenize_examples` turns :class:`~aimmerging.data.olora.Example` objects (or
  ``{"input", "output"}`` dicts) into the rows a ``Trainer`` trains on, tokenised exactly as
  aimmerging's own runner does (``aimmerging.data.formatting``): causal models get
  ``input_ids`` = prompt + separator + output + EOS (the separator: one space, none after a
  prompt that ends in whitespace or a chat template's prompt; ``Formatter.separator``) with
  ``labels`` -100 on the prompt; seq2seq
  models get the prompt as ``input_ids`` and ``output`` + EOS as ``labels``.
* :class:`PadCollator` pads such rows into a batch (left padding with ``position_ids`` by
  default, as the runner; or right padding). ``transformers.DataCollatorForSeq2Seq`` works too.
* :func:`label_of` names the class of a row for the replay-memory rule (``output``, the last
  assistant turn of ``messages``, the ``completion``, or the label tokens).
* :func:`as_examples` turns evaluation data (examples, dicts, chat rows) into examples.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from ..data.files import examples_from_rows, split_chat
from ..data.formatting import IGNORE_INDEX, Formatter
from ..data.olora import Example
from ..errors import DataError


def as_examples(items: Iterable[Any], task: str, tokenizer: Any = None, input_field: str = "input",
                output_field: str = "output") -> list[Example]:
    """Examples from :class:`Example` objects, or from rows (``{"input", "output"}`` dicts, chat rows
    with ``messages``, or a ``datasets.Dataset`` of them; see :mod:`aimmerging.data.files`)."""
    items = list(items)
    if all(isinstance(e, Example) for e in items):  # (an empty list too)
        return items
    return examples_from_rows(items, source=f"task '{task}'", task=task, input_field=input_field,
                              output_field=output_field, tokenizer=tokenizer)


def tokenize_examples(examples: Iterable[Any], tokenizer, *, kind: str = "causal", max_input_tokens: int = 1024,
                      max_target_tokens: int = 128, prompt_format: str = "plain", task: str = "task") -> list[dict]:
    """Rows ``{"input_ids", "attention_mask", "labels"}`` (lists of ints) for ``examples``, tokenised
    as aimmerging's runner tokenises them; labels are -100 outside the answer."""
    formatter = Formatter(tokenizer, kind, max_input_tokens, max_target_tokens, prompt_format)
    rows = []
    for ex in as_examples(examples, task, tokenizer):
        enc = formatter.encode(ex)
        if kind == "causal":
            n = len(enc.input_ids)
            labels = [IGNORE_INDEX] * (n - enc.answer_len) + enc.input_ids[n - enc.answer_len:]
        else:
            labels = list(enc.labels)
        rows.append({"input_ids": list(enc.input_ids), "attention_mask": [1] * len(enc.input_ids), "labels": labels})
    return rows


class PadCollator:
    """Pads tokenised rows (``input_ids``, ``labels``, optional ``attention_mask``) into a batch.

    ``padding_side="left"`` (default, as aimmerging's runner for causal models) also returns
    ``position_ids`` counted from each row's first real token, so a left-padded row sees the same
    positions as an unpadded one; ``"right"`` pads at the end (seq2seq models, or any model).
    Keys other than these are dropped.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "left", position_ids: Optional[bool] = None,
                 label_pad_token_id: int = IGNORE_INDEX):
        if padding_side not in ("left", "right"):
            raise ValueError("padding_side must be 'left' or 'right'")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.position_ids = (padding_side == "left") if position_ids is None else position_ids
        self.label_pad_token_id = label_pad_token_id

    def _pad(self, seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        out = torch.full((len(seqs), width), value, dtype=torch.long)
        for row, s in enumerate(seqs):
            if not len(s):
                continue
            t = torch.as_tensor(list(s), dtype=torch.long)
            if self.padding_side == "left":
                out[row, width - len(s):] = t
            else:
                out[row, : len(s)] = t
        return out

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        masks = [r.get("attention_mask") or [1] * len(r["input_ids"]) for r in rows]
        batch = {"input_ids": self._pad(ids, self.pad_token_id), "attention_mask": self._pad(masks, 0)}
        if "labels" in rows[0]:  # padded on the same side (seq2seq targets: to their own width)
            batch["labels"] = self._pad([r["labels"] for r in rows], self.label_pad_token_id)
        if self.position_ids:
            batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return batch


def label_of(row: Any) -> str:
    """The class of a training row for the reference memory rule (one class per distinct answer):
    its ``output``; the last assistant turn of ``messages``; its ``completion`` (text or turns); or,
    for an already tokenised row, its label tokens. A row with none of these is in class ``""``."""
    if isinstance(row, Example):
        return row.output
    if not isinstance(row, Mapping):
        return ""
    if isinstance(row.get("output"), str):
        return row["output"]
    if "messages" in row and row["messages"] is not None:
        try:
            return split_chat(row["messages"], "row")[1]
        except DataError:
            return ""
    completion = row.get("completion")
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        texts = [t.get("content") for t in completion if isinstance(t, Mapping) and isinstance(t.get("content"), str)]
        return texts[-1] if texts else ""
    labels = row.get("labels")
    if labels is not None:
        values = labels.tolist() if hasattr(labels, "tolist") else list(labels)
        return " ".join(str(int(x)) for x in values if int(x) != IGNORE_INDEX)
    return ""
