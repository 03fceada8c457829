"""What every build-project testbed shares: the edgepack.yaml it writes and its `python -m` command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import yaml

PRECISIONS = ["fp32", "fp16", "int8"]


def write_config(out_dir: Path, *, name: str, version: str, model: str, metric: str, inputs: dict[str, list[int]] | None = None,
                 max_accuracy_drop: float | None = None) -> Path:
    """edgepack.yaml for a project whose calib.npz and val.npz lie beside it; returns its path."""
    config: dict[str, Any] = {"name": name, "version": version, "model": model}
    if inputs:
        config["inputs"] = inputs
    config |= {"data": {"calibration": "calib.npz", "validation": "val.npz"}, "metric": metric}
    if max_accuracy_drop is not None:
        config["gates"] = {"max_accuracy_drop": max_accuracy_drop}
    config["optimize"] = {"precisions": list(PRECISIONS)}
    path = out_dir / "edgepack.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=None), encoding="utf-8")
    return path


def project_main(argv: list[str] | None, *, prog: str, description: str, make_project: Callable[..., Path], n_calib: int,
                 n_val: int, options: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """`python -m testbeds.X OUT_DIR [--n-calib N] [--n-val N] [--seed N] [options]`: writes the project and
    prints its config's path. `options` adds a testbed's own flags, passed to make_project by name."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-calib", type=int, default=n_calib)
    parser.add_argument("--n-val", type=int, default=n_val)
    parser.add_argument("--seed", type=int, default=0)
    if options is not None:
        options(parser)
    args = vars(parser.parse_args(argv))
    print(make_project(args.pop("out_dir"), **args))
    return 0


__all__ = ["PRECISIONS", "project_main", "write_config"]
