"""``aimmerging bench``: every method on one stream and model, side by side (``runner``), the
throughput study of the training step (``throughput``) and the report (``report``). Imports no
CLI code; each method runs in a worker process (``worker``)."""

from .report import bench_markdown, build_report, plot_report
from .runner import comparable_methods, load_bench_config, run_bench

__all__ = ["bench_markdown", "build_report", "comparable_methods", "load_bench_config", "plot_report", "run_bench"]
