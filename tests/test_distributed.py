"""Two processes on CPU (gloo) through ``accelerate launch``: the same decisions, a bit-identical
adapter on every rank, the same results as one process, files written once, resume.

The runs go through ``accelerate launch --multi_gpu --num_processes 2`` with
``ACCELERATE_USE_CPU=1``: ``accelerate launch --cpu --num_processes 2`` starts a single process
(accelerate starts several CPU processes only through mpirun). Every launch runs in its own
process tree under a time limit and is killed as a whole (launcher and workers) when it
overruns, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aimmerging.cli.main import main
from aimmerging.runs import process as runner_module

from helpers import stage_adapters, tiny_args

pytestmark = pytest.mark.slow

LAUNCH_TIMEOUT = 240  # seconds per launch; the runs take ~10 s
HERE = Path(__file__).resolve().parent
# odd sizes (15 training examples, memory batches of 3, evaluation batches of 3) leave some
# process with an empty share; threshold factor 1 and one cold-start merge give "signal" merges
RUN = dict(method="aimmerging", steps=8, train_cap=15, eval_cap=8, memory_batch_size=3, initial_interval=2,
           initial_outer_steps=2, lora_dropout=0, lr=1e-3, warmup_steps=0, eval_batch_size=3,
           threshold_factor=1.0, cold_start=1)
DECISION_KEYS = ("task", "task_index", "event", "step", "reason", "forgetting_count", "w_in", "w_out", "outer_steps",
                 "interval", "elapsed", "next_interval", "next_outer_steps", "replay_skipped", "fallback", "skipped",
                 "memory_size", "controller")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers: torchrun starts every worker in a session of its own,
    so killing the launcher (or its process group) alone would leave them running."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(procs[1:], timeout=30)


def _launch(script: list[str], logs: Path, dump: Path | None = None, kill_when=None,
            timeout: float = LAUNCH_TIMEOUT) -> tuple[int, str, str]:
    """``_launch_once``, tried again (on another port) when the port chosen was taken meanwhile."""
    for _ in range(3):
        rc, out, err = _launch_once(script, logs, dump, kill_when, timeout)
        if rc in (0, None) or "EADDRINUSE" not in err:
            break
    return rc, out, err


def _launch_once(script: list[str], logs: Path, dump: Path | None, kill_when, timeout: float) -> tuple[int, str, str]:
    """``accelerate launch`` 2 CPU processes running ``script``; returns (rc, stdout, stderr).
    ``kill_when``: a predicate polled while it runs; once true the launcher and its workers are
    killed (SIGKILL) and rc is None."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *script]
    env = {k: v for k, v in os.environ.items() if k not in (runner_module.RANK_DUMP_ENV, "WORLD_SIZE", "RANK")}
    env.update(ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if dump is not None:
        env[runner_module.RANK_DUMP_ENV] = str(dump)
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / "stdout.txt", logs / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        end = time.monotonic() + timeout
        rc = None
        try:
            while time.monotonic() < end:
                if kill_when is not None and kill_when():
                    break
                rc = proc.poll()
                if rc is not None:
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"launch did not finish in {timeout} s: {' '.join(script)}\n{err_path.read_text()[-3000:]}")
        finally:
            if proc.poll() is None:
                _kill_tree(proc)
    if kill_when is not None and rc is not None:
        pytest.fail(f"the launch ended (rc {rc}) before its kill point:\n{err_path.read_text()[-3000:]}")
    return rc, out_path.read_text(), err_path.read_text()


def _run2(args: list[str], logs: Path, **kw) -> tuple[int, str, str]:
    return _launch(["-m", "aimmerging", *args], logs, **kw)


def _rank_dump(dump: Path) -> list[tuple[dict, dict]]:
    return [(json.loads((dump / f"rank{r}.json").read_text()), load_file(str(dump / f"rank{r}.safetensors")))
            for r in (0, 1)]


def _trace(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6)
    return a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """One process (in this process) and two processes (launched) on the same global batches."""
    root = tmp_path_factory.mktemp("distributed")
    one, two = root / "one", root / "two"
    assert main(tiny_args(one, data_dir, **RUN)) == 0
    rc, out, err = _run2(tiny_args(two, data_dir, **RUN), root / "logs-two", dump=root / "dump-two")
    assert rc == 0, err[-3000:]
    return {"root": root, "one": one, "two": two, "dump": root / "dump-two", "stdout": out, "stderr": err}


def test_two_processes_take_the_same_decisions_and_hold_a_bit_identical_adapter(runs):
    (meta0, tensors0), (meta1, tensors1) = _rank_dump(runs["dump"])
    assert (meta0["rank"], meta1["rank"]) == (0, 1) and meta0["num_processes"] == meta1["num_processes"] == 2
    merges = [r for r in meta0["records"] if r["event"] == "merge"]
    assert len(merges) >= 3 and {m["reason"] for m in merges} >= {"forced", "signal"}
    # every record, losses included (they are reduced over the processes), is the same on both ranks
    assert meta0["records"] == meta1["records"]
    assert tensors0.keys() == tensors1.keys() and len(tensors0) > 0
    assert all(torch.equal(tensors0[k], tensors1[k]) for k in tensors0)
    # ... and it is the adapter the main process saved after the last stage
    saved = stage_adapters(runs["two"])["02-agnews"]
    assert all(torch.equal(saved[k.replace(".default", "")], v) for k, v in tensors0.items())
    # the trace file (main process) holds exactly the records both ranks emitted
    assert _trace(runs["two"]) == meta0["records"]


def test_two_processes_reproduce_the_one_process_run(runs):
    one, two = runs["one"], runs["two"]
    t1, t2 = _trace(one), _trace(two)
    assert len(t1) == len(t2)
    for a, b in zip(t1, t2):
        assert {k: a.get(k) for k in DECISION_KEYS} == {k: b.get(k) for k in DECISION_KEYS}, (a, b)
        assert a.keys() == b.keys()
        assert all(_close(a[k], b[k]) for k in a), (a, b)  # losses, L1 norms, thresholds: rel 1e-3
    r1, r2 = (json.loads((run / "results.json").read_text()) for run in (one, two))
    assert (r1["num_processes"], r2["num_processes"]) == (1, 2)
    assert r2["complete"] is True
    assert r1["accuracy_matrix"] == r2["accuracy_matrix"] and r1["metrics"] == r2["metrics"]
    # the same files, written once: one results.json, one trace, one adapter per stage, no per-rank leftovers
    assert _files(one) == _files(two)
    for pred in sorted(p for p in _files(two) if "/predictions/" in p):
        assert [json.loads(x)["id"] for x in (two / pred).read_text().splitlines()] == \
               [json.loads(x)["id"] for x in (one / pred).read_text().splitlines()]
    a1, a2 = stage_adapters(one), stage_adapters(two)
    assert a1.keys() == a2.keys() == {"00-dbpedia", "01-amazon", "02-agnews"}
    for stage in a1:
        for k in a1[stage]:
            assert torch.allclose(a1[stage][k], a2[stage][k], rtol=1e-3, atol=1e-5), (stage, k)


def test_only_the_main_process_logs_and_prints(runs):
    err, out = runs["stderr"], runs["stdout"]
    for n in (1, 2, 3):
        assert err.count(f"[aimmerging] stage {n}/3:") == 1, err[-3000:]
    assert out.count("run directory:") == 1 and out.count("| after \\ on |") == 1


def test_sharded_generation_gives_the_one_process_predictions(tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        import dist_generate
    finally:
        sys.path.remove(str(HERE))
    want = dist_generate.predictions()
    assert all(len(set(p)) == len(p) for p in want.values())  # every example its own prediction
    rc, _, err = _launch([str(HERE / "dist_generate.py"), str(tmp_path / "out")], tmp_path / "logs")
    assert rc == 0, err[-3000:]
    for r in (0, 1):
        got = json.loads((tmp_path / "out" / f"rank{r}.json").read_text())
        assert got["num_processes"] == 2 and got["predictions"] == want


def test_a_command_ends_its_process_group_before_the_exit(capsys):
    """Left to the interpreter's exit, gloo's threads can abort a process whose run succeeded
    (SIGABRT, "terminate called without an active exception"): every command ends the group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert main(["methods"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_processes_resume_a_killed_run_and_retrain_nothing_when_finished(runs, data_dir, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(out, data_dir, **RUN)
    # killed (launcher and workers, SIGKILL) once the first stage is committed
    _run2(args, tmp_path / "logs-killed", kill_when=lambda: (out / "stages" / "00-dbpedia" / "scores.json").is_file())
    assert not (out / "stages" / "02-agnews").exists()
    rc, _, err = _run2(args, tmp_path / "logs-resumed", dump=tmp_path / "dump-resumed")
    assert rc == 0, err[-3000:]
    assert err.count("stage 1/3: dbpedia already finished, skipped") == 1
    (meta0, t0), (meta1, t1) = _rank_dump(tmp_path / "dump-resumed")
    assert meta0["records"] == meta1["records"] and meta0["records"][0]["task"] == "amazon"
    assert all(torch.equal(t0[k], t1[k]) for k in t0)
    # the resumed run ends exactly as the uninterrupted two-process run
    assert _trace(out) == _trace(runs["two"])
    want = json.loads((runs["two"] / "results.json").read_text())
    got = json.loads((out / "results.json").read_text())
    assert got["complete"] and got["accuracy_matrix"] == want["accuracy_matrix"]
    a, b = stage_adapters(out), stage_adapters(runs["two"])
    assert all(torch.equal(a[s][k], b[s][k]) for s in b for k in b[s])

    # run again on the finished directory: nothing is trained, on either rank
    rc, _, err = _run2(args, tmp_path / "logs-again", dump=tmp_path / "dump-again")
    assert rc == 0, err[-3000:]
    assert err.count("already finished, skipped") == 3
    assert [m["records"] for m, _ in _rank_dump(tmp_path / "dump-again")] == [[], []]
    assert json.loads((out / "results.json").read_text())["accuracy_matrix"] == want["accuracy_matrix"]


def test_a_config_error_stops_every_process(runs, data_dir, tmp_path):
    args = tiny_args(runs["two"], data_dir, **{**RUN, "lr": 5e-4})  # the finished run has another config
    rc, _, err = _run2(args, tmp_path / "logs", timeout=120)
    assert rc not in (0, None)
    assert "holds a run with a different config" in err
    assert json.loads((runs["two"] / "results.json").read_text())["complete"] is True  # untouched


# -- FSDP: the base sharded over the two processes, the adapter whole on each ------------------------
@pytest.fixture(scope="module")
def fsdp_run(runs, data_dir):
    out = runs["root"] / "fsdp"
    rc, out_text, err = _run2(tiny_args(out, data_dir, **RUN, fsdp=True), runs["root"] / "logs-fsdp",
                              dump=runs["root"] / "dump-fsdp")
    assert rc == 0, err[-3000:]
    return {"run": out, "dump": runs["root"] / "dump-fsdp", "stderr": err}


def _predictions(run: Path) -> dict[str, list[str]]:
    return {p: [json.loads(x)["prediction"] for x in (run / p).read_text().splitlines()]
            for p in sorted(p for p in _files(run) if "/predictions/" in p)}


def test_fsdp_shards_the_base_and_reproduces_the_one_process_run(runs, fsdp_run):
    """Under --fsdp every process holds a share of the base (DTensors) and the whole adapter: the
    same merges, losses and L1 norms as one process on the same global batches, the same
    adapters to float summation order, the same predictions; both ranks bit-identical."""
    (meta0, tensors0), (meta1, tensors1) = _rank_dump(fsdp_run["dump"])
    assert meta0["sharded_params"] > 0 and meta1["sharded_params"] == meta0["sharded_params"]
    # each holds about half of the base (FSDP pads a shard to an even split) and all of the adapter
    lora_bytes = sum(t.nbytes for t in tensors0.values())
    full = meta0["full_param_bytes"]
    assert all(abs(m["param_bytes"] - lora_bytes - (full - lora_bytes) / 2) < 0.02 * full for m in (meta0, meta1))
    assert meta0["records"] == meta1["records"]
    assert all(torch.equal(tensors0[k], tensors1[k]) for k in tensors0)
    assert fsdp_run["stderr"].count("fsdp: the base model is sharded over 2 processes") == 1
    one, two = runs["one"], fsdp_run["run"]
    t1, t2 = _trace(one), _trace(two)
    assert len(t1) == len(t2) and sum(r["event"] == "merge" for r in t2) >= 3
    for a, b in zip(t1, t2):
        assert {k: a.get(k) for k in DECISION_KEYS} == {k: b.get(k) for k in DECISION_KEYS}, (a, b)
        assert all(_close(a[k], b[k]) for k in a), (a, b)
    r1, r2 = (json.loads((run / "results.json").read_text()) for run in (one, two))
    assert (r2["num_processes"], r2["fsdp"], r1["fsdp"]) == (2, True, False)
    assert r1["accuracy_matrix"] == r2["accuracy_matrix"] and _predictions(one) == _predictions(two)
    assert _files(one) == _files(two)
    a1, a2 = stage_adapters(one), stage_adapters(two)
    for stage in a1:
        for k in a1[stage]:
            assert torch.allclose(a1[stage][k], a2[stage][k], rtol=1e-3, atol=1e-5), (stage, k)


def test_fsdp_resumes_a_killed_run_as_if_never_stopped(fsdp_run, data_dir, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(out, data_dir, **RUN, fsdp=True)
    _run2(args, tmp_path / "logs-killed", kill_when=lambda: (out / "stages" / "00-dbpedia" / "scores.json").is_file())
    assert not (out / "stages" / "02-agnews").exists()
    rc, _, err = _run2(args, tmp_path / "logs-resumed")
    assert rc == 0, err[-3000:]
    assert err.count("stage 1/3: dbpedia already finished, skipped") == 1
    assert _trace(out) == _trace(fsdp_run["run"])
    a, b = stage_adapters(out), stage_adapters(fsdp_run["run"])
    assert all(torch.equal(a[s][k], b[s][k]) for s in b for k in b[s])


def test_fsdp_refuses_a_method_with_forward_passes_of_its_own(data_dir, tmp_path):
    rc, _, err = _run2(tiny_args(tmp_path / "run", data_dir, method="lwf", fsdp=True), tmp_path / "logs", timeout=120)
    assert rc not in (0, None)
    assert err.count("aimmerging: error: fsdp: method lwf runs forward passes of its own") == 1
    assert "src/aimmerging/" not in err  # no traceback from the workers (the launcher prints its own)


def test_accelerate_cpu_launch_of_one_process_is_reported(monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level(logging.WARNING, logger="aimmerging"):
        runner_module._warn_single_cpu_process(1)
    assert "running as a single process" in caplog.text
    caplog.clear()
    monkeypatch.delenv("MASTER_ADDR")  # --num_processes 1: nothing to say
    with caplog.at_level(logging.WARNING, logger="aimmerging"):
        runner_module._warn_single_cpu_process(1)
    assert caplog.text == ""


def test_sharded_parallelism_is_refused_and_cpu_processes_join_with_gloo(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from aimmerging.errors import ConfigError

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):  # FSDP runs through --fsdp, not accelerate's
        with pytest.raises(ConfigError, match="is not supported"):
            runner_module.check_data_parallel(SimpleNamespace(distributed_type=kind))
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        runner_module.check_data_parallel(SimpleNamespace(distributed_type=kind))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runner_module._cpu_processes() is False  # a single process: accelerate's own choice
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert runner_module._cpu_processes() is (not torch.accelerator.is_available())
