"""Reference distribution summaries for drift detection (`reference/stats.json`).

For every model input and output: count, mean, std, min, max, quantiles, and decile bin edges with
the fraction of validation values in each bin, the expected distribution that the device agent's
population stability index (PSI) compares live traffic against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUANTILES = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]
BINS = 10


def summarize(values: np.ndarray) -> dict[str, Any]:
    flat = np.asarray(values, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return {"count": 0}
    edges = np.unique(np.quantile(flat, np.linspace(0, 1, BINS + 1)))
    if edges.size < 2:
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    # Open the outer bins so live values outside the reference range still land in a bin.
    counts, _ = np.histogram(np.clip(flat, edges[0], edges[-1]), bins=edges)
    fractions = counts / counts.sum()

    def r(x: float) -> float:
        return float(np.format_float_positional(np.float64(x), precision=8, unique=True, trim="-"))

    return {
        "count": int(flat.size),
        "mean": r(flat.mean()),
        "std": r(flat.std()),
        "min": r(flat.min()),
        "max": r(flat.max()),
        "quantiles": {str(q): r(v) for q, v in zip(QUANTILES, np.quantile(flat, QUANTILES))},
        "bin_edges": [r(e) for e in edges],
        "bin_fractions": [r(f) for f in fractions],
    }


def reference_stats(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], source: str) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "method": "psi",
        "method_doc": "population stability index over the decile bins below; the outer bins are open-ended",
        "source": source,
        "inputs": {name: summarize(array) for name, array in sorted(inputs.items())},
        "outputs": {name: summarize(array) for name, array in sorted(outputs.items())},
    }
