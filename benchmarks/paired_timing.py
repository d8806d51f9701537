"""Paired step timing for the benchmarks that race two implementations of one step.

The two contestants run alternately, the order flipping every round, so that the noise of a
shared machine hits both alike; the report gives medians (wall and CPU time), every timed value
and the ratio of the first contestant to the second. ``profile_alternating`` runs the same rounds
under torch's profiler and sums each operator's own CPU time per contestant, to find where a
ratio comes from.
"""
import collections
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


def profile_alternating(contestants: Sequence[Tuple[str, Callable[[int], None]]], rounds: int,
                        top: int = 25) -> Dict[str, Dict[str, float]]:
    """Run ``rounds`` alternating rounds under ``torch.profiler`` (CPU); print the operators whose
    own CPU time, summed over the rounds, differs most between the first and the second
    contestant, the totals, and the process CPU time outside the operators. Returns
    ``{name: {operator: seconds}}``."""
    from torch.profiler import ProfilerActivity, profile

    totals = {name: collections.Counter() for name, _ in contestants}
    process = {name: 0.0 for name, _ in contestants}
    for r in range(rounds):
        order = contestants if r % 2 == 0 else contestants[::-1]
        for name, step in order:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                c = time.process_time()
                step(r)
                process[name] += time.process_time() - c
            for event in prof.key_averages():
                totals[name][event.key] += event.self_cpu_time_total / 1e6
    a, b = [name for name, _ in contestants]
    ops = sorted(set(totals[a]) | set(totals[b]), key=lambda k: -abs(totals[a][k] - totals[b][k]))
    print(f"\nown CPU time per operator over {rounds} profiled round(s), largest differences first")
    print(f"| operator | {a} s | {b} s | {a} - {b} s |\n|---|---|---|---|")
    for k in ops[:top]:
        print(f"| {k} | {totals[a][k]:.3f} | {totals[b][k]:.3f} | {totals[a][k] - totals[b][k]:+.3f} |")
    sa, sb = sum(totals[a].values()), sum(totals[b].values())
    print(f"| all operators | {sa:.3f} | {sb:.3f} | {sa - sb:+.3f} |")
    # the process's CPU time the operators do not account for: Python, the framework, the profiler
    oa, ob = process[a] - sa, process[b] - sb
    print(f"| process CPU time outside operators | {oa:.3f} | {ob:.3f} | {oa - ob:+.3f} |")
    return {name: dict(c) for name, c in totals.items()}
