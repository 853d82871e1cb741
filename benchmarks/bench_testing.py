"""What tl_circuits' pytest plugin costs a project that does not use it, and how long the tiny models take to build.

1. **Collection overhead.** A throwaway project (``--files`` test files of 5 trivial tests each, no use of the
   plugin) is collected (``pytest --collect-only -q``) in fresh processes, alternately with the plugin
   (``-p pytest_tl_circuits``; a no-op where the entry point loads it) and without it
   (``-p no:pytest_tl_circuits``): the baseline is the same command without the plugin. Prints the median and
   minimum wall and CPU time of each and their difference. Goal: no measurable difference (the plugin imports
   only pytest).
2. **Tiny models.** ``tl_circuits.testing.tiny_model`` of each architecture (bridge), beside
   ``tiny_hf_model`` alone (HF's own construction: the baseline). Goal: well under a second each.

    python benchmarks/bench_testing.py               # 15 runs each, 20 files; every architecture
    python benchmarks/bench_testing.py --smoke       # seconds: 3 runs, 2 files, 3 architectures

Run from the repository root (the checkout's plugin and package are put first on PYTHONPATH). Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's tl_circuits, not an installed one
TRIVIAL = "import pytest\n\n" + "".join(f"def test_{i}(tmp_path):\n    assert tmp_path\n\n\n" for i in range(5))


def _collect_seconds(project: Path, flag: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one collection in a fresh process; CPU time (user + system) suffers less from load."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", flag],
                   cwd=project, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def collection_overhead(runs: int, files: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tlc_bench_project_") as folder:
        project = Path(folder)
        for i in range(files):
            (project / f"test_plain_{i}.py").write_text(TRIVIAL)
        times: dict[str, list[tuple[float, float]]] = {"pytest_tl_circuits": [], "no:pytest_tl_circuits": []}
        _collect_seconds(project, "no:pytest_tl_circuits")  # warm the file system caches
        for _ in range(runs):  # alternate, so that drifting machine load hits both alike
            for flag in times:
                times[flag].append(_collect_seconds(project, flag))
    print(f"collection of {files * 5} trivial tests in {files} files, {runs} runs each (fresh processes):")
    medians = {}
    for flag, values in times.items():
        label = "with the plugin   " if flag == "pytest_tl_circuits" else "without (baseline)"
        wall, cpu = zip(*values)
        medians[flag] = (statistics.median(wall), statistics.median(cpu))
        print(f"  {label}: wall median {medians[flag][0]:.3f} s (min {min(wall):.3f}), "
              f"CPU median {medians[flag][1]:.3f} s (min {min(cpu):.3f})")
    (wall_with, cpu_with), (wall_without, cpu_without) = medians.values()
    print(f"  difference of medians: wall {wall_with - wall_without:+.3f} s ({wall_with / wall_without:.3f}x), "
          f"CPU {cpu_with - cpu_without:+.3f} s ({cpu_with / cpu_without:.3f}x)")


def build_times(names: list[str], runs: int) -> None:
    import torch

    from tl_circuits.testing import tiny_hf_model, tiny_model

    torch.set_num_threads(1)
    tiny_model(names[0])  # first-call imports out of the timings
    print(f"\ntiny models, median of {runs} builds (1 torch thread): architecture, HF model alone, tiny_model (bridge)")
    for name in names:
        hf, bridge = [], []
        for _ in range(runs):
            start = time.perf_counter()
            tiny_hf_model(name)
            hf.append(time.perf_counter() - start)
            start = time.perf_counter()
            tiny_model(name)
            bridge.append(time.perf_counter() - start)
        print(f"  {name:24s} {statistics.median(hf):.3f} s   {statistics.median(bridge):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: a few runs, few architectures")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--files", type=int, default=None)
    args = parser.parse_args()
    runs = args.runs or (3 if args.smoke else 15)
    files = args.files or (2 if args.smoke else 20)
    collection_overhead(runs, files)
    from tl_circuits.testing import TINY_ARCHITECTURES

    names = ["GPT2LMHeadModel", "LlamaForCausalLM", "BloomForCausalLM"] if args.smoke else list(TINY_ARCHITECTURES)
    build_times(names, 2 if args.smoke else 5)


if __name__ == "__main__":
    main()
