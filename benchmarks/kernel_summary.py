"""Device kernels per plan from a ``planner.py --profile DIR`` trace: count, time, idle gaps, top kernels by time.

``benchmarks/planner.py --profile DIR`` traces three plans after the timed ones
(``jax.profiler.trace`` with a Perfetto trace). This reads
``DIR/plugins/profile/*/perfetto_trace.json.gz`` and prints, for every device
stream (GPU), the kernels per plan, their busy time per plan, the idle gaps
between them, and the kernels that take the most time; on CPU, where there are
no device streams, it prints the busy time of each host thread.

    python benchmarks/kernel_summary.py DIR [--plans 3] [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path


def load_events(trace_dir: Path) -> tuple[list[dict], dict, dict]:
    """Complete events, process names and thread names of the newest trace under ``trace_dir``."""
    traces = sorted(trace_dir.glob("plugins/profile/*/perfetto_trace.json.gz"))
    if not traces:
        raise FileNotFoundError(f"{trace_dir}: no plugins/profile/*/perfetto_trace.json.gz "
                                f"(write one with benchmarks/planner.py --profile {trace_dir})")
    with gzip.open(traces[-1]) as handle:
        events = json.load(handle)["traceEvents"]
    processes, threads = {}, {}
    for event in events:
        if event.get("ph") == "M" and event["name"] == "process_name":
            processes[event["pid"]] = event["args"]["name"]
        elif event.get("ph") == "M" and event["name"] == "thread_name":
            threads[(event["pid"], event["tid"])] = event["args"]["name"]
    return [event for event in events if event.get("ph") == "X"], processes, threads


def summarise(trace_dir: Path, plans: int, top: int) -> str:
    events, processes, threads = load_events(trace_dir)
    by_thread = collections.defaultdict(list)
    for event in events:
        by_thread[(event["pid"], event.get("tid"))].append(event)
    lines = []
    for (pid, tid), group in sorted(by_thread.items(), key=lambda item: str(processes.get(item[0][0]))):
        group.sort(key=lambda event: event["ts"])
        busy = sum(event["dur"] for event in group)  # microseconds
        where = f"{processes.get(pid, pid)} | {threads.get((pid, tid), tid)}"
        if "/device:" not in str(processes.get(pid)):
            lines.append(f"{where}: busy {busy / 1e3 / plans:.3f} ms per plan")
            continue
        gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(group, group[1:])]
        inside = sorted(gap for gap in gaps if 0 < gap < 1000)  # gaps of 1 ms or more lie between plans
        lines.append(f"{where}: {len(group) / plans:.0f} kernels, busy {busy / 1e3 / plans:.3f} ms per plan; "
                     f"gaps inside plans {sum(inside) / 1e3 / plans:.3f} ms per plan")
        totals = collections.defaultdict(lambda: [0, 0.0])
        for event in group:
            totals[event["name"]][0] += 1
            totals[event["name"]][1] += event["dur"]
        for name, (count, total) in sorted(totals.items(), key=lambda item: -item[1][1])[:top]:
            lines.append(f"  {count / plans:6.0f} x {total / count:6.2f} us = {total / 1e3 / plans:6.3f} ms  {name}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir", type=Path, help="the DIR given to planner.py --profile")
    parser.add_argument("--plans", type=int, default=3, help="plans in the trace (planner.py traces 3)")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per stream")
    args = parser.parse_args(argv)
    if args.plans < 1:
        parser.error(f"--plans must be at least 1, got {args.plans}")
    try:
        print(summarise(args.trace_dir, args.plans, args.top))
    except FileNotFoundError as error:
        print(f"kernel_summary: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
