"""Process set-up for a run: one process, or data-parallel processes through accelerate (DDP), or
processes that shard the base model (FSDP2, ``--fsdp``: see ``models.sharding``).

Several processes (``accelerate launch --multi_gpu --num_processes N -m aimmerging run ...``, or
``torchrun``): every process runs the same code on the same global example lists; the engine
shards the batches, losses are reduced over the processes, so every process takes the same merge
decisions and keeps a bit-identical adapter. Only the main process writes files. On a machine
without GPU the processes run on CPU with gloo.

Debugging hook, off by default: with ``AIMMERGING_RANK_DUMP=DIR`` in the environment every
process writes, at the end of the run, ``DIR/rank<N>.safetensors`` (its LoRA tensors by
parameter name) and ``DIR/rank<N>.json`` (``{"rank", "num_processes", "sharded_params", "param_bytes",
"full_param_bytes", "records"}``: the number of its parameters that FSDP sharded (DTensors), the
bytes of parameters it holds and those of the whole model, and the trace
records it emitted in this invocation, merges included; stages skipped on resume emit none), so
tests can check that all processes took the same decisions and hold the same adapter.
"""

from __future__ import annotations

import logging
import os
import resource

import torch

from ..errors import ConfigError, UserError

log = logging.getLogger("aimmerging")


RANK_DUMP_ENV = "AIMMERGING_RANK_DUMP"


def _cpu_processes() -> bool:
    """True for one of several processes (``torchrun``, ``accelerate launch --multi_gpu``) on a
    machine without an accelerator: accelerate joins them with gloo only when told ``cpu=True``,
    and would otherwise run every process alone. (``ACCELERATE_USE_CPU=1`` forces the same.)"""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    device_api = getattr(torch, "accelerator", None)
    return not (device_api.is_available() if device_api is not None else torch.cuda.is_available())


def _warn_single_cpu_process(num_processes: int) -> None:
    """``accelerate launch --cpu --num_processes N`` (N > 1) starts a single process unless it
    goes through mpirun (``--mpirun_hostfile``): it sets MASTER_ADDR for N processes but no
    WORLD_SIZE. Say so instead of silently training on one process."""
    env = os.environ
    if (num_processes == 1 and env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
            and "MASTER_ADDR" in env and "WORLD_SIZE" not in env):
        log.warning("running as a single process: `accelerate launch --cpu --num_processes N` starts one "
                    "process unless it goes through mpirun (--mpirun_hostfile). For N CPU processes use "
                    "`accelerate launch --multi_gpu --num_processes N ...` on a machine without GPU "
                    "(add ACCELERATE_USE_CPU=1 where there is one) or `torchrun --nproc_per_node N -m aimmerging run ...`")


def fsdp_requested(flag: bool = False) -> bool:
    """Whether the run is to shard its base model (FSDP): ``--fsdp``, or an accelerate launch that
    asks for FSDP (``accelerate launch --use_fsdp`` or an FSDP config file set
    ``ACCELERATE_USE_FSDP=true``)."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes")


def check_data_parallel(accelerator) -> None:
    """Processes that accelerate itself would shard are refused: DeepSpeed and Megatron-LM, whose
    sharding of the LoRA tensors outside forward and backward the merge arithmetic, the
    controller's L1 norm, adapter loading and saving do not handle (stop at once rather than
    deadlock or diverge), and accelerate's own FSDP (an Accelerator made before the run's, with
    FSDP on). FSDP runs through :func:`make_accelerator` ``(fsdp=True)``: accelerate sets up the
    processes as for DDP and the run shards the base model itself (``models.sharding``)."""
    from accelerate.utils import DistributedType

    kinds = {DistributedType.FSDP: "accelerate's own FSDP", DistributedType.DEEPSPEED: "DeepSpeed",
             DistributedType.MEGATRON_LM: "Megatron-LM"}
    name = kinds.get(accelerator.distributed_type)
    if name:
        raise ConfigError(f"{name} is not supported: aimmerging runs one process, data-parallel processes (DDP) or "
                          "FSDP over its base model (--fsdp); launch with e.g. "
                          "`accelerate launch --config_file configs/accelerate/ddp.yaml -m aimmerging run ... [--fsdp]`")


def bf16_pays() -> bool:
    """Whether bf16 autocast speeds training up here: a CUDA device that supports bf16, or (no
    CUDA) a CPU with bf16 matmul instructions (AVX512-BF16 or AMX; elsewhere bf16 is emulated)."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def make_accelerator(mixed_precision: str = "no", fsdp: bool = False):
    """The run's Accelerator: data-parallel processes (gloo on CPU), or one process. ``fsdp``: the
    run shards its base model itself (``models.sharding``): accelerate is made to set up the
    processes as for DDP (an FSDP request in the environment is hidden from it while it starts;
    accelerate 1.16 would anyway ignore it on CPU processes and run DDP)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    hidden = os.environ.pop("ACCELERATE_USE_FSDP", None) if fsdp else None
    try:
        # The models' buffers (rotary tables) never change: no need to broadcast them every forward.
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=_cpu_processes(),
                                  kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    finally:
        if hidden is not None:
            os.environ["ACCELERATE_USE_FSDP"] = hidden
    check_data_parallel(accelerator)
    _warn_single_cpu_process(accelerator.num_processes)
    return accelerator


def end_process_group() -> None:
    """Destroy the torch.distributed process group if this process has one (a command ends).
    Left to the interpreter's exit, gloo's threads still running can abort the process
    ("terminate called without an active exception", SIGABRT) after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main_decides(accelerator, fn):
    """``fn()`` on the main process only; its result, or the UserError it raised, is handed
    to every process, so a failed check fails everywhere at once instead of leaving the
    other processes waiting at the next collective."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box = [None, None]
    if accelerator.is_main_process:
        try:
            box[0] = fn()
        except UserError as e:
            box[1] = e
    broadcast_object_list(box, from_process=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


_EARLIER_PEAK_KB = 0  # the process's peak resident memory before the last reset of the kernel's mark


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (over the stage resets of
    :func:`start_stage_memory` too)."""
    return round(max(_EARLIER_PEAK_KB, _maxrss_kb()) / 1024, 1)


def start_stage_memory() -> bool:
    """Start measuring one stage's peak memory: the kernel's high-water mark of this process's
    resident memory is reset (Linux: ``5`` written to ``/proc/self/clear_refs``, which resets
    ``ru_maxrss`` too, so the peak so far is kept for :func:`peak_rss_mb`), and on CUDA torch's
    peak-allocation counter. False where the mark cannot be reset (not Linux): the stage's own
    peak resident memory is then unknown."""
    global _EARLIER_PEAK_KB
    _EARLIER_PEAK_KB = max(_EARLIER_PEAK_KB, _maxrss_kb())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _hwm_kb() -> int | None:
    """The kernel's high-water mark of this process's resident memory (``VmHWM``, KB): the one
    ``clear_refs`` resets. (``ru_maxrss`` also counts the peak of the process this one was forked
    from before it exec'd, which no reset clears.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def stage_memory(reset: bool) -> dict[str, float]:
    """The peaks since :func:`start_stage_memory` (``reset``: what it returned), in MB:
    ``stage_peak_rss_mb`` (resident memory, where the mark could be reset) and ``stage_peak_cuda_mb``
    (memory torch allocated on the current CUDA device, where CUDA is in use)."""
    out = {}
    hwm = _hwm_kb() if reset else None
    if hwm is not None:
        out["stage_peak_rss_mb"] = round(hwm / 1024, 1)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["stage_peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
