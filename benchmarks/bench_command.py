"""Wall time of a whole ``python -m ctxseg ...`` command (train + evaluation, startup included) at
the current tree and at an earlier git revision, the two taking turns so that drift in machine load
hits both alike.

    python benchmarks/bench_command.py --baseline b9c8f8f --repeats 2 -- \\
        train --method ce --data camvid --data-root ../shared/data/camvid --crop 180 240 --batch-size 8 --iters 40

Each run writes into a fresh temporary folder (``--out`` is set by the script). The revision's
package is exported with ``git archive`` and imported first (ahead of the working tree), in the same
Python environment. Prints every run's seconds, the median of each tree and their ratio, the machine's
cores and the torch thread count (the command's own default unless OMP_NUM_THREADS is set).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, metavar="REV")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the ctxseg command and its flags")
    args = p.parse_args()
    command = [a for a in args.command if a != "--"]
    sys.path.insert(0, str(Path(__file__).parent))
    from baseline import short

    with tempfile.TemporaryDirectory(prefix="ctxseg-bench-command-") as tmp:
        tmp = Path(tmp)
        old = tmp / "tree"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "ctxseg"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        trees = {"current": str(ROOT), short(args.baseline): str(old)}
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"python -m ctxseg {' '.join(command)}")
        print(f"{cores} cores, load average {os.getloadavg()[0]:.2f}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        times = {k: [] for k in trees}
        for r in range(args.repeats):
            for name, path in trees.items():
                out = tmp / f"{name}-{r}"
                # ``python -m ctxseg`` would import the package from the working directory first.
                entry = f"import sys; sys.path.insert(0, {path!r}); from ctxseg.cli import main; sys.exit(main())"
                t = time.perf_counter()
                res = subprocess.run([sys.executable, "-c", entry, *command, "--out", str(out), "--no-progress"],
                                     cwd=ROOT, capture_output=True, text=True)
                seconds = time.perf_counter() - t
                if res.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
                times[name].append(seconds)
                print(f"  {name:>10} run {r + 1}: {seconds:6.1f} s", flush=True)
        cur = statistics.median(times["current"])
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f"{name:>10}: median {m:6.1f} s  ({m / cur:.2f}x the current tree's time)")


if __name__ == "__main__":
    main()
