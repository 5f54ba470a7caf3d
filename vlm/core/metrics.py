"""VQA answers: the official normalisations, and accuracy as normalised exact match (overall and
per question type, synced across ranks)."""

from __future__ import annotations

import re

import torch
from torchmetrics import Metric

# The VQA evaluation's tables (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py,
# as fixed in 2016 and 2021; EvalAI and the VizWiz API use the same ones).
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # the apostrophe and the colon are not among them
_DIGIT_COMMA = re.compile(r"\d,\d")
# The official pattern's look-behind is misspelt (a look-ahead for "<="): only "no digit after" counts.
_PERIOD = re.compile(r"\.(?!\d)")
# A word missing its apostrophe(s) -> the contraction. Entries that can never match are left out:
# keys with a capital (words are lower-cased first) and those mapping to themselves.
_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
    maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
    mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
    ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've
    shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
    somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
    somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
    someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
    something'dve=something'd've somethingll=something'll thats=that's thered=there'd
    thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
    theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
    wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
    whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
    whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
    whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
    wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
    you'dve=you'd've youll=you'll youre=you're youve=you've
    """.split()
)


def clean_answer(text: str) -> str:
    """Newlines and tabs as spaces, outer whitespace stripped: all the VQA evaluation does to
    every answer before it decides whether to normalise."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _strip_punctuation(text: str) -> str:
    """The official ``processPunctuation``. A mark touching a space, or any mark at all once the
    text holds a digit-comma-digit, is deleted ("10,000" -> "10000"); any other becomes a space
    ("left_side" -> "left side"). Then periods not followed by a digit go ("3.5" stays): at most
    32 of them, as the official call passes ``re.UNICODE`` (32) where ``re.sub`` takes its count."""
    out = text
    delete = _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        gone = delete or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if gone else " ")
    return _PERIOD.sub("", out, count=32)


def _digits_and_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words as digits ("none" -> "0"
    .. "ten" -> "10"), the articles a/an/the dropped, then words missing an apostrophe written
    as the contraction ("dont" -> "don't"); words are re-joined by single spaces."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The VQA evaluation's normalisation of an answer (Antol et al. 2015; vqaEval.py's
    ``processPunctuation`` then ``processDigitArticle``, after :func:`clean_answer`).

    The apostrophe is no punctuation to it: "don't" and "it's" stay as written, "dont" becomes
    "don't"; "Two dogs." -> "2 dogs", "10,000" -> "10000", "left_side" -> "left side".
    """
    return _digits_and_articles(_strip_punctuation(clean_answer(text)))


def evalai_answer(text: str) -> str:
    """EvalAI's answer processor (the TextVQA evaluation's, via pythia/MMF): lower case, commas
    and question marks dropped, "'s" split off as its own word ("it's" -> "it 's"), then
    :func:`normalize_answer`."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return normalize_answer(text)


class VQAAccuracy(Metric):
    """Exact match after :func:`normalize_answer` of both sides (one reference answer per question,
    as ShapesWorld has); ``compute`` returns ``{"all": acc, qtype: acc}``.

    Question types are fixed at construction so the per-type counters are plain tensor states
    that torchmetrics sums across DDP ranks.
    """

    full_state_update = False

    def __init__(self, qtypes: list[str], **kwargs):
        super().__init__(**kwargs)
        self.qtypes = list(qtypes)
        n = len(self.qtypes) + 1  # last slot: types not in the list
        self.add_state("correct", default=torch.zeros(n), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(n), dist_reduce_fx="sum")

    def update(self, predictions: list[str], answers: list[str], qtypes: list[str]) -> None:
        for pred, ans, qt in zip(predictions, answers, qtypes, strict=True):
            i = self.qtypes.index(qt) if qt in self.qtypes else len(self.qtypes)
            self.total[i] += 1
            self.correct[i] += float(normalize_answer(pred) == normalize_answer(ans))

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"all": self.correct.sum() / self.total.sum().clamp(min=1)}
        for i, qt in enumerate(self.qtypes):
            if self.total[i] > 0:
                out[qt] = self.correct[i] / self.total[i]
        return out
