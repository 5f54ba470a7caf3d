"""Evaluation: published benchmarks read from their own files and scored by their official
definitions (``benchmarks``: VQAv2, TextVQA, VizWiz, GQA, POPE, MME, COCO captions; run by
``vlm-eval benchmark=<name>``), and outside harnesses: ``lmms`` makes our checkpoints an
lmms-eval model."""
