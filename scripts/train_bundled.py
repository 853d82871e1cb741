"""Train the bundled models and write their weights and metadata into the package.

    python scripts/train_bundled.py                      # every model -> tl_circuits/bundled/data/
    python scripts/train_bundled.py induction-2l --out /tmp/bundled
    python scripts/train_bundled.py --analyse-only       # rewrite the JSON from the saved weights

Deterministic (seeded, torch.use_deterministic_algorithms, one thread): on the same torch version
and CPU kind it reproduces the shipped files. CPU only; a few minutes per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's code trains the models written into this checkout

from tl_circuits.bundled.training import BUNDLED_CONFIGS, reanalyse_saved, train_and_save  # noqa: E402

DEFAULT_OUT = ROOT / "tl_circuits" / "bundled" / "data"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to train (default: all of {', '.join(BUNDLED_CONFIGS)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package's data/)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--analyse-only", action="store_true",
                        help="do not train: re-run the analysis on the weights already in --out and rewrite the JSON")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BUNDLED_CONFIGS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(BUNDLED_CONFIGS)}")
    for name in args.names or list(BUNDLED_CONFIGS):
        start = time.perf_counter()
        if args.analyse_only:
            record = reanalyse_saved(BUNDLED_CONFIGS[name], args.out)
        else:
            record = train_and_save(BUNDLED_CONFIGS[name], args.out, progress=not args.quiet)
        print(f"{name}: {time.perf_counter() - start:.0f} s, metrics {json.dumps(record['metrics'])}, "
              f"known heads {record['known_heads']}, control {record['control_heads']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
