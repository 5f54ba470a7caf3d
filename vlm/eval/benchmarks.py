"""The benchmarks by name: ``build_benchmark("vqav2", root=..., split="val2014")``, as
``vlm-eval benchmark=<name>`` builds them from ``conf/benchmark/<name>.yaml``."""

from __future__ import annotations

from typing import Any

from vlm.eval.base import Benchmark, BenchmarkError, Item
from vlm.eval.coco_captions import COCOCaptions
from vlm.eval.gqa import GQA
from vlm.eval.mme import MME
from vlm.eval.pope import POPE
from vlm.eval.textvqa import TextVQA
from vlm.eval.vizwiz import VizWiz
from vlm.eval.vqav2 import VQAv2

BENCHMARKS: dict[str, type[Benchmark]] = {
    b.name: b for b in (VQAv2, TextVQA, VizWiz, GQA, POPE, MME, COCOCaptions)
}

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkError", "Item", "build_benchmark"]


def build_benchmark(name: str, **options: Any) -> Benchmark:
    """The benchmark called ``name``, with the options of :class:`Benchmark` (root, split, ...)."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"no benchmark named {name!r}: choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](**options)
