"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) through pycocoevalcap, gathered across ranks."""

from __future__ import annotations

import functools
import logging
import re
import shutil

import torch
import torch.distributed as dist
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer
from torchmetrics import Metric

log = logging.getLogger(__name__)

# PTBTokenizer writes brackets as -LRB- etc. and its -lowerCase flag lower-cases them, so coco-caption's
# punctuation filter (upper-case) keeps them: the fallback does the same to score like it.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_DROPPED = set(PUNCTUATIONS) | {'"'}  # PTB turns " into `` or '', both dropped
_TOKEN = re.compile(r"\w+(?=n't)|n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-./:]\w+)*|[^\w\s]")


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def _have_java() -> bool:
    if shutil.which("java"):
        return True
    _warn_once(
        "java not on PATH: METEOR skipped and captions tokenized by approx_ptb_tokenize, "
        "so scores are close to, not equal to, the COCO evaluation's"
    )
    return False


def approx_ptb_tokenize(text: str) -> str:
    """Pure-Python stand-in for PTBTokenizer when Java is missing: lower case, clitics split
    ("don't" -> "do n't", "dog's" -> "dog 's"), brackets as -lrb- etc., and the tokens of
    coco-caption's punctuation list dropped. Differs on abbreviations ("mr." -> "mr"), contractions
    like "cannot", and symbols inside words ("@me" -> "@ me")."""
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text.lower()))
    return " ".join(t for t in tokens if t not in _DROPPED)


def tokenize_captions(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """coco-caption's tokenisation: Stanford PTBTokenizer, lower case, punctuation dropped.

    Whitespace is collapsed first: PTBTokenizer also ends lines at characters such as \\r and U+2028,
    which would silently shift every later caption onto the wrong image.
    """
    clean = {k: [" ".join(c.split()) for c in caps] for k, caps in captions.items()}
    if _have_java():
        return PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in clean.items()})
    return {k: [approx_ptb_tokenize(c) for c in caps] for k, caps in clean.items()}


def _close(meteor: Meteor) -> None:
    """Meteor stops its JVM only in ``__del__``; stop it now and close its pipes."""
    meteor.meteor_p.kill()
    meteor.meteor_p.communicate()


def score_captions(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Corpus scores as the COCO caption evaluation computes them: keys ``bleu1``..``bleu4``, ``meteor``
    (absent without Java), ``rouge_l`` and ``cider`` (pycocoevalcap's Cider is coco-caption's CIDEr-D).

    CIDEr's IDF comes from the references being scored, so it depends on the whole set: with a single
    image it is always 0. SPICE is not computed (see the warning). Empty input gives ``{}``.
    """
    if predictions.keys() != references.keys():
        raise ValueError("predictions and references must have the same image ids")
    if not predictions:
        return {}
    _warn_once(
        "SPICE skipped: pycocoevalcap's SPICE downloads Stanford CoreNLP on first use, impossible offline"
    )
    ids = sorted(predictions)  # a fixed order, so the sums behind the scores do not depend on rank order
    # The JVM loads METEOR's paraphrase table (~4 s) while the other scores are computed.
    meteor = Meteor() if _have_java() else None
    try:
        res = tokenize_captions({i: [predictions[i]] for i in ids})
        gts = tokenize_captions({i: list(references[i]) for i in ids})
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores = {f"bleu{n}": b for n, b in enumerate(bleu, start=1)}
        if meteor is not None:
            scores["meteor"], _ = meteor.compute_score(gts, res)
        scores["rouge_l"], _ = Rouge().compute_score(gts, res)
        scores["cider"], _ = Cider().compute_score(gts, res)
    finally:
        if meteor is not None:
            _close(meteor)
    return {k: float(v) for k, v in scores.items()}


class CaptionMetrics(Metric):
    """:func:`score_captions` over every image seen since the last reset, as float tensors.

    Captions are strings, which torchmetrics cannot sync, so they live in a plain dict keyed by image
    id and ``compute`` gathers it across ranks itself (torchmetrics' own sync has no states to touch).
    Keying by id drops the repeats DistributedSampler pads ranks with, so each image counts once.
    CIDEr needs the whole corpus and every score starts Java, so ``forward`` only accumulates.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._captions: dict[str, tuple[str, list[str]]] = {}

    def update(self, predictions: list[str], references: list[list[str]], ids: list[str]) -> None:
        for pred, refs, image_id in zip(predictions, references, ids, strict=True):
            if isinstance(refs, str):
                raise TypeError("references holds a list of reference captions per image, not a string")
            self._captions[image_id] = (pred, list(refs))

    def forward(self, predictions: list[str], references: list[list[str]], ids: list[str]) -> None:
        self.update(predictions, references, ids)

    def merge_state(self, incoming_state: CaptionMetrics) -> None:
        self._captions.update(incoming_state._captions)

    def reset(self) -> None:
        super().reset()
        self._captions = {}

    def compute(self) -> dict[str, torch.Tensor]:
        captions = self._captions
        group = self.process_group
        if self.sync_on_compute and self.distributed_available_fn() and dist.get_world_size(group) > 1:
            parts = [None] * dist.get_world_size(group)
            dist.all_gather_object(parts, captions, group=group)
            captions = {k: v for part in parts for k, v in part.items()}
        scores = score_captions(
            {k: p for k, (p, _) in captions.items()}, {k: r for k, (_, r) in captions.items()}
        )
        return {k: torch.tensor(v, device=self.device) for k, v in scores.items()}
