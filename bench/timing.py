"""Wall-clock timing shared by the benchmarks."""

import statistics
import time
from collections.abc import Callable


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median seconds of `run()` over `repeats` calls, after one warm-up call (and
    compilation). `run` must return only when its work is done (block or synchronise)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
