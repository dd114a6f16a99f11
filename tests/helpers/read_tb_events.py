#!/usr/bin/env python3
"""Reads a TensorBoard run directory with TensorBoard's own loader and prints its data as JSON
{tag: [[step, value], ...]}: scalars as floats (non-finite ones as "nan", "inf", "-inf"), text
summaries as strings. Used by tests/tensorboard_read.rs; usage: read_tb_events.py RUN_DIR."""
import json
import math
import sys

from tensorboard.backend.event_processing.event_accumulator import (
    SCALARS,
    TENSORS,
    EventAccumulator,
)
from tensorboard.util import tensor_util


def scalar(value):
    return value if math.isfinite(value) else str(value)


def main(run_dir):
    # size_guidance 0 = keep every point (the default samples them).
    acc = EventAccumulator(run_dir, size_guidance={SCALARS: 0, TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    out = {}
    for tag in tags["scalars"]:
        out[tag] = [[e.step, scalar(e.value)] for e in acc.Scalars(tag)]
    for tag in tags["tensors"]:
        out[tag] = [
            [e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()]
            for e in acc.Tensors(tag)
        ]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
