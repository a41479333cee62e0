"""VQA result files and the VQA accuracy, as the official evaluation computes it.

Result file: `[{"question_id": int, "answer": str}, ...]`, one entry per question
of the split (the evaluation server wants every question, test-dev included).
Ranks that scored padded copies of the same questions write duplicates; they
are removed here (`merge_results`).

Accuracy (the official vqaEval.py, docs/METHOD.md §11): the predicted answer is
normalised (punctuation, number words -> digits, articles dropped,
contractions restored); the human answers get the punctuation step only, and
only when they are not all identical (the official annotations are stored
normalised). A question's accuracy is the mean, over its 10 leave-one-out
subsets of 9 human answers, of min(1, matches / 3); the split's accuracy is
the mean over questions, in percent.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")   # sic: the official pattern (a look-ahead, not a look-behind)
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_MAX_REPLACEMENTS = re.UNICODE   # sic: the official code passes re.UNICODE (32) as sub()'s count


def process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, _PERIOD_MAX_REPLACEMENTS)


def process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_prediction(answer: str) -> str:
    """The official normalisation of a predicted answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def _humans(human_answers: Sequence[str]) -> list[str]:
    """The human answers as the official code compares them (punctuation step only if they differ)."""
    humans = list(human_answers)
    return [process_punctuation(h) for h in humans] if len(set(humans)) > 1 else humans


def question_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of the human answers of min(1, matches / 3), in [0, 1]."""
    predicted = normalize_prediction(prediction)
    matches = [h == predicted for h in _humans(human_answers)]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


def vqa_accuracy(predictions: Mapping[int, str], human_answers: Mapping[int, Sequence[str]]) -> dict:
    """{"acc": percent, "questions": n}. The predictions must cover exactly the annotated questions."""
    check_complete(predictions, human_answers.keys())
    scores = [question_accuracy(predictions[qid], answers) for qid, answers in human_answers.items()]
    return {"acc": 100.0 * sum(scores) / len(scores), "questions": len(scores)}


def merge_results(per_rank: Iterable[Sequence[dict]]) -> list[dict]:
    """Concatenate the ranks' `{"question_id", "answer"}` rows, keeping one row per question id
    (padding makes some ranks score a question twice; its copies must agree)."""
    out: dict[int, dict] = {}
    for rows in per_rank:
        for row in rows:
            kept = out.setdefault(row["question_id"], row)
            if kept["answer"] != row["answer"]:
                raise RuntimeError(f"question_id {row['question_id']} was answered twice, differently: "
                                   f"{kept['answer']!r} and {row['answer']!r}")
    return list(out.values())


def write_result_file(rows: Sequence[dict], path: str | Path) -> None:
    """The server's JSON, written atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(list(rows)))
    os.replace(tmp, path)


def check_complete(predictions: Iterable[int], question_ids: Iterable[int]) -> None:
    """A result must answer every question of the split and nothing else (the server refuses otherwise)."""
    have, want = set(predictions), set(question_ids)
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        raise RuntimeError(f"result file does not match the split: {len(missing)} questions unanswered "
                           f"(e.g. {missing[:5]}), {len(extra)} unknown question ids (e.g. {extra[:5]})")


def answers_outside_list(human_answers: Mapping[int, Sequence[str]], answer_list: Sequence[str]) -> list[int]:
    """Question ids none of whose human answers is a candidate: the model cannot score on them."""
    candidates = {normalize_prediction(a) for a in answer_list}
    return [qid for qid, answers in human_answers.items() if candidates.isdisjoint(_humans(answers))]


def format_table(metrics: Mapping[str, float], title: str) -> str:
    """One line: the split, its accuracy (when it has answers) and the counts."""
    parts = [f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}" for key, value in metrics.items()]
    return f"[vqa] {title}: " + ", ".join(parts)
