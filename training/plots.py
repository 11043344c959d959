"""The loss-curve picture, for users who do not run TensorBoard: read back from a run's TensorBoard folder.

    python eval.py --plot runs/demo          # writes runs/demo/loss.png; pretrain.py and finetune.py do it at the end

Top: training loss and validation loss (and each source's, thin) against tokens seen. Bottom: tokens/s per GPU.
Tags are those of training/metrics.py (train/loss, train/tokens_seen, train/tokens_per_s_per_gpu, val/loss,
val/<source>/loss). A resumed run's several event files read as one run; a step logged twice keeps its last value.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .metrics import TAGS

PNG_NAME = "loss.png"


def read_scalars(log_dir: str | os.PathLike) -> dict[str, dict[int, float]]:
    """Every scalar tag under log_dir: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    folders = sorted({events.parent for events in Path(log_dir).rglob("events.out.tfevents.*")})
    scalars: dict[str, dict[int, float]] = {}
    for folder in folders:
        accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every point
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return scalars


def plot_run(log_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the picture of the run logged in log_dir (default: log_dir/loss.png); returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    scalars = read_scalars(log_dir)
    if TAGS["loss"] not in scalars:
        raise ValueError(f"{log_dir}: no '{TAGS['loss']}' scalars; expected the -t folder of a training run")
    tokens = scalars.get(TAGS["tokens_seen"], {})

    def series(tag):
        steps = np.array(sorted(scalars[tag]), dtype=np.float64)
        values = np.array([scalars[tag][s] for s in sorted(scalars[tag])])
        if not tokens:
            return steps, values
        known = np.array(sorted(tokens), dtype=np.float64)
        return np.interp(steps, known, [tokens[s] for s in sorted(tokens)]), values  # step -> tokens seen

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(2, 1))
    top.plot(*series(TAGS["loss"]), label="training loss", color="tab:blue", linewidth=1.2)
    if TAGS["val_loss"] in scalars:
        top.plot(*series(TAGS["val_loss"]), label="validation loss", color="tab:red", marker="o", linewidth=2)
    per_source = sorted(t for t in scalars if t.startswith("val/") and t.endswith("/loss") and t != TAGS["val_loss"])
    colors = ["tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
    for k, tag in enumerate(per_source):  # colours apart from the training (blue) and validation (red) lines
        top.plot(*series(tag), label=f"validation: {tag[4:-5]}", linestyle="--", linewidth=0.9,
                 color=colors[k % len(colors)])
    top.set_ylabel("loss (nats per token)")
    top.set_title(f"{Path(log_dir).resolve().name}: loss against tokens seen")
    top.grid(alpha=0.3)
    top.legend()
    if TAGS["tokens_per_s_per_gpu"] in scalars:
        bottom.plot(*series(TAGS["tokens_per_s_per_gpu"]), color="tab:green", linewidth=1.2)
    bottom.set_ylabel("tokens/s per GPU")
    bottom.set_xlabel("tokens seen" if tokens else "step")
    bottom.grid(alpha=0.3)
    bottom.xaxis.set_major_formatter(EngFormatter())
    bottom.yaxis.set_major_formatter(EngFormatter())
    fig.tight_layout()
    out = Path(out) if out is not None else Path(log_dir) / PNG_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_at_end(log_dir: str | None, is_main: bool, print_fn=print) -> None:
    """The end of pretrain.py / finetune.py: write the picture on rank 0, or say why there is none."""
    if not is_main or not log_dir:
        return
    try:
        print_fn(f"loss curves: {plot_run(log_dir)}")
    except ImportError:
        print_fn("no loss-curve picture: matplotlib is not installed (pip install matplotlib)")
    except ValueError as error:
        print_fn(f"no loss-curve picture: {error}")
