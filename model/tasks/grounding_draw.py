"""Heatmap pictures of grounding results: people look at grounding, they do not read it.

One PNG per expression: the image in its box frame with the Grad-CAM map
(upsampled as the box ranking sees it) laid over it, the ground-truth box
(green, solid), the chosen proposal (red, dashed; absent when no proposal scored
above zero), the other proposals (thin white) and the expression with the
outcome as the title.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from model.grounding import IOU_HIT, upsample  # noqa: E402
from pipeline.annotations import load_rgb  # noqa: E402

TRUTH_COLOUR = "lime"
CHOSEN_COLOUR = "red"
PROPOSAL_COLOUR = "white"
HEAT_OPACITY = 0.7            # at the map's maximum; zero heat leaves the picture as it is


def _box(ax, box: Sequence[float], colour: str, width: float, style: str = "-") -> None:
    x, y, w, h = box[:4]
    ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=width, linestyle=style))


def draw_grounding(path: str | Path, image: Image.Image | str, frame: tuple[int, int] | None, heatmap: torch.Tensor,
                   expression: str, truth: Sequence[float], chosen: Sequence[float] | None,
                   proposals: Sequence[Sequence[float]] = (), iou: float | None = None) -> Path:
    """Write one PNG of `image` (RGB, or a file); `frame` = (height, width) of the boxes (None: the
    image's size), `heatmap` [g,g]."""
    image = load_rgb(image) if isinstance(image, str) else image
    height, width = frame or (image.height, image.width)
    image = np.asarray(image.resize((width, height)))
    full = upsample(heatmap, height, width).clamp(min=0).numpy()
    if full.max() > 0:
        full = full / full.max()
    scale = 6.0 / max(height, width)
    fig, ax = plt.subplots(figsize=(max(width * scale, 3.0), height * scale + 0.6))
    overlay = plt.get_cmap("jet")(full)                     # [H,W,4]; opaque where the map is strong
    overlay[..., 3] = HEAT_OPACITY * full
    ax.imshow(image)
    ax.imshow(overlay)
    for box in proposals:
        _box(ax, box, PROPOSAL_COLOUR, 0.6)
    _box(ax, truth, TRUTH_COLOUR, 2.0)
    if chosen is not None:
        _box(ax, chosen, CHOSEN_COLOUR, 2.0, "--")
    outcome = ("no proposal scored above 0 (miss)" if chosen is None
               else f"IoU {iou:.2f}: {'hit' if iou is not None and iou >= IOU_HIT else 'miss'}")
    ax.set_title(f"{expression}\n{outcome}   (green: truth, red dashed: chosen)", fontsize=9)
    ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
