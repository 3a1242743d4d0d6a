"""The Python API: :func:`run` a method through a task stream, from a notebook or a script.

    import aimmerging
    stream = aimmerging.TaskStream.from_examples({
        "task-a": {"train": [{"input": "...", "output": "..."}, ...], "test": [...]},
        "task-b": {...},
    })
    result = aimmerging.run(stream, method="aimmerging", model="tiny-causal", max_steps=8)
    result.accuracy_matrix, result.metrics["bwt"], result.model   # the trained PEFT model
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

from .config import build_config
from .data.stream import TaskStream
from .errors import ConfigError
from .logs import quiet_library_warnings
from .methods import Method
from .runs.results import RunResult
from .runs.rundir import RunDirectory
from .runs.runner import Runner

_NOT_SETTINGS = {"method", "model", "output_dir", "tasks", "benchmark", "data_dir", "order"}


def as_stream(stream: Any, *, input_field: str | None = None, output_field: str | None = None,
              tokenizer: Any = None) -> TaskStream | None:
    """A TaskStream from a TaskStream, a mapping ``{task: {split: rows}}``, or None (the stream
    is then named by the settings: ``benchmark``/``tasks`` and ``data_dir``). The rows of a mapping
    are read as ``--data`` reads a file's rows (``aimmerging.data.files.stream_from_rows``): plain
    rows with ``input_field``/``output_field`` columns, or chat rows with ``messages`` (rendered
    with ``tokenizer``'s chat template when it has one; a zero-argument loader is called only then)."""
    if stream is None or isinstance(stream, TaskStream):
        return stream
    if isinstance(stream, Mapping):
        from .data.files import stream_from_rows

        return stream_from_rows(stream, input_field=input_field, output_field=output_field, tokenizer=tokenizer)
    raise ConfigError(f"stream: expected a TaskStream or a mapping {{task: {{split: examples}}}}, got {type(stream).__name__}")


def run(stream: Any = None, method: str | type[Method] | Method = "seq", model: Any = "smollm2-135m",
        output_dir: str | os.PathLike | None = None, **settings: Any) -> RunResult:
    """Train ``method`` through ``stream`` and evaluate it after every task.

    Args:
        stream: a :class:`TaskStream`, a mapping ``{task: {"train": [...], "test": [...], "dev": [...]}}``
            of rows (``{"input", "output"}`` dicts, other column names with the ``input_field`` /
            ``output_field`` settings, chat rows ``{"messages": [...]}``: the rows ``--data`` reads)
            or ``datasets.Dataset`` objects, or None to name the stream by settings
            (``benchmark="standard-cl", data_dir=...`` or ``tasks=[...]``).
        method: a registered name, an import path ``module:Class``, a Method subclass or instance
            (``None`` is an error: leave it out for the default, ``"seq"``).
        model: an alias (``smollm2-135m``, ``tiny-causal``, ``tiny-seq2seq``), a GGUF file, a local directory,
            a hub id, or an already loaded ``(model, tokenizer)`` pair (LoRA is attached to it in place).
        output_dir: with a directory (a ``str`` or ``os.PathLike``) the run behaves exactly like
            ``aimmerging run`` (resume included); with None nothing is written to disk.
        **settings: run options by their config names (``max_steps=8``, ``lr=2e-3``, ...); unknown
            names are rejected with the same one-line errors as the CLI.
    """
    _check_method(method)
    values = dict(settings)
    stream = as_stream(stream, input_field=_field_name(values, "input_field"),
                       output_field=_field_name(values, "output_field"), tokenizer=_tokenizer_loader(model, values))
    if stream is not None:
        clash = {"tasks", "benchmark", "data_dir", "data"} & set(values)
        if clash:
            raise ConfigError(f"{', '.join(sorted(clash))}: the stream is given; these settings name another one")
        values["tasks"] = stream.tasks
    loaded = None
    if isinstance(model, (tuple, list)):
        if len(model) != 2 or not _is_model(model[0]) or not _is_tokenizer(model[1]):
            raise ConfigError(f"model: expected an alias, a path, a hub id or a (model, tokenizer) pair, got "
                              f"({', '.join(type(m).__name__ for m in model)})")
        loaded = tuple(model)
        values["model"] = f"in-memory:{type(loaded[0]).__name__}"
    elif isinstance(model, (str, os.PathLike)):
        values["model"] = os.fspath(model)
    else:
        raise ConfigError(f"model: expected an alias, a path, a hub id or a (model, tokenizer) pair, got "
                          f"{type(model).__name__}")
    if output_dir is not None:
        if not isinstance(output_dir, (str, os.PathLike)):
            raise ConfigError(f"output_dir: expected a directory path (str or os.PathLike), got {type(output_dir).__name__}")
        values["output_dir"] = os.fspath(output_dir)
    values.setdefault("progress", False)
    cfg = build_config(overrides=values, source="settings", method=method)
    instance = method if isinstance(method, Method) else None
    run_dir = RunDirectory(values["output_dir"]) if output_dir is not None else None
    with warnings.catch_warnings():
        quiet_library_warnings()
        return Runner(cfg, stream=stream, model=loaded, method=instance, run_dir=run_dir).run()


def _field_name(values: Mapping[str, Any], name: str) -> str | None:
    """The column-name setting ``name`` (a non-empty string or None; else one ConfigError)."""
    value = values.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{name}: expected a column name, got {value!r}")
    return value


def _tokenizer_loader(model: Any, values: Mapping[str, Any]) -> Any:
    """What renders the prompts of chat rows: the given tokenizer, or a loader of the model's (called
    only when a chat row needs it)."""
    if isinstance(model, (tuple, list)):
        return model[1] if len(model) == 2 and _is_tokenizer(model[1]) else None
    if not isinstance(model, (str, os.PathLike)):
        return None

    def load() -> Any:
        from .models.loading import load_base_model

        return load_base_model(os.fspath(model), str(values.get("dtype", "float32")),
                               trust_remote_code=bool(values.get("trust_remote_code", False)))[1]

    return load


def _check_method(method: Any) -> None:
    """A method given to :func:`run` is a name, a Method subclass or a Method instance (else one
    ConfigError, not an AttributeError deep inside the config builder)."""
    if isinstance(method, (str, Method)) or (isinstance(method, type) and issubclass(method, Method)):
        return
    if method is None:
        raise ConfigError("method: None is not a method; leave method out for the default ('seq') or name one")
    what = f"the class {method.__name__}" if isinstance(method, type) else f"{method!r} ({type(method).__name__})"
    raise ConfigError(f"method: expected a registered name, an import path module:Class, a Method subclass or "
                      f"instance, got {what}")


def _is_model(obj: Any) -> bool:
    """A loaded (transformers-like) model: a torch module with a ``config``."""
    return callable(getattr(obj, "named_parameters", None)) and hasattr(obj, "config")


def _is_tokenizer(obj: Any) -> bool:
    return callable(obj) and callable(getattr(obj, "decode", None))
