"""Metrics: JSONL + TensorBoard rows (JsonlLogger) and the loss-curve PNG.

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s, where
  achieved = ModelConfig.flops_per_token(seq_len) (6 x active matmul weights + attention, PaLM's
             formula; mmfm/models/config.py) x tokens processed per second (all ranks), and
  peak     = train.peak_flops per process x processes; when 0, it is measured at start as the
             best FLOP/s of a few 512 x 512 matmul probes in the run's dtype in that process (so on
             CPU MFU says how close the step comes to this machine's dense matmul speed, not to a
             datasheet), and re-probed when an MFU would exceed 1 (mmfm/train/engine.py: PeakFlops);
             each row logs `peak_flops` and `peak_flops_source` (config, measured, reprobed).

Peak memory (`peak_memory`, every log row, rank 0's process): on CUDA the caching allocator's
peak of allocated bytes on the current device since the process started (torch.cuda.
max_memory_allocated: tensors only, not the allocator's reserve or the CUDA context); on CPU the
process' peak resident set size (getrusage ru_maxrss: everything the process touched, Python,
torch, DeepSpeed and data included, not only tensors). `peak_memory_kind` says which.
"""
from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw

COLORS = [(30, 90, 200), (200, 60, 40), (40, 150, 60), (150, 60, 170), (220, 140, 0), (0, 150, 150), (120, 120, 120),
          (0, 0, 0), (230, 90, 160), (120, 80, 20)]


def loss_plot(path: str, series: dict[str, tuple[list, list]], title: str, size=(640, 400), xlabel: str = "step") -> None:
    """series: name -> (steps, values); one line each, legend top-right, y range from the data."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 120, 30, h - 40
    d.rectangle([left, top, right, bottom], outline="black")
    xs = [x for s, _ in series.values() for x in s] or [0, 1]
    ys = [y for _, v in series.values() for y in v if y == y] or [0, 1]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
    for i, (name, (s, v)) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        pts = [(px(x), py(y)) for x, y in zip(s, v) if y == y]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=c)
        d.text((right + 8, top + 14 * i), name, fill=c)
    d.text((left, 8), title, fill="black")
    d.text((left - 5, bottom + 6), str(x0), fill="black")
    d.text((right - 20, bottom + 6), str(x1), fill="black")
    d.text(((left + right) // 2 - 10, h - 18), xlabel, fill="black")
    d.text((4, top), f"{y1:.3g}", fill="black")
    d.text((4, bottom - 10), f"{y0:.3g}", fill="black")
    img.save(path)


def prompt_plot(rows: list[dict], path: str) -> bool:
    """The prompt-following accuracies logged during training (prompts/<modality>/<task>, by
    mmfm.eval.training) against the step, one line per task -> path. False when none were logged."""
    keys = sorted({k for r in rows for k in r if k.startswith("prompts/") and not k.endswith(("/rel_l2", "/ppl"))})
    series = {}
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        series[k[len("prompts/"):]] = ([s for s, _ in pts], [v for _, v in pts])
    if series:
        loss_plot(path, series, "prompt following during training (accuracy, eval_prompts.n per task)", size=(760, 420))
    return bool(series)


def peak_memory() -> dict:
    """{"peak_memory_mb": float, "peak_memory_kind": "cuda_max_allocated" | "cpu_peak_rss"} (module docstring)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2 ** 20, "peak_memory_kind": "cuda_max_allocated"}
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # Linux: kilobytes
    return {"peak_memory_mb": kb / 1024, "peak_memory_kind": "cpu_peak_rss"}


class JsonlLogger:
    """Appends {"step": s, **metrics} lines to a JSONL file and, if available, to TensorBoard."""

    def __init__(self, path: str, tensorboard_dir: str | None = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tensorboard_dir)
            except ImportError:  # tensorboard is a dependency, but the loop must not need it
                self.tb = None

    def __call__(self, step: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
