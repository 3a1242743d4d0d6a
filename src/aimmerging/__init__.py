"""aimmerging: continual LoRA fine-tuning with Adaptive Iterative Model Merging (AIMMerging).

Library entry points (imports are lazy-light: the controller needs no torch)::

    from aimmerging.config import build_config
    from aimmerging.training.runner import run
    results = run(build_config(overrides={"method": "aimmerging", "model": "tiny-causal", ...}))
"""

__version__ = "0.1.0"
