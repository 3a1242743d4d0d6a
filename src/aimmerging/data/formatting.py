"""From examples to token ids and batches, for causal (decoder-only) and seq2seq models.

Prompt format, causal LMs (``prompt_format="plain"``, the default):

    tokens = tokenize(input)  +  tokenize(sep + output)  +  [eos]
             '---- prompt ---'    '-------- answer (the only tokens with a loss) --------'

The ``input`` field is used verbatim as the prompt (it already holds the instruction, the options
and ``Answer:``); the answer is the gold ``output`` preceded by the separator ``sep`` and followed
by the tokenizer's EOS token. **The separator rule:** ``sep`` is one space, except after a prompt
that already ends in whitespace (a newline, a space) or that is a chat template's rendering (an
``Example`` marked ``templated``: a conversation read from ``messages`` with the tokenizer's
template): there ``sep`` is empty, so ``"Answer:"`` trains on ``" Sports"`` and
``"<|im_start|>assistant\n"`` on ``"Sports"``. Prompt and answer are tokenized separately and
concatenated, so the model sees at training time exactly the prompt tokens it is given at
generation time. Labels are -100 on the prompt (and on padding): the loss covers only the answer
tokens.

``prompt_format="chat"`` wraps ``input`` as a single user turn with the tokenizer's chat template
(``add_generation_prompt=True``) and trains on ``output`` + EOS (no separator); for
instruction-tuned models. A ``templated`` example is already the template's rendering of its
whole conversation (system turn included): it is tokenized verbatim, never wrapped a second time.
A templated prompt is tokenized without the tokenizer's own special tokens (the template writes
them), in either format.

Seq2seq models (T5): the encoder reads ``input`` verbatim; the labels are ``output`` + EOS.

Truncation (``truncation="middle"``, the default): a prompt longer than its budget loses tokens
from the middle: the head (instruction, options, start of the text) and the last ``TAIL_TOKENS``
tokens (the end of the text and ``Answer:``) are kept. ``truncation="right"`` (the reference's,
made for T5) keeps the first ``max_input_tokens``; for a causal LM that cuts ``Answer:`` from the
few prompts over budget. With ``truncate_eval_prompts=False`` (the reference) generation sees the
whole prompt. Answers are cut at ``max_target_tokens``.

Batches: causal batches are left-padded (all answers end at the last position, so the LM head
only has to run on the last positions); seq2seq batches are right-padded.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .olora import Example

Prompt = Union[Example, str]  # an example (its input and whether it is templated) or a plain prompt text

TAIL_TOKENS = 12
IGNORE_INDEX = -100


def truncate(ids: list[int], budget: int, side: str) -> list[int]:
    """``ids`` cut to ``budget``: from the middle (``truncate_middle``) or on the right."""
    return truncate_middle(ids, budget) if side == "middle" else ids[:budget]


def truncate_middle(ids: list[int], budget: int, tail: int = TAIL_TOKENS) -> list[int]:
    """Keep the first ``budget - tail`` and the last ``tail`` ids when ``ids`` is too long."""
    if len(ids) <= budget:
        return ids
    tail = min(tail, budget // 2)
    return ids[: budget - tail] + (ids[-tail:] if tail else [])


@dataclass
class Encoded:
    """One example as token ids. Causal: ``input_ids`` = prompt + answer and ``answer_len``
    trailing tokens carry the loss. Seq2seq: ``input_ids`` = encoder input, ``labels`` = target."""

    input_ids: list[int]
    answer_len: int = 0
    labels: list[int] | None = None


class Formatter:
    """Turns examples into model inputs for one tokenizer and model kind (``causal``/``seq2seq``)."""

    def __init__(self, tokenizer, kind: str, max_input_tokens: int = 1024, max_target_tokens: int = 128,
                 prompt_format: str = "plain", pad_to: int | None = None, truncation: str = "middle",
                 truncate_eval_prompts: bool = True):
        if kind not in ("causal", "seq2seq"):
            raise ValueError(f"unknown model kind {kind!r}")
        if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
            from ..errors import ConfigError

            raise ConfigError("prompt_format: 'chat' needs a tokenizer with a chat template; this one has none")
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_input_tokens = max_input_tokens
        self.max_target_tokens = max_target_tokens
        self.prompt_format = prompt_format
        if truncation not in ("middle", "right"):
            raise ValueError(f"unknown truncation {truncation!r}")
        self.truncation = truncation
        self.truncate_eval_prompts = truncate_eval_prompts
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._cache: dict[tuple[str, str, bool], Encoded] = {}
        self._prompt_cache: dict[tuple[str, bool], list[int]] = {}
        self.pad_to = pad_to  # pad every causal training batch to at least this width (None: the longest)

    def padded_to(self, width: int | None) -> "Formatter":
        """A copy that pads every training batch to ``width`` (sharing the encoding cache)."""
        other = copy.copy(self)
        other.pad_to = width
        return other

    # -- token ids -------------------------------------------------------------------------
    @staticmethod
    def _key(prompt: Prompt) -> tuple[str, bool]:
        return (prompt.input, prompt.templated) if isinstance(prompt, Example) else (prompt, False)

    def _full_prompt_ids(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids before truncation, tokenised once per distinct prompt (evaluation
        sorts by length and then collates: a long prompt is not re-tokenised each time)."""
        key = self._key(prompt)
        ids = self._prompt_cache.get(key)
        if ids is None:
            text, templated = key
            ids = self._prompt_cache[key] = (self._tokenize_prompt(text, templated=True) if templated
                                             else self._tokenize_prompt(text))
        return ids

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids as trained on (truncated to ``max_input_tokens``)."""
        return truncate(self._full_prompt_ids(prompt), self.max_input_tokens, self.truncation)

    def eval_prompt_ids(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids as generation sees them (whole with ``truncate_eval_prompts=False``)."""
        ids = self._full_prompt_ids(prompt)
        return truncate(ids, self.max_input_tokens, self.truncation) if self.truncate_eval_prompts else list(ids)

    def prompt_text(self, prompt: Prompt) -> str:
        """The exact text the model reads before its answer (the chat template's rendering in chat
        format), before truncation."""
        text, templated = self._key(prompt)
        if self.kind == "causal" and self.prompt_format == "chat" and not templated:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                      tokenize=False)
        return text

    def separator(self, prompt: Prompt) -> str:
        """What comes between the prompt and the answer (module docs: the separator rule)."""
        text, templated = self._key(prompt)
        if self.kind != "causal" or self.prompt_format != "plain" or templated or text[-1:].isspace():
            return ""
        return " "

    def answer_text(self, ex: Example) -> str:
        """The answer's text as trained on, separator included (EOS follows it)."""
        return self.separator(ex) + ex.output

    def _tokenize_prompt(self, text: str, templated: bool = False) -> list[int]:
        if templated:  # the template wrote the special tokens it wants
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        elif self.kind == "causal" and self.prompt_format == "chat":
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return list(ids)

    def answer_ids(self, output: str, prompt: Prompt | None = None) -> list[int]:
        """Target tokens: the answer text after ``prompt``'s separator, and EOS (always kept, even
        when the text is cut). Without ``prompt``: the separator after a prompt like ``Answer:``."""
        sep = self.separator(prompt if prompt is not None else ":")
        ids = self.tokenizer(sep + output, add_special_tokens=False)["input_ids"]
        return list(ids)[: self.max_target_tokens - 1] + [self.eos_id]

    def encode(self, ex: Example) -> Encoded:
        key = (ex.input, ex.output, ex.templated)
        enc = self._cache.get(key)
        if enc is None:
            prompt, answer = self.prompt_ids(ex), self.answer_ids(ex.output, ex)
            if self.kind == "causal":
                enc = Encoded(input_ids=prompt + answer, answer_len=len(answer))
            else:
                enc = Encoded(input_ids=prompt, labels=answer)
            self._cache[key] = enc
        return enc

    def max_new_tokens(self, outputs: Sequence[str]) -> int:
        """Enough new tokens for the longest of these answers, EOS included."""
        return max(len(self.answer_ids(o)) for o in outputs)

    # -- batches ---------------------------------------------------------------------------
    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """A padded training batch with labels (-100 outside the answers)."""
        encs = [self.encode(e) for e in examples]
        if self.kind == "causal":
            width = max([len(e.input_ids) for e in encs] + [self.pad_to or 0])
            ids = torch.full((len(encs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(encs), width), dtype=torch.long)
            labels = torch.full((len(encs), width), IGNORE_INDEX, dtype=torch.long)
            for row, e in enumerate(encs):
                n = len(e.input_ids)
                ids[row, width - n:] = torch.tensor(e.input_ids)
                mask[row, width - n:] = 1
                labels[row, width - e.answer_len:] = ids[row, width - e.answer_len:]
            return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                    "answer_width": torch.tensor(max(e.answer_len for e in encs))}
        width = max(len(e.input_ids) for e in encs)
        twidth = max(len(e.labels) for e in encs)
        ids = torch.full((len(encs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        labels = torch.full((len(encs), twidth), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(encs):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[row, : len(e.input_ids)] = 1
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def collate_prompts(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """A padded batch of prompts for generation (left padding for causal models)."""
        return self.collate_prompt_ids([self.eval_prompt_ids(e) for e in examples])

    def collate_prompt_ids(self, prompts: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Token-id prompts padded into a batch (left padding for causal models)."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            if self.kind == "causal":
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            else:
                ids[row, : len(p)] = torch.tensor(p)
                mask[row, : len(p)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def length(self, ex: Example) -> int:
        enc = self.encode(ex)
        return len(enc.input_ids) + (len(enc.labels) if enc.labels else 0)
