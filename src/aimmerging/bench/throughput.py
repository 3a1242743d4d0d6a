"""How fast is a training step, against what this machine can do?

* :func:`matmul_peak` measures the machine's fp32 peak with large square matmuls (best of a few).
* :func:`count_step_flops` counts the FLOPs of one training step (forward + backward of every
  micro-batch) with ``torch.utils.flop_counter.FlopCounterMode``.
* :func:`lever_study` times the training step with the known levers switched on one after another
  (LM head only where labels are, padding to the batch's longest sequence, grouping similar
  lengths, thread count) and reports tokens per second and the FLOP rate as a fraction of the peak;
  more rows show what a larger micro-batch or no LoRA dropout would give (the runs keep the config's).
* :func:`precision_study` times the same training steps, probe passes and generation in fp32 and
  under bf16 autocast, alternating, against the fp32 and bf16 matmul peaks (CPUs with bf16
  instructions); with a second engine (:func:`bf16_base_engine`) it also times the QLoRA-style
  split against today's path in the same rounds: base weights held in bf16, LoRA tensors and their
  optimizer in fp32, under the same bf16 autocast.
* :func:`cpu_description` names the CPU and its bf16 instructions (AMX, AVX512-BF16), printed
  beside the figures.
* :func:`time_breakdown` profiles the runs' step and splits its time into matmuls, attention,
  dropout masks and the rest, with the matmuls' own FLOP rate.

The levers are explicit: each row builds its own :class:`Engine` (``full_logits``) over a copy of
the formatter (``padded_to``), so no switch is flipped on the run's objects. Used by
``aimmerging bench`` in a process of its own (the peak is measured in the same process as
the steps, as the benchmark asks).
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from typing import Sequence

import torch

from ..data.olora import Example
from ..runs.process import bf16_pays


def cpu_description() -> dict:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor name elsewhere) and which bf16
    matmul instructions it has: AMX tiles (``amx_bf16``) and AVX512-BF16, read from the cpuinfo
    flags and, where cpuinfo is missing, from torch's own checks."""
    import platform

    name, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    cpu = getattr(torch, "cpu", None)

    def torch_says(check: str) -> bool:
        return bool(getattr(cpu, check, lambda: False)())

    return {"model": name or platform.processor() or platform.machine() or "unknown",
            "amx": "amx_bf16" in flags or (not flags and torch_says("_is_amx_tile_supported")),
            "avx512_bf16": "avx512_bf16" in flags or (not flags and torch_says("_is_avx512_bf16_supported"))}


def bf16_base_engine(cfg, accelerator, *, rank_multiplier: int = 1, like=None):
    """The engine of the candidate path, built as a run builds its own: the base loaded with
    ``from_pretrained(dtype=torch.bfloat16)`` (the run option ``dtype: bfloat16``), LoRA attached by
    PEFT, whose ``autocast_adapter_dtype`` keeps the LoRA tensors in fp32 (and so their gradients
    and AdamW state: the QLoRA split). ``like``: an engine whose adapter values this one takes, so
    that both paths start from the same adapter (PEFT initialises it through the base's bf16)."""
    from ..models.lora import restore, snapshot
    from ..runs.runner import build_engine

    engine = build_engine(dataclasses.replace(cfg, dtype="bfloat16"), accelerator, rank_multiplier=rank_multiplier).engine
    if like is not None:
        restore(engine.params, snapshot(like.params))
    return engine


def matmul_peak(n: int = 2048, repeats: int = 6, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of an ``n x n`` by ``n x n`` matmul in ``dtype`` on this process's threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _cpu_attention_flops() -> dict:
    """FLOP formulas for the CPU flash-attention kernels, which ``FlopCounterMode``'s registry
    lacks (it has the CUDA ones only), so attention would count as zero on CPU. The formulas are
    torch's own for the CUDA kernels (``sdpa_flop_count``, ``sdpa_backward_flop_count``); a causal
    call counts half, as the kernel skips the blocks above the diagonal. (transformers passes an
    explicit mask when a batch has padding: the kernel then computes every block, and so do we.)"""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is None or backward is None:
        return {}

    def causal_share(is_causal) -> float:
        return 0.5 if is_causal else 1.0

    def forward_flops(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
        return int(fc.sdpa_flop_count(query, key, value) * causal_share(is_causal))

    def backward_flops(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False,
                       *args, out_shape=None, **kwargs):
        return int(fc.sdpa_backward_flop_count(grad_out, query, key, value) * causal_share(is_causal))

    return {forward: forward_flops, backward: backward_flops}


def step_flops_by_op(engine, micro_batches: Sequence[Sequence[Example]]) -> dict[str, int]:
    """FLOPs of the forward and backward passes of one optimizer step, per torch op (e.g.
    ``aten.mm``); gradients are cleared afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        for mb in micro_batches:
            engine.backward(mb, 1.0 / len(micro_batches), sync=True)
    for p in engine.params:
        p.grad = None
    return {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}


def count_step_flops(engine, micro_batches: Sequence[Sequence[Example]]) -> int:
    """FLOPs of the forward and backward passes of one optimizer step (gradients are cleared)."""
    return sum(step_flops_by_op(engine, micro_batches).values())


def _batches(examples: Sequence[Example], cfg, engine, grouped: bool, steps: int,
             micro: int | None = None) -> list[list[list[Example]]]:
    """``steps`` optimizer steps of micro-batches (size ``micro``, default the config's, with the
    config's accumulation), drawn as the training loop draws them."""
    from ..training.loop import micro_batch_stream

    length = engine.formatter.length if grouped else None
    stream = micro_batch_stream(examples, micro or cfg.micro_batch_size, random.Random(f"throughput-{cfg.seed}"), length)
    return [[next(stream) for _ in range(cfg.grad_accum)] for _ in range(steps)]


LEVERS = (
    # name, full LM head, pad to the length budget, group by length, threads (None: all cores),
    # micro-batch (None: the config's), LoRA dropout on
    ("baseline: LM head on every position, padded to the length budget, 1 thread", True, True, False, 1, None, True),
    ("+ all cores (torch threads = cores)", True, True, False, None, None, True),
    ("+ LM head only where labels are (logits_to_keep)", False, True, False, None, None, True),
    ("+ pad to the batch's longest sequence", False, False, False, None, None, True),
    ("+ group similar lengths into a batch (the runs' setting)", False, False, True, None, None, True),
    ("  same, micro-batch x2 (not used by the runs)", False, False, True, None, 2, True),
    ("  same, micro-batch x4 (not used by the runs)", False, False, True, None, 4, True),
    ("  same as the runs, LoRA dropout off (changes the recipe; not used by the runs)", False, False, True, None, None, False),
)


def _set_dropout(model, on: bool, saved: dict) -> None:
    """Switch the model's dropout modules off (p = 0, remembering p in ``saved``) or back on."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            if not on and module.p > 0:
                saved[module] = module.p
                module.p = 0.0
            elif on and module in saved:
                module.p = saved.pop(module)


def lever_engine(base, *, full_logits: bool, pad_to: int | None, micro_batch_size: int | None = None):
    """An Engine over the same model as ``base`` with the lever settings of one row."""
    from ..training.engine import Engine

    return Engine(base.model, base.formatter.padded_to(pad_to), base.accelerator,
                  micro_batch_size=micro_batch_size or base.micro_batch_size, max_grad_norm=base.max_grad_norm,
                  full_logits=full_logits)


def lever_study(base, cfg, examples: Sequence[Example], steps: int = 3, peak: float | None = None) -> dict:
    """Time ``steps`` training steps (after one warm-up step) for each row of :data:`LEVERS`."""
    cores = torch.get_num_threads()
    peak = peak or matmul_peak()
    budget = base.formatter.max_input_tokens + max(len(base.formatter.answer_ids(e.output)) for e in examples)
    optimizer = torch.optim.AdamW(base.params, lr=1e-7)
    rows, saved = [], {}
    for name, full_logits, pad, grouped, threads, factor, dropout in LEVERS:
        _set_dropout(base.model, dropout, saved)
        torch.set_num_threads(threads or cores)
        micro = cfg.micro_batch_size * (factor or 1)
        engine = lever_engine(base, full_logits=full_logits, pad_to=budget if pad else None)
        batches = _batches(examples, cfg, engine, grouped, steps + 1, micro)
        flops = sum(count_step_flops(engine, mb) for mb in batches[1:])
        tokens = sum(engine.formatter.length(e) for step in batches[1:] for mb in step for e in mb)
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        engine.inner_step(batches[0], optimizer, sched)  # warm-up
        start = time.perf_counter()
        for step in batches[1:]:
            engine.inner_step(step, optimizer, sched)
        wall = time.perf_counter() - start
        rows.append({"lever": name, "threads": threads or cores, "micro_batch": micro, "step_s": wall / steps,
                     "tokens_per_s": tokens / wall, "gflop_per_step": flops / steps / 1e9,
                     "gflops": flops / wall / 1e9, "fraction_of_peak": flops / wall / 1e9 / peak})
    _set_dropout(base.model, True, saved)
    torch.set_num_threads(cores)
    return {"peak_gflops": peak, "threads": cores, "steps": steps, "rows": rows}


# where a step's time goes: torch op name -> category (anything else is "other")
CATEGORIES = {"aten::mm": "matmul", "aten::bmm": "matmul", "aten::addmm": "matmul",
              "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
              "aten::bernoulli_": "dropout masks"}


def time_breakdown(engine, cfg, examples: Sequence[Example], steps: int = 2) -> dict:
    """Profile ``steps`` training steps as the runs execute them (``torch.profiler``) and split their
    time by op category: matmuls, attention, dropout masks, everything else. Also the rate of the
    matmuls alone (their FLOPs over their time): what the shapes of this model and batch allow,
    before any other cost."""
    from torch.profiler import ProfilerActivity, profile

    batches = _batches(examples, cfg, engine, cfg.group_by_length, steps + 1)
    optimizer = torch.optim.AdamW(engine.params, lr=1e-7)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    engine.inner_step(batches[0], optimizer, sched)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for step in batches[1:]:
            engine.inner_step(step, optimizer, sched)
        wall = time.perf_counter() - start
    seconds = {"matmul": 0.0, "attention": 0.0, "dropout masks": 0.0}
    for event in prof.key_averages():
        if event.key in CATEGORIES:
            seconds[CATEGORIES[event.key]] += event.self_cpu_time_total / 1e6
    seconds["other"] = max(0.0, wall - sum(seconds.values()))
    # the counter names ops "aten.mm", the profiler "aten::mm"
    matmul_flops = sum(n for step in batches[1:] for op, n in step_flops_by_op(engine, step).items()
                       if CATEGORIES.get(op.replace(".", "::")) == "matmul")
    matmul_gflops = matmul_flops / seconds["matmul"] / 1e9 if seconds["matmul"] else None
    return {"steps": steps, "wall_s": wall, "shares": {k: v / wall for k, v in seconds.items()},
            "matmul_gflops": matmul_gflops}


def precision_study(engine, cfg, examples: Sequence[Example], steps: int = 3, rounds: int = 3,
                    memory_batch: int | None = None, generate_batch: int = 20, new_tokens: int = 8,
                    bf16_base=None) -> dict:
    """fp32 against bf16 autocast (LoRA weights, gradients and optimizer stay fp32) on identical
    work, alternating ``rounds`` times (fp32, bf16, fp32, ...): ``steps`` training steps, as many
    probe passes (a memory batch, train mode, no gradients) and one greedy generation of
    ``generate_batch`` prompts for ``new_tokens`` tokens (EOS ignored). Best round of each.
    The training step's FLOP rate is compared with the matmul peak of its own precision.

    ``bf16_base``: an engine over the same model with its base weights held in bf16 and fp32 LoRA
    tensors (:func:`bf16_base_engine`); it runs the same work under the same bf16 autocast as row
    ``bf16 base``, in the same rounds (fp32, bf16, bf16 base, fp32, ...), and ``bf16_base_speedup``
    compares it with today's path (row ``bf16``: fp32 base under bf16 autocast)."""
    from ..evaluation.generate import generate_predictions

    batches = _batches(examples, cfg, engine, cfg.group_by_length, steps + 1)
    probe = list(examples[: memory_batch or cfg.memory_batch_size])
    prompts = list(examples[:generate_batch])
    flops = sum(count_step_flops(engine, mb) for mb in batches[1:])
    tokens = sum(engine.formatter.length(e) for step in batches[1:] for mb in step for e in mb)
    no_eos = copy.copy(engine.formatter)  # generation ignores EOS: every row generates new_tokens tokens
    no_eos.eos_id = None
    # name: (engine, autocast dtype or None), each engine with an optimizer of its own LoRA tensors
    precisions = {"fp32": (engine, None), "bf16": (engine, torch.bfloat16)}
    if bf16_base is not None:
        precisions["bf16 base"] = (bf16_base, torch.bfloat16)
    optimizers = {id(e): torch.optim.AdamW(e.params, lr=1e-7) for e, _ in precisions.values()}
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0) for k, o in optimizers.items()}
    best: dict[str, dict[str, float]] = {k: {} for k in precisions}

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for round_ in range(rounds + 1):  # round 0 warms every path up
        for name, (eng, dtype) in precisions.items():
            optimizer, sched = optimizers[id(eng)], schedulers[id(eng)]
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                step = timed(lambda: [eng.inner_step(b, optimizer, sched) for b in batches[1:]]) / steps
                passes = timed(lambda: [eng.mean_loss(probe, train_mode=True, chunk=len(probe)) for _ in range(steps)]) / steps
            gen = timed(lambda: generate_predictions(eng.peft_model, no_eos, prompts, batch_size=generate_batch,
                                                     max_new_tokens=new_tokens, progress=False, autocast_dtype=dtype))
            if round_ == 0:
                continue
            for key, value in (("step_s", step), ("probe_s", passes), ("generate_s", gen)):
                best[name][key] = min(best[name].get(key, float("inf")), value)
    peaks = {"fp32": max(matmul_peak(), matmul_peak()), "bf16": max(matmul_peak(dtype=torch.bfloat16),
                                                                      matmul_peak(dtype=torch.bfloat16))}
    rows = {}
    for name, b in best.items():
        gflops = flops / steps / b["step_s"] / 1e9
        peak_of = "fp32" if name == "fp32" else "bf16"
        rows[name] = {**b, "tokens_per_s": tokens / steps / b["step_s"], "gflops": gflops, "peak_of": peak_of,
                      "peak_gflops": peaks[peak_of], "fraction_of_peak": gflops / peaks[peak_of],
                      "generated_tokens_per_s": generate_batch * new_tokens / b["generate_s"]}
    timings = ("step_s", "probe_s", "generate_s")
    out = {"steps": steps, "rounds": rounds, "memory_batch": len(probe), "generate_batch": len(prompts),
           "new_tokens": new_tokens, "bf16_instructions": bf16_pays(), "rows": rows,
           "speedup": {k: rows["fp32"][k] / rows["bf16"][k] for k in timings}}
    if "bf16 base" in rows:  # > 1: the new path is faster than today's
        out["bf16_base_speedup"] = {k: rows["bf16"][k] / rows["bf16 base"][k] for k in timings}
    return out


# the precision study's rows as printed
PATHS = {"fp32": "fp32", "bf16": "bf16 (today: fp32 base under bf16 autocast)",
         "bf16 base": "bf16 base (new: bf16 base, fp32 LoRA + AdamW, bf16 autocast)"}


def flops_per_token(engine, cfg, examples: Sequence[Example], steps: int = 2) -> float:
    """FLOPs per (non-padding) token of the training step as the runs execute it."""
    batches = _batches(examples, cfg, engine, cfg.group_by_length, steps)
    flops = sum(count_step_flops(engine, mb) for mb in batches)
    tokens = sum(engine.formatter.length(e) for step in batches for mb in step for e in mb)
    return flops / tokens


def main(argv: list[str]) -> int:
    """``python -m aimmerging.bench.throughput RUN_CONFIG.yaml OUT.json [STEPS]`` (used by the bench)."""
    from ..config import build_config, load_yaml
    from ..io import atomic_write_json
    from ..logs import setup_logging
    from ..runs.runner import Runner, build_engine

    setup_logging(verbose=False)
    cfg = build_config(load_yaml(argv[0]))
    steps = int(argv[2]) if len(argv) > 2 else 3
    # the engine runs without autocast; the runs' precision is applied around the lever study, so
    # that the precision study can time fp32 and bf16 on the same engine
    bf16 = cfg.mixed_precision == "bf16"
    runner = Runner(dataclasses.replace(cfg, mixed_precision="no"))
    engine = build_engine(runner.cfg, runner.accelerator,
                          rank_multiplier=runner.method.adapter_rank_multiplier(len(runner.tasks))).engine
    examples = runner.data[runner.tasks[0]].train
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = matmul_peak(dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        study = lever_study(engine, cfg, examples, steps=steps, peak=peak)
        study["flops_per_token"] = flops_per_token(engine, cfg, examples)
        study["breakdown"] = time_breakdown(engine, cfg, examples)
    study["precision_of_runs"] = "bf16" if bf16 else "fp32"
    study["cpu"] = cpu_description()
    if engine.accelerator.device.type == "cpu" and bf16_pays():
        candidate = bf16_base_engine(runner.cfg, runner.accelerator, like=engine,
                                     rank_multiplier=runner.method.adapter_rank_multiplier(len(runner.tasks)))
        study["precision"] = precision_study(engine, cfg, examples, steps=steps, bf16_base=candidate)
    # the peak (in the runs' precision) is what the machine can do: the best of the measurements
    # before and after the study (anything else running at the time can only lower a measurement)
    study["peak_measurements_gflops"] = [peak, matmul_peak(dtype=dtype)]
    peak = study["peak_gflops"] = max(study["peak_measurements_gflops"])
    for row in study["rows"]:
        row["fraction_of_peak"] = row["gflops"] / peak
    breakdown = study["breakdown"]
    breakdown["peak_gflops"] = peak
    breakdown["matmul_fraction_of_peak"] = breakdown["matmul_gflops"] / peak if breakdown["matmul_gflops"] else None
    atomic_write_json(argv[1], study)
    cpu = study["cpu"]
    print(f"CPU: {cpu['model']}; AMX {'yes' if cpu['amx'] else 'no'}, AVX512-BF16 {'yes' if cpu['avx512_bf16'] else 'no'}; "
          f"{study['threads']} threads")
    for row in study["rows"]:
        print(f"{row['lever']}: {row['step_s']:.2f} s/step, {row['tokens_per_s']:.0f} tokens/s, "
              f"{row['gflops']:.1f} GFLOP/s = {100 * row['fraction_of_peak']:.0f}% of {peak:.1f}")
    precision = study.get("precision") or {}
    for name, row in precision.get("rows", {}).items():
        print(f"{PATHS.get(name, name)}: {row['step_s']:.2f} s/step, {row['tokens_per_s']:.0f} tokens/s, {100 * row['fraction_of_peak']:.0f}% "
              f"of the {row['peak_of']} peak {row['peak_gflops']:.0f} GFLOP/s; probe {row['probe_s']:.2f} s; "
              f"generation {row['generated_tokens_per_s']:.0f} tokens/s")
    if "bf16_base_speedup" in precision:
        print("bf16 base over today's bf16 path (> 1: faster): " + ", ".join(
            f"{what} {precision['bf16_base_speedup'][key]:.2f}x"
            for what, key in (("step", "step_s"), ("probe", "probe_s"), ("generation", "generate_s"))))
    print("time of the runs' step: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in breakdown["shares"].items())
          + f"; matmuls alone at {100 * (breakdown['matmul_fraction_of_peak'] or 0):.0f}% of peak")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
