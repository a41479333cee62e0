"""Draw text queries beside their top retrieved images, from a saved evaluation.

Reads the score matrices that `python -m model.retrieval evaluate --save-scores`
writes (`t2i`: [n_texts, n_images]) and the annotation file it evaluated; the
ground-truth image of each query is framed in green, others in grey.

`python -m model.tasks.retrieval_grid --scores RESULT.npz --annotations test.json --image-root ROOT --out grid.png`
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.annotations import RetrievalEvalDataset  # noqa: E402
from pipeline.image_store import image_store  # noqa: E402

HIT, MISS = "#1a9850", "#bbbbbb"


def draw_grid(t2i: np.ndarray, dataset: RetrievalEvalDataset, out: Path, queries: int = 6, top: int = 5,
              seed: int = 0) -> Path:
    """One row per query: its text, then its `top` best images by score."""
    if t2i.shape != (len(dataset.texts), len(dataset.images)):
        raise ValueError(f"scores {t2i.shape} do not match the annotations "
                         f"({len(dataset.texts)} texts x {len(dataset.images)} images)")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(dataset.texts), size=min(queries, len(dataset.texts)), replace=False)
    fig, axes = plt.subplots(len(rows), top + 1, figsize=(2.0 * (top + 1), 2.1 * len(rows)), squeeze=False)
    for r, q in enumerate(rows):
        text_ax = axes[r][0]
        text_ax.axis("off")
        text_ax.text(0.0, 0.5, "\n".join(_wrap(dataset.texts[q], 22)), va="center", fontsize=9)
        for c, img in enumerate(np.argsort(-t2i[q], kind="stable")[:top], start=1):
            ax = axes[r][c]
            ax.imshow(dataset.store.load(dataset.images[img]))
            ax.set_xticks([])
            ax.set_yticks([])
            colour = HIT if img == dataset.txt2img[q] else MISS
            for side in ax.spines.values():
                side.set_edgecolor(colour)
                side.set_linewidth(4)
            ax.set_title(f"#{c}  {t2i[q, img]:.2f}", fontsize=8)
    fig.suptitle("text queries and their top retrieved images (green: the matching image)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scores", required=True, type=Path, help=".npz written by evaluate --save-scores")
    ap.add_argument("--annotations", required=True, help="the annotation JSON that was evaluated")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--image-root", help="folder the annotation's image paths are relative to")
    where.add_argument("--image-shards", help="... or tar shards holding the images (pipeline/image_store.py)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args(argv)
    dataset = RetrievalEvalDataset(args.annotations, image_store(args.image_root, args.image_shards),
                                   transform=None)
    print(draw_grid(np.load(args.scores)["t2i"], dataset, args.out, args.queries, args.top))


if __name__ == "__main__":
    main()
