"""DPG-Bench, the ELLA paper's benchmark: its CSV, its scoring (as the official script and as
it should be), resumable and sharded VQA answering. `python -m ella_jax.dpg_bench --help`."""

from ella_jax.dpg_bench.evaluate import evaluate
from ella_jax.dpg_bench.questions import BenchmarkError, Prompt, Question, read_benchmark
from ella_jax.dpg_bench.scoring import benchmark_scores, score_prompt

__all__ = [
    "BenchmarkError",
    "Prompt",
    "Question",
    "benchmark_scores",
    "evaluate",
    "read_benchmark",
    "score_prompt",
]
