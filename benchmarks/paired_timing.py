"""Paired step timing for the benchmarks that race two implementations of one step.

The two contestants run alternately, the order flipping every round, so that the noise of a
shared machine hits both alike; the report gives medians (wall and CPU time), every timed value
and the ratio of the first contestant to the second.
"""
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple


def run_alternating(contestants: Sequence[Tuple[str, Callable[[int], None]]], warmup: int,
                    timed: int) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Call each ``step(round)`` once per round; returns the timed wall and CPU seconds."""
    times = {name: [] for name, _ in contestants}
    cpu = {name: [] for name, _ in contestants}
    for r in range(warmup + timed):
        order = contestants if r % 2 == 0 else contestants[::-1]
        for name, step in order:
            t, c = time.perf_counter(), time.process_time()
            step(r)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if r >= warmup:
                times[name].append(dt)
                cpu[name].append(dc)
            print(f"round {r} {'(warmup) ' if r < warmup else ''}{name}: {dt:.3f} s wall, "
                  f"{dc:.3f} s CPU", flush=True)
    return times, cpu


def report(times: Dict[str, List[float]], cpu: Dict[str, List[float]]) -> Dict[str, float]:
    """Print the table and the ratio first / second; returns the median wall times."""
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print("\n| step | median wall s | median CPU s | timed wall (s) | timed CPU (s) |\n|---|---|---|---|---|")
    for k in times:
        print(f"| {k} | {med[k]:.3f} | {med_cpu[k]:.3f} | {', '.join(f'{x:.2f}' for x in times[k])} "
              f"| {', '.join(f'{x:.2f}' for x in cpu[k])} |")
    a, b = list(times)
    paired = [x / y for x, y in zip(times[a], times[b])]
    print(f"\nratio {a} / {b}: medians {med[a] / med[b]:.3f} (wall), {med_cpu[a] / med_cpu[b]:.3f} (CPU); "
          f"geometric mean of the per-round wall ratios {statistics.geometric_mean(paired):.3f}")
    return med
