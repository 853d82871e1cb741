"""The support table of docs/support.md: every architecture of tests/architectures/zoo.py, built locally with tiny
random weights, bridged by the installed TransformerLens, and put through the same checks as
tests/architectures (references that use nothing of tl_circuits):

- **bridge**: TransformerLens builds the bridge and its logits equal the HF model's (else TransformerLens's error);
- **freeze**: every circuit × replacement equals HF's attention edited by hand; other heads bit-identical;
- **gradients**: per-sample gradients equal a per-sample ``loss.backward()`` loop on the HF model, sliced by hand;
- **interference / sweep / unchanged**: ``compute_interference`` and ``freeze_sweep`` run, a sweep cell equals its
  freeze, and no call changes the bridge's parameters, storage, ``.grad``, hooks, mode or outputs;
- **restart**: ``run_from_layer`` equals the full forward, and the sweep, which restarts each layer that way, equals
  one full frozen forward per cell (ZERO).

Run from the repository root: ``python scripts/support_matrix.py [--only NAME ...] [--out FILE]``. It prints a
Markdown table (and writes it to ``--out``); a failing check shows the first line of its error.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tests/ and tl_circuits/

import torch  # noqa: E402

from tests.architectures import test_architectures as checks  # noqa: E402
from tests.architectures import zoo  # noqa: E402
from tests.freezing import test_sweep_restart as sweep_restart_checks  # noqa: E402
from tests.models import test_bridge_forward as restart_checks  # noqa: E402


def _restart(name: str) -> None:
    restart_checks.test_restart_equals_the_full_forward(name)
    sweep_restart_checks.test_restarted_sweep_equals_one_full_frozen_forward_per_cell(name, "zero")


CHECKS = {
    "freeze": checks.test_every_freeze_equals_hand_edited_hf_attention,
    "gradients": checks.test_gradients_equal_a_backward_loop_on_the_hf_model,
    "interference, sweep, unchanged": checks.test_interference_and_sweep_run_and_leave_the_bridge_unchanged,
    "restart": _restart,
}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:140].replace("|", "\\|")


def bridge_status(name: str) -> str:
    """'✓' when TransformerLens bridges the architecture and the logits match, else TransformerLens's error."""
    try:
        model, hf = zoo.bridge(name), zoo.build(name)
        tokens = zoo.tokens()
        with torch.no_grad():
            close = torch.allclose(model(tokens), hf(tokens).logits, atol=1e-4)
        return "✓" if close else "✗ logits differ from HF's"
    except Exception as error:  # noqa: BLE001 - TransformerLens's own error is the entry
        return f"✗ TransformerLens: {_first_line(error)}"


def row(name: str) -> list[str]:
    status = bridge_status(name)
    cells = [f"`{name}`", zoo.ARCHS[name].notes.replace("|", "\\|"), status]
    for check in CHECKS.values():
        if status != "✓":
            cells.append("—")
            continue
        try:
            check(name)
            cells.append("✓")
        except Exception as error:  # noqa: BLE001 - the table reports every failure
            cells.append(f"✗ {_first_line(error)}")
    return cells


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="architecture class names (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from importlib.metadata import version

    names = args.only or list(zoo.ARCHS)
    header = ["architecture", "attention", "bridge", *CHECKS]
    lines = [f"TransformerLens {version('transformer-lens')}, transformers {version('transformers')}, "
             f"torch {torch.__version__}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    start = time.time()
    failures = 0
    for name in names:
        cells = row(name)
        failures += sum(cell.startswith("✗") for cell in cells)
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += ["", f"{len(names)} architectures, {failures} failed checks, {time.time() - start:.0f} s"]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
