"""Logging set-up shared by the CLI and the bench's worker processes, and the process rank read
from the environment (before any process group exists)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")  # torchrun, then MPI


def process_rank() -> int:
    """This process's rank under torchrun / accelerate launch / mpirun; 0 for a single process."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip():
            return int(value)
    return 0


def is_main_process() -> bool:
    return process_rank() == 0


def setup_logging(verbose: bool = False) -> None:
    # Under several processes only the main one logs (errors excepted), so nothing is printed twice.
    level = logging.INFO if is_main_process() else logging.ERROR
    level = logging.DEBUG if verbose else level
    logging.basicConfig(level=level, format="[aimmerging] %(message)s", stream=sys.stderr)
    logging.getLogger("aimmerging").setLevel(level)
    for noisy in ("transformers", "peft", "accelerate", "httpx", "huggingface_hub", "filelock", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # torch: e.g. FakeTensor cache stats of the FLOP counter
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module=r"(transformers|peft|accelerate|torch)\b")
    quiet_library_warnings()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def quiet_library_warnings() -> None:
    """Warnings of the libraries that say nothing to a user of aimmerging."""
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")  # raised by peft, harmless
    # a skipped (non-finite) first step: the schedule still advances, on purpose
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
