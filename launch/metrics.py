"""Metric writers: WORKDIR/metrics.jsonl (one JSON object per logged step), TensorBoard (tensorboardX,
no TensorFlow needed) and a console progress line. Only process 0 writes."""
import json
import math
import os
import time

import jax
import numpy as np
from tensorboardX import SummaryWriter


def _to_python(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class MetricWriter:
    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        if self.active:
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(self.path, "a")

    def write(self, step: int, metrics: dict):
        if not self.active or not metrics:
            return
        row = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def close(self):
        if self.active:
            self._tb.close()
            self._jsonl.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """Console line with steps/s and ETA, measured between consecutive reports."""

    def __init__(self, first_step: int, total_steps: int):
        self.total_steps = total_steps
        self._last = (first_step, time.perf_counter())

    def report(self, step: int, metrics: dict) -> float:
        now = time.perf_counter()
        steps_per_s = (step - self._last[0]) / max(now - self._last[1], 1e-9)
        self._last = (step, now)
        if jax.process_index() == 0:
            # Grouped metrics ("choice_frac/0") go to the files only, to keep the line short.
            shown = " | ".join(f"{k} {float(v):.4g}" for k, v in metrics.items()
                               if np.size(v) == 1 and "/" not in k)
            eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
            print(f"step {step}/{self.total_steps} | {shown} | {steps_per_s:.2f} steps/s | "
                  f"ETA {_duration(eta)}", flush=True)
        return steps_per_s


def eval_summary(workdir: str) -> str:
    """First and last value of every evaluation metric in metrics.jsonl (eval rows carry no train loss);
    step 0 is the random initialisation when config.eval_at_start is on."""
    first, last = {}, {}
    for row in read_metrics(workdir):
        if "loss" in row:
            continue
        for key, value in row.items():
            if key != "step":
                first.setdefault(key, (row["step"], value))
                last[key] = (row["step"], value)
    return "\n".join(f"{key}: {first[key][1]:.4f} at step {first[key][0]} -> {last[key][1]:.4f} at step "
                     f"{last[key][0]}" for key in first)
