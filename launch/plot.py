"""Command line: per-layer metrics against depth, several runs on one figure (PNG).

    python -m launch.plot --workdirs=workdirs/lm_pre,workdirs/lm_peri,workdirs/lm_post --out=docs/hidden_var.png

For each run (its metrics.jsonl), each metric family (`hidden_var`, `grad_norm`, ...: keys FAMILY/layer_XX)
gets one panel with one line per run: the value at --step (default: the run's last step that logged the
family) against the layer index. Log scale, as hidden-state variance spans orders of magnitude across
placements: the central picture of the Peri-LN paper.
"""
import os
import re

import matplotlib
from absl import app, flags

from launch import metrics

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Run workdirs, comma separated.", required=True)
_FAMILIES = flags.DEFINE_list("families", ["hidden_var", "grad_norm"], "Per-layer metric families.")
_STEP = flags.DEFINE_integer("step", None, "Step to plot (default: each run's last).")
_OUT = flags.DEFINE_string("out", "per_layer.png", "Output PNG.")


def per_layer(rows, family: str, step=None):
    """(step, [value per layer]) from metric rows holding FAMILY/layer_XX keys; None if absent."""
    pattern = re.compile(rf"^{re.escape(family)}/layer_(\d+)$")
    rows = [r for r in rows if any(pattern.match(k) for k in r) and (step is None or r["step"] == step)]
    if not rows:
        return None
    row = rows[-1]
    layers = sorted((int(m.group(1)), v) for k, v in row.items() if (m := pattern.match(k)))
    return row["step"], [v for _, v in layers]


def plot(workdirs, families, out, step=None):
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for ax, family in zip(axes[0], families):
        for workdir in workdirs:
            found = per_layer(metrics.read_metrics(workdir), family, step)
            if found is None:
                raise ValueError(f"{workdir}/metrics.jsonl has no {family}/layer_XX metrics"
                                 + (f" at step {step}" if step is not None else "") + ".")
            at, values = found
            ax.plot(range(len(values)), values, marker="o", label=f"{os.path.basename(workdir)} (step {at})")
        ax.set(xlabel="layer", ylabel=family, yscale="log", title=family)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    print(plot(_WORKDIRS.value, _FAMILIES.value, _OUT.value, _STEP.value))


if __name__ == "__main__":
    app.run(main)
