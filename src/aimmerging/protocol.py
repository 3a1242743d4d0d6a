"""Evaluation protocols: named presets of run options (``--protocol default|reference``).

``default`` is this library's own choice (no option changed). ``reference`` reproduces the
behaviour of the AIMMerging reference code (ALGORITHM.md §1.7, §2.2, §4), item by item:

==========================  ==============================  ===================================
item                        reference (preset)               default
==========================  ==============================  ===================================
model selection             every 40 steps, the adapter     off: the last step's adapter
                            with the lowest validation
                            loss is scored and carried on
validation set              first 25 dev examples per seen  (same set when selection is on)
                            task after a seed-42 shuffle
validation loss             HF Trainer's: mean token loss   mean over all answer tokens
                            per batch of 8, averaged over
                            batches (weighted by size)
``single`` (FWT reference)  10 % of the task's training     the dev split
                            set held out for validation,
                            trained on the other 90 %
prompt truncation           right, at 1024 tokens, in       middle (head and tail kept), at
                            training; none at test          ``max_input_tokens``, everywhere
generation length           128 new tokens                  longest training answer + EOS
evaluation precision        half precision (see below)      the training dtype
SuperNI scoring             task363 ``pos``/``neg`` mapped  exact match / ROUGE-L per task,
                            to ``p``/``n`` in OP; task1687  the same for OP, BWT and FWT
                            scored by ROUGE-L in FWT
==========================  ==============================  ===================================

Evaluation precision: the reference generates a_{T-1,i} with the model cast to fp16 and a_{i,i}
and the single-task scores on an 8-bit (bitsandbytes) base. Here ``eval_precision: half`` runs
every evaluation under autocast, fp16 on CUDA and bf16 on CPU (fp16 matmuls are not native on
CPUs, and bitsandbytes' 8-bit path needs CUDA); the weights stay in their dtype. The 8-bit path
is not reproduced.

Explicit options (YAML or flags) always win over a preset. ``single_overrides`` is what the bench
changes for the ``single`` runs under the reference protocol: the reference trains them with twice
the batch (64 / 16 against 32 / 8) for the same number of epochs, so half the steps.

Not part of the preset (both protocols): a task whose dev examples are test examples (in the
shared data: dbpedia and yahoo, whose test files are copies of dev; cb, copa and rte, whose dev
files hold the test examples) is validated on training examples the run does not train on
(``--dev-test-overlap holdout``), unless ``--dev-test-overlap keep`` (the reference's leak, with a
warning).
"""

from __future__ import annotations

from typing import Any

PROTOCOLS = ("default", "reference")

REFERENCE: dict[str, Any] = {
    "select_best_every": 40,
    "val_per_task": 25,
    "val_batch_size": 8,
    "val_loss": "batch-mean",
    "truncation": "right",
    "truncate_eval_prompts": False,
    "max_input_tokens": 1024,
    "max_target_tokens": 128,
    "max_new_tokens": 128,
    "eval_precision": "half",
    "scoring": "reference",
}

# the reference's single-task (FWT) runs validate on 10 % of their own training set
REFERENCE_SINGLE: dict[str, Any] = {"validation": "train-holdout"}


def preset(protocol: str, method: str | None) -> dict[str, Any]:
    """The option values a protocol sets (below YAML and flags) for a run of ``method``."""
    if protocol == "default":
        return {}
    if protocol == "reference":
        return {**REFERENCE, **(REFERENCE_SINGLE if method == "single" else {})}
    raise ValueError(f"unknown protocol {protocol!r}")


def single_overrides(run: dict[str, Any]) -> dict[str, Any]:
    """What the bench changes in the shared run options for its ``single`` runs under the
    reference protocol: twice the batch and micro-batch, half the steps (the same epochs)."""
    if run.get("protocol") != "reference":
        return {}
    out: dict[str, Any] = {}
    for key in ("batch_size", "micro_batch_size"):
        if run.get(key):
            out[key] = 2 * int(run[key])
    if run.get("max_steps"):
        out["max_steps"] = max(1, int(run["max_steps"]) // 2)
    return out
