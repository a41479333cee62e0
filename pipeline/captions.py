"""Caption cleaning exactly as ALBEF's reference `pre_caption` (docs/METHOD.md §5).

The reference lowercases, deletes the characters ,.'!?"()*#:;~, turns - and /
into spaces, maps the COCO/VG placeholder `<person>` to `person`, collapses
whitespace and keeps at most `max_words` words. A caption that is empty after
cleaning is a bad sample: the caller skips and counts it (the reference raised
`ValueError('pre_caption yields invalid text')` and stopped the run).
"""
from __future__ import annotations

import re

DEFAULT_MAX_WORDS = 30

_REMOVED = re.compile(r"([,.'!?\"()*#:;~])")
_TO_SPACE = re.compile(r"[-/]")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int = DEFAULT_MAX_WORDS) -> str:
    """Return the cleaned caption, character for character the reference's output.

    The caller treats a result with no non-space character as a bad sample.
    """
    caption = _REMOVED.sub("", text.lower())
    caption = _TO_SPACE.sub(" ", caption).replace("<person>", "person")
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
