"""Run configuration: one flat dataclass, read from a YAML file and/or command-line flags.

Every field is a flag (``lora_r`` -> ``--lora-r``) and a YAML key (``lora_r:`` or ``lora-r:``).
Precedence: defaults < YAML file (``--config``) < flags. Unknown keys and ill-typed values are
errors. The fully resolved config is saved as ``config.yaml`` in the run directory.

Batch sizes are global (over all processes), so one config means the same training on one
process or on N.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .controller import SCHEDULES, ControllerConfig
from .errors import ConfigError

METHODS = ("seq", "replay", "mtl", "single", "aimmerging", "merge-fixed", "merge-end")
# Fields that do not change what a run computes: they may differ when a run is resumed.
NON_RESULT_FIELDS = frozenset({"output_dir", "overwrite", "progress", "threads", "fwt_reference"})


def _f(default, help: str, group: str, choices: tuple | None = None, **kw):
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, **kw})


def _lf(help: str, group: str):
    return field(default=None, metadata={"help": help, "group": group, "choices": None})


@dataclass
class RunConfig:
    # -- task stream -----------------------------------------------------------------------------
    benchmark: Optional[str] = _f(None, "named stream: standard-cl, long-sequence, superni, synthetic (built in)", "stream")
    order: int = _f(1, "task order of the benchmark (1-3; superni 1-2)", "stream")
    tasks: Optional[list[str]] = _lf("explicit comma-separated task list (overrides --benchmark)", "stream")
    data_dir: Optional[str] = _f(None, "O-LoRA data directory with train/dev/test/<task>.json", "stream")
    train_cap: Optional[int] = _f(None, "at most this many training examples per task (class-balanced, seeded)", "stream")
    eval_cap: Optional[int] = _f(None, "at most this many test examples per task (class-balanced, seeded)", "stream")
    memory_ratio: float = _f(2.0, "replay memory: percent of each earlier task's training set (reference rule)", "stream")
    memory_cap_per_task: Optional[int] = _f(None, "replay memory: at most this many examples per earlier task", "stream")
    # -- model -----------------------------------------------------------------------------------
    model: str = _f("smollm2-135m", "alias (smollm2-135m, tiny-causal, tiny-seq2seq), local directory or hub id", "model")
    dtype: str = _f("float32", "dtype of the base weights", "model", ("float32", "bfloat16", "float16"))
    prompt_format: str = _f("plain", "causal LMs: 'plain' (input + ' ' + output) or 'chat' (chat template)", "model", ("plain", "chat"))
    max_input_tokens: int = _f(1024, "prompt budget in tokens (longer prompts lose their middle)", "model")
    max_target_tokens: int = _f(128, "answer budget in tokens, EOS included", "model")
    lora_r: int = _f(8, "LoRA rank", "model")
    lora_alpha: int = _f(32, "LoRA alpha (scaling alpha/r)", "model")
    lora_dropout: float = _f(0.05, "LoRA dropout", "model")
    lora_targets: Optional[list[str]] = _lf("modules to adapt (default: PEFT's per-architecture choice, q,v / q_proj,v_proj)", "model")
    # -- training --------------------------------------------------------------------------------
    method: str = _f("seq", "continual-learning method", "training", METHODS)
    epochs: int = _f(10, "epochs per task (ignored when --max-steps is given)", "training")
    max_steps: Optional[int] = _f(None, "optimizer steps per task; mtl gets this x the number of tasks (default: epochs x floor(ceil(N/micro)/accum))", "training")
    batch_size: int = _f(32, "examples per optimizer step (global, over all processes)", "training")
    micro_batch_size: int = _f(8, "examples per forward pass (global); accumulation = batch/micro", "training")
    lr: float = _f(3e-4, "AdamW learning rate (peak of the linear schedule)", "training")
    warmup_steps: int = _f(50, "linear warm-up steps, then linear decay to 0", "training")
    weight_decay: float = _f(0.0, "AdamW weight decay", "training")
    max_grad_norm: float = _f(1.0, "global gradient-norm clipping", "training")
    adam_beta1: float = _f(0.9, "AdamW beta1", "training")
    adam_beta2: float = _f(0.999, "AdamW beta2", "training")
    adam_eps: float = _f(1e-8, "AdamW epsilon", "training")
    group_by_length: bool = _f(False, "group training examples of similar length into micro-batches (less padding)", "training")
    replay_ratio: float = _f(0.25, "replay method: memory examples added per current-task example in each micro-batch", "training")
    memory_batch_size: int = _f(32, "memory examples per forgetting probe and per replay step", "training")
    select_best_every: Optional[int] = _f(None, "every N steps compute the validation loss and keep the best adapter (reference: 40)", "training")
    val_per_task: int = _f(25, "validation examples per seen task (dev split) for --select-best-every", "training")
    seed: int = _f(42, "seed of everything (sampling, data order, LoRA init, dropout)", "training")
    # -- merging (aimmerging, merge-fixed, merge-end) -----------------------------------------------
    schedule: str = _f("reference", "aimmerging interval schedule: reference code or paper description", "merging", ("reference", "paper"))
    initial_interval: int = _f(8, "S0: first planned merge interval of every task (merge-fixed: the interval)", "merging")
    initial_outer_steps: int = _f(8, "O0: replay steps per merge until the interval adapts", "merging")
    min_interval: int = _f(2, "S_min", "merging")
    max_interval: int = _f(128, "S_max", "merging")
    cold_start: int = _f(3, "merges per task that only record the learning signal", "merging")
    threshold_factor: float = _f(2.0, "forgetting threshold = factor x mean of the window's history losses", "merging")
    early_merge_signals: int = _f(3, "merge before the planned step once this many forgetting signals fired", "merging")
    adaptive: bool = _f(True, "adapt the merge interval from the learning signal", "merging")
    signal_normalizer: str = _f("planned", "learning signal = sum|delta_in| / planned S (reference) or elapsed steps", "merging", ("planned", "elapsed"))
    trend_window: int = _f(3, "paper schedule: L_w, merges in the trend window", "merging")
    gamma_minus: float = _f(2.0, "paper schedule: shrink factor on an upward trend", "merging")
    gamma_plus: float = _f(2.0, "paper schedule: growth factor on a downward trend", "merging")
    balance_band: float = _f(0.05, "paper schedule: relative slope within +-band counts as balanced", "merging")
    fixed_w_in: float = _f(0.5, "merge-fixed/merge-end: weight of the new-task update", "merging")
    fixed_w_out: float = _f(0.5, "merge-fixed/merge-end: weight of the replay update", "merging")
    end_outer_steps: Optional[int] = _f(None, "merge-end: replay steps at the task end (default floor(steps/S0) x O0)", "merging")
    probe_mode: str = _f("train", "forgetting probe: 'train' (reference: dropout on, loss / accumulation) or 'eval'", "merging", ("train", "eval"))
    outer_optimizer: str = _f("inner", "replay steps use the task's optimizer at its current LR (reference) or a separate AdamW", "merging", ("inner", "separate"))
    outer_lr: float = _f(1e-3, "learning rate of the separate replay optimizer (--outer-optimizer separate)", "merging")
    # -- evaluation --------------------------------------------------------------------------------
    eval_batch_size: int = _f(16, "prompts per generation batch", "evaluation")
    max_new_tokens: Optional[int] = _f(None, "generation length (default: longest answer of the task's training set + EOS)", "evaluation")
    metric: Optional[dict] = _f(None, "per-task metric overrides: TASK=exact_match|rougeL,...", "evaluation")
    eval_split: str = _f("test", "split scored after each task; 'dev' to choose settings without touching the test split", "evaluation", ("test", "dev"))
    eval_scope: str = _f("all", "after each task evaluate all seen tasks, or only what OP/BWT/FWT need", "evaluation", ("all", "needed"))
    zero_shot: bool = _f(False, "also evaluate the base model (no training) on every task first", "evaluation")
    fwt_reference: Optional[str] = _f(None, "results.json (or run dir) of a 'single' run: reference scores for FWT", "evaluation")
    # -- run -----------------------------------------------------------------------------------------
    output_dir: Optional[str] = _f(None, "run directory (default runs/<method>)", "run")
    overwrite: bool = _f(False, "replace an output dir that holds a run with a different config", "run")
    progress: bool = _f(True, "progress bars", "run")
    threads: Optional[int] = _f(None, "torch CPU threads (default: torch's choice)", "run")
    mixed_precision: str = _f("no", "accelerate mixed precision", "run", ("no", "bf16", "fp16"))

    # -------------------------------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name}: '{value}' is not one of {', '.join(choices)}")
        positive = ("order", "epochs", "batch_size", "micro_batch_size", "max_input_tokens", "max_target_tokens",
                    "lora_r", "lora_alpha", "memory_batch_size", "eval_batch_size", "val_per_task")
        for name in positive:
            need(getattr(self, name) > 0, f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("train_cap", "eval_cap", "max_steps", "select_best_every", "max_new_tokens", "threads", "memory_cap_per_task"):
            v = getattr(self, name)
            need(v is None or v > 0, f"{name}: must be > 0, got {v}")
        need(self.max_target_tokens >= 2, "max_target_tokens: must be >= 2 (answer + EOS)")
        need(self.batch_size % self.micro_batch_size == 0,
             f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")
        need(self.lr > 0, "lr: must be > 0")
        need(0 <= self.lora_dropout < 1, "lora_dropout: must be in [0, 1)")
        need(0 < self.memory_ratio <= 100, "memory_ratio: a percentage in (0, 100]")
        need(self.replay_ratio >= 0, "replay_ratio: must be >= 0")
        need(self.warmup_steps >= 0 and self.weight_decay >= 0 and self.max_grad_norm > 0,
             "warmup_steps and weight_decay must be >= 0, max_grad_norm > 0")
        if self.metric:
            from .evaluation.scoring import METRICS

            for task, m in self.metric.items():
                need(m in METRICS, f"metric: '{m}' for task '{task}' is not one of {', '.join(METRICS)}")
        try:
            self.controller_config()
        except ValueError as e:
            raise ConfigError(f"merging options: {e}") from None
        return self

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.method}")

    def controller_config(self) -> ControllerConfig:
        schedule = {"merge-fixed": "fixed", "merge-end": "end"}.get(self.method, self.schedule)
        assert schedule in SCHEDULES
        names = {f.name for f in fields(ControllerConfig)} - {"schedule"}
        return ControllerConfig(schedule=schedule, **{n: getattr(self, n) for n in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The fields that decide what a run computes (a resumed run must match them)."""
        return {k: v for k, v in self.to_dict().items() if k not in NON_RESULT_FIELDS}

    def fingerprint_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


# -- building a config from YAML and flags ----------------------------------------------------------
_HINTS = typing.get_type_hints(RunConfig)
FIELDS = {f.name: f for f in fields(RunConfig)}


def _base_type(name: str):
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0] if typing.get_origin(hint) is typing.Union else hint)


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML or flag value to the field's type; raise ConfigError naming the field."""
    base = _base_type(name)
    if value is None:
        if typing.get_origin(_HINTS[name]) is typing.Union:
            return None
        raise ConfigError(f"{name}: a value is required")
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if origin is list:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise ValueError
            items = [x.strip() for x in items if x.strip()]
            return items or None
        if base is dict:
            if isinstance(value, str):
                pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError
                value = {k.strip(): v.strip() for k, v in pairs}
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): str(v) for k, v in value.items()} or None
    except (TypeError, ValueError):
        pass
    kind = {list: "a comma-separated list", dict: "TASK=VALUE pairs"}.get(origin or base, getattr(base, "__name__", str(base)))
    raise ConfigError(f"{name}: expected {kind}, got {value!r}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of option: value")
    return data


def build_config(yaml_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                 source: str = "config") -> RunConfig:
    """Defaults, then ``yaml_values``, then ``overrides`` (flags); everything coerced and validated."""
    values: dict[str, Any] = {}
    for origin, mapping in ((source, yaml_values or {}), ("flags", overrides or {})):
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if name not in FIELDS:
                close = difflib.get_close_matches(name, FIELDS, n=3, cutoff=0.6)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"{origin}: unknown option '{key}'{hint}")
            values[name] = coerce(name, value)
    return RunConfig(**values).validate()
