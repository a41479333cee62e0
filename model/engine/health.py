"""A run that does not learn must say so: the collapse check of every logging window and evaluation.

What a collapsed ALBEF run looks like (docs/COLLAPSE.md): every image (and every
caption) maps to almost the same feature, so the mean pairwise cosine within a
batch approaches 1; ITC picks the positive no more often than chance; the ITM
head settles on always answering "no match", which is right for 2 of the 3
pairs it sees (one positive, two hard negatives); zero-shot retrieval gives
every query the same top-k candidates. MLM can still fall, since it needs no image.

`window_problems` reads the logged means of one window (after warm-up);
`eval_problems` the metrics of an evaluation. Each returns one line per finding
(empty when healthy). Both see numbers already reduced over ranks, so every
rank reaches the same verdict and a stop (`train.stop_on_collapse`) is collective.
"""
from __future__ import annotations

COSINE_COLLAPSED = 0.95        # mean pairwise cosine of a batch's features above this: collapsed
ITM_CONSTANT_RATE = 2.0 / 3.0  # accuracy of always answering "no match" (1 positive : 2 negatives)
ITM_CONSTANT_TOL = 0.01
DISTINCT_SETS_COLLAPSED = 0.1  # share of queries with their own top-k candidate set, below this: collapsed
USUAL_CAUSES = ("usual causes: a learning rate or warm-up too aggressive for the batch, the temperature "
                "stuck at its clamp, a small global batch against a large stale queue, a teacher "
                "(momentum model) that has collapsed too, augmentations that contradict the captions "
                "(e.g. flips or translations against captions naming positions); see docs/COLLAPSE.md")


def window_problems(scalars: dict[str, float], itc_chance: float | None) -> list[str]:
    """Findings from one logging window's means (cos_*, acc_itc, acc_itm when the task logs them)."""
    found = []
    for key, what in (("cos_image", "image"), ("cos_text", "text")):
        if key in scalars and scalars[key] > COSINE_COLLAPSED:
            found.append(f"{what} features collapsed: mean pairwise cosine {scalars[key]:.3f} within a batch "
                         f"(> {COSINE_COLLAPSED})")
    itm_constant = "acc_itm" in scalars and abs(scalars["acc_itm"] - ITM_CONSTANT_RATE) < ITM_CONSTANT_TOL
    itc_at_chance = itc_chance is not None and "acc_itc" in scalars and scalars["acc_itc"] <= 2 * itc_chance
    if itm_constant and itc_at_chance:
        found.append(f"ITC accuracy {scalars['acc_itc']:.4f} is at chance ({itc_chance:.4f}) and ITM accuracy "
                     f"{scalars['acc_itm']:.3f} equals the constant 'no match' rate {ITM_CONSTANT_RATE:.3f}")
    return found


def eval_problems(flat_metrics: dict[str, float]) -> list[str]:
    """Findings from an evaluation: every query getting the same ITC candidates."""
    found = []
    for key, value in flat_metrics.items():
        if key.rsplit("/", 1)[-1].startswith("itc_distinct_frac") and value < DISTINCT_SETS_COLLAPSED:
            found.append(f"{key} = {value:.3f}: the ITC stage gives (almost) every query the same top-k "
                         f"candidates")
    return found


def collapse_message(step: int, problems: list[str]) -> str:
    return f"step {step}: the run is not learning: " + "; ".join(problems) + f". {USUAL_CAUSES}"
