"""What an export raises, and the comparisons that verify a written export against the
in-memory model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class ExportError(ValueError):
    """The export cannot be done as asked (format, output directory, task)."""


class ExportVerificationError(RuntimeError):
    """A written export does not reproduce the model: nothing was moved into place."""


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| in float64 (0 for empty arrays); inf when the shapes differ."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0)) if a.shape == b.shape else float("inf")


def verify_arrays(fmt: str, what: str, got: Mapping[str, np.ndarray],
                  want: Mapping[str, np.ndarray], atol: float = 0.0) -> float:
    """Every array of `want` in `got` with its shape (and within `atol`); the max difference.
    Raises ExportVerificationError naming `fmt`, `what` and the worst array."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ExportVerificationError(
            f"{fmt}: {what} has {len(missing)} missing and {len(extra)} extra arrays (missing "
            f"{missing[:3]}, extra {extra[:3]}).")
    diffs = {k: max_abs_diff(got[k], want[k]) for k in want}
    bad = {k: d for k, d in diffs.items() if not d <= atol
           or np.shape(got[k]) != np.shape(want[k])}
    if bad:
        k = max(bad, key=bad.get)
        raise ExportVerificationError(
            f"{fmt}: {what} differs from the checkpoint's params in {len(bad)} arrays; max |diff| "
            f"{bad[k]:.3g} at {k!r} (shapes {np.shape(got[k])} vs {np.shape(want[k])}, "
            f"tolerance {atol:g}).")
    return max(diffs.values(), default=0.0)


def verify_outputs(fmt: str, what: str, got: Mapping[str, Any], want: Mapping[str, Any],
                   rtol: float, atol: float) -> float:
    """Outputs equal within |got - want| <= atol + rtol |want|; the max |diff|. Raises
    ExportVerificationError naming `fmt`, `what` and the first output that differs."""
    if set(got) != set(want):
        raise ExportVerificationError(f"{fmt}: {what} gives outputs {sorted(got)}, the model "
                                      f"{sorted(want)}.")
    worst = 0.0
    for name in want:
        g, w = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
        if g.shape != w.shape:
            raise ExportVerificationError(f"{fmt}: {what}: output {name!r} has shape {g.shape}, "
                                          f"the model's {w.shape}.")
        diff = max_abs_diff(g, w)
        worst = max(worst, diff)
        if not np.all(np.abs(g - w) <= atol + rtol * np.abs(w)):
            raise ExportVerificationError(
                f"{fmt}: {what}: output {name!r} differs from the in-memory model by max |diff| "
                f"{diff:.3g} (rtol {rtol:g}, atol {atol:g}).")
    return worst
