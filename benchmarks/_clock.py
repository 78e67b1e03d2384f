"""The benchmarks' clock: wall time by default; ``BENCH_CLOCK=cpu`` uses this process's CPU time (all threads).

On a machine shared with other work a niced benchmark waits for the CPU for unpredictable stretches, which wall
time counts and CPU time does not; the side-by-side ratios then stay meaningful. benchmarks/sdxl.py sets it.
"""

import os
import time

CPU_TIME = os.environ.get("BENCH_CLOCK", "wall") == "cpu"
now = time.process_time if CPU_TIME else time.perf_counter
UNIT = "CPU seconds (process time, all threads)" if CPU_TIME else "wall-clock seconds"
