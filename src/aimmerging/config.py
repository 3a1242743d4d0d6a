"""Run configuration: the options every run has (``RunConfig``) plus the chosen method's own
settings (its ``Settings`` dataclass), read from a YAML file and/or command-line flags.

Every option is a flag (``lora_r`` -> ``--lora-r``) and a YAML key (``lora_r:`` or ``lora-r:``).
Precedence: defaults < YAML file (``--config``) < flags. Unknown keys, ill-typed values and
absurd ones are errors (an integer option is at most ``settings.INT_LIMIT``, 10**9, or its own
tighter ``maximum``, e.g. ``lora_r`` <= 4096; ``0 < lr <= 10``); options of another method than
the chosen one are checked and ignored (a shared YAML file may set them for every method). The
fully resolved config (core options and the method's settings, flat) is saved as ``config.yaml``
in the run directory.

Batch sizes are global (over all processes), so one config means the same training on one
process or on N.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError
from .evaluation.scoring import METRICS as METRIC_NAMES
from .protocol import PROTOCOLS, preset
from .methods import METHODS, Method, load_builtin_methods, resolve_method
from .models.loading import QUANTIZE
from .settings import build, check_choices, coerce, int_limit, option, option_fields

# Fields that do not change what a run computes: they may differ when a run is resumed.
NON_RESULT_FIELDS = frozenset({"output_dir", "overwrite", "progress", "threads", "fwt_reference", "trust_remote_code",
                               "fsdp"})
SEED_MAX = 2**32 - 1
# Upper bounds of the options whose sane range is far below settings.INT_LIMIT (10**9, the bound
# of every other integer option): each is refused with one line before anything is loaded.
TOKENS_MAX = 65536  # answer and generation lengths
INPUT_TOKENS_MAX = 2**20  # prompt budget
BATCH_MAX = 10**6  # every batch size
LORA_R_MAX = 4096  # a rank above the model's hidden size is checked when the model is loaded
THREADS_MAX = 4096
LR_MAX = 10.0  # AdamW learning rates are far below 1; a larger one only overflows the weights


# Options added after runs were made, with the value that computes what earlier versions computed:
# at that value they are left out of a run's fingerprint, so runs from before them still resume.
ADDED_LATER = {"probe_size": None, "probe_set": "random", "probe_average": 1}


def _f(default, help: str, group: str, choices: tuple | None = None, maximum: int | None = None):
    return option(default, help, choices, group=group, maximum=maximum)


def _lf(help: str, group: str):
    return option(None, help, None, group=group)


@dataclass
class RunConfig:
    # -- protocol: a preset of the options below (``aimmerging.protocol``) ------------------------------
    protocol: str = _f("default", "evaluation protocol: this library's defaults, or the reference code's (model selection, validation, truncation, generation length, precision, SuperNI scoring); explicit options win", "protocol", PROTOCOLS)
    # -- task stream -----------------------------------------------------------------------------
    benchmark: Optional[str] = _f(None, "named stream: standard-cl, long-sequence, superni, synthetic (built in)", "stream")
    order: int = _f(1, "task order of the benchmark (1-3; superni 1-2)", "stream")
    tasks: Optional[list[str]] = _lf("explicit comma-separated task list (overrides --benchmark)", "stream")
    data_dir: Optional[str] = _f(None, "O-LoRA data directory with train/dev/test/<task>.json", "stream")
    data: Optional[str] = _f(None, "task-stream YAML naming each task's train/test/dev files (JSONL, JSON, CSV, Parquet, datasets dirs)", "stream")
    input_field: Optional[str] = _f(None, "--data: column holding the prompt (default 'input'; chat data: 'messages')", "stream")
    output_field: Optional[str] = _f(None, "--data: column holding the answer (default 'output')", "stream")
    train_cap: Optional[int] = _f(None, "at most this many training examples per task (class-balanced, seeded)", "stream")
    eval_cap: Optional[int] = _f(None, "at most this many test examples per task (class-balanced, seeded)", "stream")
    memory_ratio: float = _f(2.0, "replay memory: percent of each earlier task's training set (reference rule)", "stream")
    memory_cap_per_task: Optional[int] = _f(None, "replay memory: at most this many examples per earlier task", "stream")
    # -- model -----------------------------------------------------------------------------------
    model: str = _f("smollm2-135m", "alias (smollm2-135m, tiny-causal, tiny-seq2seq), local directory or hub id", "model")
    dtype: str = _f("float32", "dtype of the base weights", "model", ("float32", "bfloat16", "float16"))
    quantize: str = _f("no", "hold the frozen base in 8-bit or 4-bit (NF4) through bitsandbytes (QLoRA; CUDA and `pip install bitsandbytes` needed); the LoRA weights and the merge arithmetic stay fp32", "model", QUANTIZE)
    trust_remote_code: bool = _f(False, "run Python code shipped with the model (an auto_map in its config.json); off: such a model is refused, never asked about", "model")
    prompt_format: str = _f("plain", "causal LMs: 'plain' (input + ' ' + output) or 'chat' (chat template)", "model", ("plain", "chat"))
    max_input_tokens: int = _f(1024, "prompt budget in tokens (see --truncation)", "model", maximum=INPUT_TOKENS_MAX)
    truncation: str = _f("middle", "a prompt over budget loses its middle (head and the last tokens kept) or its end (right: the reference's)", "model", ("middle", "right"))
    truncate_eval_prompts: bool = _f(True, "truncate prompts at evaluation too (the reference does not)", "model")
    max_target_tokens: int = _f(128, "answer budget in tokens, EOS included", "model", maximum=TOKENS_MAX)
    lora_r: int = _f(8, "LoRA rank", "model", maximum=LORA_R_MAX)
    lora_alpha: int = _f(32, "LoRA alpha (scaling alpha/r)", "model", maximum=TOKENS_MAX)
    lora_dropout: float = _f(0.05, "LoRA dropout", "model")
    lora_targets: Optional[list[str]] = _lf("modules to adapt (default: PEFT's per-architecture choice, q,v / q_proj,v_proj; all-linear: every linear layer but the output head)", "model")
    # -- training --------------------------------------------------------------------------------
    method: str = _f("seq", "continual-learning method: a registered name or an import path module:Class", "training")
    epochs: int = _f(10, "epochs per task (ignored when --max-steps is given)", "training")
    max_steps: Optional[int] = _f(None, "optimizer steps per task; mtl gets this x the number of tasks (default: epochs x floor(ceil(N/micro)/accum))", "training")
    batch_size: int = _f(32, "examples per optimizer step (global, over all processes)", "training", maximum=BATCH_MAX)
    micro_batch_size: int = _f(8, "examples per forward pass (global); accumulation = batch/micro", "training", maximum=BATCH_MAX)
    lr: float = _f(3e-4, "AdamW learning rate (peak of the linear schedule; in (0, 10])", "training")
    warmup_steps: int = _f(50, "linear warm-up steps, then linear decay to 0", "training")
    weight_decay: float = _f(0.0, "AdamW weight decay", "training")
    max_grad_norm: float = _f(1.0, "global gradient-norm clipping", "training")
    adam_beta1: float = _f(0.9, "AdamW beta1", "training")
    adam_beta2: float = _f(0.999, "AdamW beta2", "training")
    adam_eps: float = _f(1e-8, "AdamW epsilon", "training")
    group_by_length: bool = _f(False, "group training examples of similar length into micro-batches (less padding)", "training")
    gradient_checkpointing: bool = _f(False, "recompute each layer's activations in the backward pass instead of keeping them: less memory, ~1/3 more compute, the same adapter", "training")
    memory_batch_size: int = _f(32, "memory examples per forgetting probe and per replay step", "stream", maximum=BATCH_MAX)
    select_best_every: Optional[int] = _f(None, "every N steps compute the validation loss and keep the best adapter (reference: 40)", "selection")
    validation: str = _f("dev", "validation examples: the dev split (val-per-task per seen task) or val-holdout of the task's training set (the reference's single runs)", "selection", ("dev", "train-holdout"))
    val_per_task: int = _f(25, "validation examples per seen task (dev split) for --select-best-every", "selection")
    val_holdout: float = _f(0.1, "--validation train-holdout: fraction of the training set held out (not trained on)", "selection")
    val_loss: str = _f("token-mean", "validation loss: mean over all answer tokens, or HF Trainer's mean of per-batch token means (weighted by batch size)", "selection", ("token-mean", "batch-mean"))
    val_batch_size: Optional[int] = _f(None, "examples per validation batch (default: the micro-batch size; HF Trainer: 8)", "selection", maximum=BATCH_MAX)
    dev_test_overlap: str = _f("holdout", "a task whose dev examples are test examples: validate on training examples not trained on (holdout), or on dev anyway (keep: the reference's test leak, with a warning)", "selection", ("holdout", "keep"))
    # (seed: validate() states its range, [0, SEED_MAX]; the bound here only keeps it a C integer)
    seed: int = _f(42, "seed of training (training-set sampling, data order, LoRA init, dropout); the test subset has --eval-seed", "training", maximum=2**63 - 1)
    eval_seed: int = _f(42, "seed of the test-subset draw (--eval-cap) alone, so that --seed varies training only (42: the subset earlier versions drew with --seed 42)", "evaluation", maximum=2**63 - 1)
    # -- evaluation --------------------------------------------------------------------------------
    eval_batch_size: int = _f(16, "prompts per generation batch", "evaluation", maximum=BATCH_MAX)
    max_new_tokens: Optional[int] = _f(None, "generation length (default: longest answer of the task's training set + EOS)", "evaluation", maximum=TOKENS_MAX)
    metric: Optional[dict] = _f(None, "per-task metric overrides: TASK=exact_match|rougeL,...", "evaluation")
    eval_split: str = _f("test", "split scored after each task; 'dev' to choose settings without touching the test split", "evaluation", ("test", "dev"))
    eval_scope: str = _f("all", "after each task evaluate all seen tasks, or only what OP/BWT/FWT need", "evaluation", ("all", "needed"))
    eval_precision: str = _f("train", "evaluate in the training precision, or under half-precision autocast (fp16 on CUDA, bf16 on CPU; the reference's fp16)", "evaluation", ("train", "half"))
    scoring: str = _f("default", "SuperNI scoring: the same metric everywhere, or the reference's (task363 pos/neg -> p/n in OP, task1687 ROUGE-L in FWT)", "evaluation", ("default", "reference"))
    zero_shot: bool = _f(False, "also evaluate the base model (no training) on every task first", "evaluation")
    fwt_reference: Optional[str] = _f(None, "results.json (or run dir) of a 'single' run: reference scores for FWT", "evaluation")
    # -- run -----------------------------------------------------------------------------------------
    output_dir: Optional[str] = _f(None, "run directory (default runs/<method>)", "run")
    overwrite: bool = _f(False, "replace an output dir that holds a run with a different config", "run")
    progress: bool = _f(True, "progress bars", "run")
    threads: Optional[int] = _f(None, "torch CPU threads (default: torch's choice)", "run", maximum=THREADS_MAX)
    mixed_precision: str = _f("no", "accelerate mixed precision", "run", ("no", "bf16", "fp16"))
    fsdp: bool = _f(False, "several processes: shard the frozen base model over them (torch FSDP2; the LoRA adapter stays whole on each, so merges need no gather); also on when accelerate launches with FSDP", "run")
    # -- the chosen method's own settings (an instance of its Settings dataclass, or None) ---------
    settings: Any = field(default=None, repr=False)

    # -------------------------------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        check_choices(self)
        positive = ("order", "epochs", "batch_size", "micro_batch_size", "max_input_tokens", "max_target_tokens",
                    "lora_r", "lora_alpha", "memory_batch_size", "eval_batch_size", "val_per_task")
        for name in positive:
            need(getattr(self, name) > 0, f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("train_cap", "eval_cap", "max_steps", "select_best_every", "max_new_tokens", "threads", "memory_cap_per_task",
                     "val_batch_size"):
            v = getattr(self, name)
            need(v is None or v > 0, f"{name}: must be > 0, got {v}")
        for f in fields(self):
            v = getattr(self, f.name)
            need(not (isinstance(v, float) and not math.isfinite(v)), f"{f.name}: must be a finite number, got {v}")
            if isinstance(v, int) and not isinstance(v, bool) and f.name in FIELDS:  # built without coerce()
                limit = int_limit(RunConfig, f.name)
                need(-limit <= v <= limit, f"{f.name}: must be <= {limit}, got {v}")
        need(self.max_target_tokens >= 2, "max_target_tokens: must be >= 2 (answer + EOS)")
        need(self.batch_size % self.micro_batch_size == 0,
             f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")
        need(0 < self.lr <= LR_MAX, f"lr: must be in (0, {LR_MAX:g}], got {self.lr:g}")
        need(0 <= self.lora_dropout < 1, "lora_dropout: must be in [0, 1)")
        need(0 < self.memory_ratio <= 100, "memory_ratio: a percentage in (0, 100]")
        need(0 < self.val_holdout < 1, f"val_holdout: a fraction in (0, 1), got {self.val_holdout}")
        need(self.warmup_steps >= 0 and self.weight_decay >= 0 and self.max_grad_norm > 0,
             "warmup_steps and weight_decay must be >= 0, max_grad_norm > 0")
        need(0 <= self.adam_beta1 < 1, f"adam_beta1: must be in [0, 1), got {self.adam_beta1}")
        need(0 <= self.adam_beta2 < 1, f"adam_beta2: must be in [0, 1), got {self.adam_beta2}")
        need(self.adam_eps > 0, f"adam_eps: must be > 0, got {self.adam_eps}")
        need(0 <= self.seed <= SEED_MAX, f"seed: must be in [0, {SEED_MAX}], got {self.seed}")
        need(0 <= self.eval_seed <= SEED_MAX, f"eval_seed: must be in [0, {SEED_MAX}], got {self.eval_seed}")
        need(not (self.data and (self.data_dir or self.benchmark)),
             "data: a task-stream file names the whole stream; drop --data-dir / --benchmark")
        if self.metric:
            for task, m in self.metric.items():
                need(m in METRIC_NAMES, f"metric: '{m}' for task '{task}' is not one of {', '.join(METRIC_NAMES)}")
        return self

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.method}")

    @property
    def method_class(self) -> type[Method]:
        return resolve_method(self.method)

    def make_method(self) -> Method:
        return self.method_class(self.settings)

    def to_dict(self) -> dict[str, Any]:
        """Core options and the method's settings, flat (what ``config.yaml`` holds)."""
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "settings"}
        if self.settings is not None:
            out.update({k: _plain(v) for k, v in dataclasses.asdict(self.settings).items()})
        return out

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide what a run computes (a resumed run must match them), with
        paths normalised (``data/`` and ``data`` are the same directory)."""
        return result_options(self.to_dict())

    def fingerprint_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


def result_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options of a run config (a dict, e.g. a saved config.yaml) that decide what it computes,
    with paths normalised: what a resumed run, or a stage copied from another run, must match."""
    out = {k: v for k, v in options.items() if k not in NON_RESULT_FIELDS}
    # eval_seed == seed draws the test subset of the versions before eval_seed existed (they drew it
    # with the seed): such a run computes what their runs computed, and resumes or shares their stages
    if "eval_seed" in out and out["eval_seed"] == out.get("seed"):
        del out["eval_seed"]
    # no fusion parameters: the rule's defaults, what the versions before fusion_params computed
    # (for weighted-sum, the default; DARE's masks are seeded per tensor and merge since then)
    if "fusion_params" in out and not out["fusion_params"]:
        del out["fusion_params"]
    # options added later, at the value that computes what the versions before them computed
    for key, neutral in ADDED_LATER.items():
        if key in out and out[key] == neutral:
            del out[key]
    for key in ("data_dir", "data"):
        if out.get(key):
            out[key] = os.path.normpath(out[key])
    return out


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# -- building a config from YAML and flags ----------------------------------------------------------
FIELDS = {name: f for name, f in option_fields(RunConfig).items()}

# Hugging Face (TrainingArguments, PEFT, TRL, run_clm.py) names -> aimmerging's: a one-line hint
# when one is used (YAML key or flag) instead of a bare "unknown option".
HF_NAMES = {
    "learning_rate": "lr", "model_name_or_path": "model", "model_name": "model", "num_train_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch_size (per forward pass) and batch_size (per optimizer step, global)",
    "train_batch_size": "batch_size", "gradient_accumulation_steps": "batch_size / micro_batch_size (the accumulation)",
    "per_device_eval_batch_size": "eval_batch_size", "eval_batch_size_per_device": "eval_batch_size",
    "target_modules": "lora_targets", "lora_target_modules": "lora_targets", "lora_target": "lora_targets",
    "r": "lora_r", "max_seq_length": "max_input_tokens (prompt) and max_target_tokens (answer)",
    "max_length": "max_input_tokens (prompt) and max_target_tokens (answer)", "warmup_ratio": "warmup_steps",
    "bf16": "mixed_precision (bf16)", "fp16": "mixed_precision (fp16)", "torch_dtype": "dtype",
    "dataset": "data (a task-stream YAML) or data_dir", "dataset_name": "data (a task-stream YAML) or data_dir",
    "train_file": "data (a task-stream YAML naming each task's files)", "dataset_text_field": "input_field",
    "num_epochs": "epochs",
}


def run_notes(cfg: RunConfig) -> list[str]:
    """One-line warnings about a config that runs but likely not as meant (the runner logs them)."""
    notes = []
    if cfg.max_steps is not None and cfg.warmup_steps >= cfg.max_steps:
        notes.append(f"warmup_steps ({cfg.warmup_steps}) >= max_steps ({cfg.max_steps}): the learning rate never "
                     f"reaches lr ({cfg.lr:g}; at most {cfg.max_steps}/{cfg.warmup_steps} of it); lower --warmup-steps")
    if cfg.method == "seq":
        notes.append("method seq fine-tunes on each task in turn and does nothing against forgetting (the baseline); "
                     "--method aimmerging, replay, ewc, ... (aimmerging methods) counter it")
    return notes


def hf_name_hint(name: str, flag: bool = False) -> str:
    """``a Hugging Face name; aimmerging's is lr`` for a Hugging Face option name, else ``""``
    (aimmerging's names spelled as flags with ``flag``)."""
    ours = HF_NAMES.get(name.replace("-", "_"))
    if ours is None:
        return ""
    if flag:
        ours = " ".join("--" + w.replace("_", "-") if w in FIELDS else w for w in ours.split(" "))
    return f"a Hugging Face name; aimmerging's is {ours}"


def method_option_owners() -> dict[str, type]:
    """Every method option name -> the Settings class declaring it (over all registered methods)."""
    load_builtin_methods()
    owners: dict[str, type] = {}
    for _, cls in METHODS.items():
        if cls.Settings is not None:
            for name in option_fields(cls.Settings):
                owners.setdefault(name, cls.Settings)
    return owners


def load_yaml(path: str | Path) -> dict[str, Any]:
    from .io import read_yaml_mapping

    return read_yaml_mapping(path, "config file")


def build_config(yaml_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                 source: str = "config", method: str | type[Method] | Method | None = None) -> RunConfig:
    """Defaults, then ``yaml_values``, then ``overrides`` (flags); everything coerced and validated.
    ``method`` (a class or an instance, from the Python API) wins over a ``method`` key."""
    merged: dict[str, tuple[str, Any]] = {}
    spelled: dict[str, str] = {}  # the key as the user wrote it, for messages
    for origin, mapping in ((source, yaml_values or {}), ("flags", overrides or {})):
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            merged[name] = (origin, value)
            spelled[name] = str(key)
    if method is not None:
        if not _is_method_spec(method):
            raise ConfigError(f"method: expected a name, a Method subclass or instance, got {method!r}")
        merged["method"] = ("api", method if isinstance(method, str) else _method_label(method))
    method_spec = method if method is not None and not isinstance(method, str) else merged.get("method", (None, "seq"))[1]
    if not _is_method_spec(method_spec):
        raise ConfigError(f"method: expected a name, got {method_spec!r}")
    method_cls = resolve_method(method_spec)
    protocol = merged.get("protocol", (None, "default"))[1]
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: '{protocol}' is not one of {', '.join(PROTOCOLS)}")
    for name, value in preset(protocol, method_cls.name).items():  # a preset sits below YAML and flags
        merged.setdefault(name, (f"protocol {protocol}", value))
    own = option_fields(method_cls.Settings) if method_cls.Settings is not None else {}
    owners = method_option_owners()
    core: dict[str, Any] = {}
    mine: dict[str, Any] = {}
    others: dict[type, dict[str, Any]] = {}
    for name, (origin, value) in merged.items():
        if name == "settings":
            raise ConfigError(f"{origin}: unknown option 'settings'")
        if name in FIELDS:
            core[name] = coerce(RunConfig, name, value)
        elif name in own:
            mine[name] = value
        elif name in owners:  # checked below, then ignored: it belongs to another method
            others.setdefault(owners[name], {})[name] = value
        else:
            known = [*FIELDS, *own, *owners]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = (f" ({hf_name_hint(name)})" if hf_name_hint(name) else "") or (f" (did you mean {', '.join(close)}?)" if close else "")
            raise ConfigError(f"{origin}: unknown option '{spelled.get(name, name)}'{hint}")
    for owner, values in others.items():
        build(owner, values, origin=f"{owner.__name__} options")
    if "fusion" in own:
        _rule_options_to_fusion_params(own, mine, others)
    if isinstance(method_spec, Method):
        settings = method_spec.settings
    elif method_cls.Settings is not None:
        settings = build(method_cls.Settings, mine, origin=f"{method_cls.name} settings")
    else:
        settings = None
    return RunConfig(**core, settings=settings).validate()


def _rule_options_to_fusion_params(own: dict, mine: dict[str, Any], others: dict[type, dict[str, Any]]) -> None:
    """A merging method's fusion rule takes its parameters from the flags of the method of the same
    name too: ``--fusion dare --dare-rate 0.3`` is ``--fusion dare --fusion-params rate=0.3`` (an
    option ``<rule>_<param>`` of another method, for a parameter the rule declares). Both ways at
    once for the same parameter is refused in one line."""
    from .fusion import FUSION_RULES, rule_params

    rule = mine.get("fusion", own["fusion"].default)
    if rule not in FUSION_RULES:
        return  # reported by the fusion option's choices
    prefix = str(rule).replace("-", "_") + "_"
    declared = {p.name for p in rule_params(rule)}
    taken = {name[len(prefix):]: value for values in others.values() for name, value in values.items()
             if name.startswith(prefix) and name[len(prefix):] in declared}
    if not taken:
        return
    given = mine.get("fusion_params") or {}
    if isinstance(given, str):
        from .settings import coerce
        from .methods.aimmerging import MergingSettings

        given = coerce(MergingSettings, "fusion_params", given) or {}
    both = sorted(set(taken) & set(given))
    if both:
        raise ConfigError(f"fusion rule '{rule}': {', '.join(both)} given twice (--{prefix.replace('_', '-')}"
                          f"{both[0].replace('_', '-')} and --fusion-params); give it once")
    mine["fusion_params"] = {**dict(given), **taken}


def _is_method_spec(method: Any) -> bool:
    return isinstance(method, (str, Method)) or (isinstance(method, type) and issubclass(method, Method))


def _method_label(method: type[Method] | Method) -> str:
    """What config.yaml records for a method given as a class or an instance: its registered name,
    else its import path (so ``aimmerging run --config`` can resume it)."""
    cls = method if isinstance(method, type) else type(method)
    if cls.name in METHODS and METHODS.get(cls.name) is cls:
        return cls.name
    return f"{cls.__module__}:{cls.__qualname__}"
