"""``VLMDataModule``: ShapesWorld or real files → ``ConversationDataset`` → processor batches.

Loaders: ``train_dataloader`` gives train-mode batches in a seeded, resumable order.
``val_dataloader`` and ``test_dataloader`` give two loaders over the same split:
index ``LOSS`` (0) teacher-forced train-mode batches for a validation loss, index
``GENERATE`` (1) prompt-only batches with ``answer`` and ``meta`` (``qtype``, COCO
``captions``, segmentation ``masks``) for VQA accuracy, caption and mask metrics.

The processor comes from the model (tokenizer, image transforms), which in turn needs a
tokenizer trained on ``corpus()``; so loaders exist only after ``attach(processor)``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from vlm.data.datasets import IMAGE_TOKEN, ConversationDataset, check_record
from vlm.data.readers import DataFormatError, caption_conversations, read_coco_captions, read_llava_json
from vlm.data.sampling import CountingLoader, ResumableSampler
from vlm.data.seg_readers import read_reasonseg, read_refcoco
from vlm.data.shapesworld import ShapesWorldConfig, generate

log = logging.getLogger(__name__)

LOSS, GENERATE = 0, 1
SPLITS = ("train", "val", "test")
READERS = ("llava_json", "coco_captions", "refcoco")  # the formats ShapesWorld writes
SOURCES = ("shapesworld", *READERS, "reasonseg")
SEG_READERS = {"refcoco": read_refcoco, "reasonseg": read_reasonseg}
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), None: SPLITS}

Paths = str | Sequence[str] | None


def _plain(value: Any) -> Any:
    """A generator option as a plain value: lists become tuples (hashable, as the dataclass
    declares them), mappings dicts (JSON for the manifest)."""
    if isinstance(value, Mapping):
        return dict(value)
    return tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


class VLMDataModule(L.LightningDataModule):
    """Built from the ``data`` config group; every argument is a plain value.

    ``source``: ``shapesworld`` (generate under ``root``, then read the file kind named by
    ``reader``), ``llava_json``, ``coco_captions``, ``refcoco`` or ``reasonseg``.
    ``{split}_json``: the split's file, relative to ``root``; for COCO the caption annotation
    file(s) and, with ``karpathy_json``, the Karpathy split picks the images.
    ``image_folder``: where record image paths start (default ``root``; ``root/images`` for
    ShapesWorld's COCO and refCOCO files).
    ``shapesworld``: ``ShapesWorldConfig`` fields. ``max_val_samples``: a seeded random
    subset of val, for fast evaluation during training (test is never capped);
    ``max_train_samples`` the same for train (a data-size ablation).
    Segmentation (``refcoco``, ``reasonseg``, or ShapesWorld's ``refs/`` with ``reader: refcoco``
    and ``split_by: shapes``): ``splits`` names the data set's split for each of ours
    (refCOCO's ``{test: testA}``; null: the same names), ``split_by`` the refs file
    (``refs(<split_by>).p``), ``prompts`` the reader's question/answer templates (null: LISA's).
    ``text_cache``: conversations whose token ids the processor keeps after their first use
    (0: none); each loader worker keeps its own. ``group_by_length``: training batches of
    conversations of similar length (HF Trainer's option; words counted, no image read), so
    less of each batch is padding. ``pretokenize``: the train split's text enters the cache
    before the first step, encoded by forked processes, one per core (shared by the DDP ranks
    of a machine; needs ``text_cache``), so the first epoch's steps do not wait on the chat
    template and the tokenizer.
    ``qtypes``: the question types the records carry (``meta.qtype``), which the VQA
    objective scores one by one (``objective.qtypes`` reads them from here); an evaluated
    split with other types says so once. ``val_holdout``: with no ``val_json``, this many
    train records (seeded; at most a tenth of them) are the validation split instead, and
    training never sees them.
    """

    def __init__(
        self,
        source: str = "shapesworld",
        root: str = "data/shapesworld",
        train_json: Paths = None,
        val_json: Paths = None,
        test_json: Paths = None,
        image_folder: str | None = None,
        karpathy_json: str | None = None,
        reader: str = "llava_json",
        shapesworld: dict | None = None,
        split_by: str = "unc",
        splits: dict | None = None,
        prompts: dict | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_sample: str = "skip",
        require_image: bool = True,
        max_val_samples: int | None = None,
        max_train_samples: int | None = None,
        corpus_json: Sequence[str] | None = None,
        text_cache: int = 0,
        group_by_length: bool = False,
        pretokenize: bool = False,
        qtypes: Sequence[str] = (),
        val_holdout: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
        if reader not in READERS:
            raise ValueError(f"data.reader must be one of {READERS}, got {reader!r}")
        if pretokenize and not text_cache:
            raise ValueError("data.pretokenize fills the text cache: set data.text_cache > 0")
        self.save_hyperparameters()
        for key, value in self.hparams.items():  # plain values, so checkpoints load weights-only
            if OmegaConf.is_config(value):
                self.hparams[key] = OmegaConf.to_container(value, resolve=True)
        self.processor: Any = None
        self.datasets: dict[str, ConversationDataset] = {}
        self._train_loader: CountingLoader | None = None
        self._resume: dict | None = None
        self._logged: dict[str, str] = {}
        self._pretokenized = False

    # -- data on disk ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate ShapesWorld under ``root`` (a no-op when its manifest matches the config),
        then check the files the splits name: one the generator does not write (a curated
        subset) is said in one line, not as a reader's traceback."""
        if self.hparams.source != "shapesworld":
            return
        generate(self._shapesworld_config())
        if self._layout()[0] in SEG_READERS:
            self._check_seg(SPLITS)
            return
        for split, paths in self._layout()[1].items():
            missing = [p for p in ([paths] if isinstance(paths, Path) else paths) if not p.exists()]
            if missing:
                raise DataFormatError(f"data.{split}_json: {missing[0]} does not exist")

    def _shapesworld_config(self) -> ShapesWorldConfig:
        opts = {k: _plain(v) for k, v in (self.hparams.shapesworld or {}).items()}
        return ShapesWorldConfig(**{**opts, "root": str(self.hparams.root)})

    def _layout(self) -> tuple[str, dict[str, Any], str | None, Path]:
        """(reader, split → file(s), Karpathy file, image folder), defaults filled in; for
        segmentation split → the data set's split name, read from ``seg_folder()``."""
        hp, root = self.hparams, Path(self.hparams.root)
        kind = hp.reader if hp.source == "shapesworld" else hp.source
        if kind in SEG_READERS:
            images = hp.image_folder or ("images" if hp.source == "shapesworld" else ".")
            return kind, dict(hp.splits or {s: s for s in SPLITS}), None, root / images
        files: dict[str, Any] = {s: hp[f"{s}_json"] for s in SPLITS}
        karpathy, images = hp.karpathy_json, hp.image_folder
        if hp.source == "shapesworld" and kind == "llava_json":
            files = {s: files[s] or f"llava_{s}.json" for s in SPLITS}
        elif hp.source == "shapesworld":
            every = [f"annotations/captions_{s}.json" for s in SPLITS]
            files = {s: files[s] or every for s in SPLITS}
            karpathy, images = karpathy or "dataset_coco.json", images or "images"
        files = {s: root / f if isinstance(f, str) else [root / p for p in f] for s, f in files.items() if f}
        return kind, files, str(root / karpathy) if karpathy else None, root / (images or ".")

    def _read(self, split: str) -> ConversationDataset:
        """The split's file(s) as a dataset."""
        hp = self.hparams
        kind, files, karpathy, images = self._layout()
        if split not in files:
            raise ValueError(f"no file for the {split} split: set data.{split}_json")
        path = files[split]
        if kind == "llava_json":
            records = read_llava_json(path)
            source = str(path) if isinstance(path, Path) else ", ".join(map(str, path))
        elif kind in SEG_READERS:
            args = {"split_by": hp.split_by} if kind == "refcoco" else {}
            records = SEG_READERS[kind](self.seg_folder(), path, **args, **(hp.prompts or {}))
            source = f"{self.seg_folder()} ({path})"
        else:
            coco = read_coco_captions(path, karpathy, split if karpathy else None)
            records = caption_conversations(coco, per_caption=split == "train")
            source = f"{karpathy} ({split})" if karpathy else str(path)
        if split != "train":
            self._check_qtypes(records, source)
        return ConversationDataset(
            records, images, hp.on_bad_sample, require_image=hp.require_image, source=source
        )

    def held_out(self) -> bool:
        """Validation runs on ``val_holdout`` records held out of train (no val file)."""
        return bool(self.hparams.val_holdout) and "val" not in self._layout()[1]

    def has_split(self, split: str) -> bool:
        return split in self._layout()[1] or (split == "val" and self.held_out())

    def _dataset(self, split: str) -> ConversationDataset:
        if split in self.datasets:
            return self.datasets[split]
        hp = self.hparams
        if split in ("train", "val") and self.held_out():
            train = self._read("train")
            n = min(hp.val_holdout, max(1, len(train) // 10))  # a small file still trains
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(hp.seed)).tolist()
            self.datasets["val"] = train.subset(sorted(order[:n]))
            self.datasets["train"] = self._capped(train.subset(sorted(order[n:])), hp.max_train_samples)
            log.info(f"no data.val_json: validating on {n} records held out of train (data.val_holdout)")
            return self.datasets[split]
        ds = self._read(split)
        cap = {"train": hp.max_train_samples, "val": hp.max_val_samples}.get(split)
        self.datasets[split] = ds = self._capped(ds, cap)
        return ds

    def _capped(self, ds: ConversationDataset, n: int | None) -> ConversationDataset:
        """A seeded random subset of at most ``n`` samples (``None``: all of them)."""
        if not n or len(ds) <= n:
            return ds
        g = torch.Generator().manual_seed(self.hparams.seed)
        return ds.subset(sorted(torch.randperm(len(ds), generator=g)[:n].tolist()))

    def check_files(self, splits: Sequence[str]) -> None:
        """Before anything is read: each split's files exist (a held-out val needs none;
        ShapesWorld writes its own in ``prepare_data``)."""
        if self.hparams.source == "shapesworld":
            return
        kind, files, karpathy, images = self._layout()
        read = [s for s in splits if not (s == "val" and self.held_out())]
        for split in read:
            if split not in files:
                key = f"data.splits.{split}" if kind in SEG_READERS else f"data.{split}_json"
                also = " or data.val_holdout" if split == "val" else ""
                raise ValueError(f"no file for the {split} split: set {key}{also}")
            if kind in SEG_READERS:
                continue
            paths = [files[split]] if isinstance(files[split], Path) else files[split]
            for path in [*paths, *([Path(karpathy)] if karpathy else [])]:
                if not path.is_file():
                    raise ValueError(f"data.{split}_json: {path} does not exist")
        if kind in SEG_READERS:
            self._check_seg(read)
        if not images.is_dir():
            raise ValueError(f"data.image_folder: {images} is not a folder")

    def seg_folder(self) -> Path:
        """Where a segmentation reader reads: ShapesWorld's ``refs/``, else ``root``."""
        root = Path(self.hparams.root)
        return root / "refs" if self.hparams.source == "shapesworld" else root

    def _check_seg(self, splits: Sequence[str]) -> None:
        """The files a segmentation reader needs exist: refCOCO's instances and refs pickle,
        ReasonSeg's split folders; one line naming the key and the path."""
        kind, names, _, _ = self._layout()
        folder = self.seg_folder()
        if kind == "refcoco":
            needed = {
                "data.root": folder / "instances.json",
                "data.split_by": folder / f"refs({self.hparams.split_by}).p",
            }
        else:
            needed = {f"data.splits.{s}": folder / names[s] for s in splits if s in names}
        for key, path in needed.items():
            if not path.exists():
                raise DataFormatError(f"{key}: {path} does not exist")

    def _check_qtypes(self, records: Sequence[Any], source: str) -> None:
        found = Counter(r.get("qtype") for r in records if isinstance(r, dict) and r.get("qtype"))
        other = {q: n for q, n in found.items() if q not in self.hparams.qtypes}
        if other:
            log.warning(
                f"{source}: question types {other} are not in data.qtypes {list(self.hparams.qtypes)}: "
                "they count in the overall accuracy only"
            )

    def setup(self, stage: str | None = None) -> None:
        for split in STAGE_SPLITS.get(stage, ()):
            self._dataset(split)

    def corpus(self) -> Iterator[str]:
        """Every turn of the train split without ``<image>``: the text a tokenizer is trained on.

        ``corpus_json`` (files under ``root``) widens it, so that the stages of one run, each
        reading a different file, share one vocabulary.
        """
        files = self.hparams.corpus_json
        if files:
            records = (r for f in files for r in read_llava_json(Path(self.hparams.root) / f))
            convs = (r["conversations"] for r in records if check_record(r, require_image=False) is None)
        else:
            convs = self._dataset("train").conversations()
        for turns in convs:
            for turn in turns:
                text = turn["value"].replace(IMAGE_TOKEN, "").strip()
                if text:
                    yield text

    # -- loaders -----------------------------------------------------------------------------
    def attach(self, processor: Any) -> None:
        """``processor.encode(sample)`` / ``encode_prompt(sample)`` -> item | None, and
        ``collate(items)`` / ``collate_prompts(items)``; with ``text_cache`` > 0 its
        ``cache_text(n)`` keeps the text of n conversations."""
        self.processor = processor
        if self.hparams.text_cache:
            processor.cache_text(self.hparams.text_cache)

    def _loader(
        self,
        ds: ConversationDataset,
        prompts: bool,
        batch_size: int,
        cls: type[DataLoader] = DataLoader,
        **kw: Any,
    ) -> DataLoader:
        """Training items (``prompts=False``: ids, labels) or prompts to generate from."""
        proc = self.processor
        if proc is None:
            raise RuntimeError("VLMDataModule.attach(processor) must come before asking for loaders")
        return cls(
            ds.with_transform(proc.encode_prompt if prompts else proc.encode),
            batch_size=batch_size,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
            collate_fn=proc.collate_prompts if prompts else proc.collate,
            **kw,
        )

    def train_dataloader(self) -> CountingLoader:
        ds, trainer = self._dataset("train"), self.trainer
        sampler = ResumableSampler(
            ds,
            seed=self.hparams.seed,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            lengths=[sum(len(t["value"].split()) for t in c) for c in ds.conversations()]
            if self.hparams.group_by_length
            else None,
            batch_size=self.hparams.batch_size,
        )
        resume, self._resume = self._resume, None
        if resume is not None:
            self._apply(resume, sampler)
        if self.hparams.pretokenize and not self._pretokenized:
            self._pretokenize(ds)
        self._train_loader = self._loader(
            ds,
            False,
            self.hparams.batch_size,
            cls=CountingLoader,
            sampler=sampler,
            persistent_workers=self.hparams.num_workers > 0,
        )
        return self._train_loader

    def _pretokenize(self, ds: ConversationDataset) -> None:
        # every rank encodes the whole split (each epoch shards it anew): a machine's share its cores
        ranks = self.trainer.num_devices if self.trainer else 1
        processes = max(1, len(os.sched_getaffinity(0)) // ranks)
        start = time.perf_counter()
        n = self.processor.pretokenize(ds.text_samples(), processes)
        self._pretokenized = True
        took = time.perf_counter() - start
        log.info(f"pretokenized {n}/{len(ds)} train conversations in {took:.1f} s ({processes} processes)")

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        ds, bs = self._dataset(split), self.hparams.eval_batch_size or self.hparams.batch_size
        return [self._loader(ds, False, bs), self._loader(ds, True, bs)]

    def val_dataloader(self) -> list[DataLoader]:
        """[LOSS, GENERATE] loaders over val (capped by ``max_val_samples``)."""
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        """[LOSS, GENERATE] loaders over test."""
        return self._eval_loaders("test")

    # -- resumable order ---------------------------------------------------------------------
    def _order(self, sampler: ResumableSampler) -> dict[str, int]:
        """What the shuffle depends on besides the epoch: a position only means something
        under the same seed, data size, number of ranks and grouping by length."""
        order = {"seed": sampler.seed, "size": len(sampler.dataset), "replicas": sampler.num_replicas}
        return order | ({"by_length": True} if sampler.lengths is not None else {})

    def state_dict(self) -> dict[str, Any]:
        """The train order's epoch and position; Lightning stores it in every checkpoint.

        At an epoch's end the position is that epoch's length; the fit loop's ``set_epoch``
        for the next epoch then starts it from the top.
        """
        loader = self._train_loader
        if loader is None:
            return {"train_order": self._resume} if self._resume else {}
        return {"train_order": {**loader.position(), **self._order(loader.sampler)}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called by Lightning on ``fit(ckpt_path=...)`` before the train loader is built."""
        resume = state_dict.get("train_order")
        if resume is None:
            return
        if self._train_loader is not None:
            self._apply(resume, self._train_loader.sampler)
        else:
            self._resume = resume

    def _apply(self, resume: dict, sampler: ResumableSampler) -> None:
        want = self._order(sampler)
        have = {k: resume.get(k) for k in want}
        sampler.set_epoch(resume["epoch"])
        if have == want:
            sampler.start = resume["start"]
        else:
            log.warning(
                f"train data order changed since the checkpoint ({have} -> {want}): epoch starts afresh"
            )

    # -- bad samples -------------------------------------------------------------------------
    def teardown(self, stage: str | None = None) -> None:
        """Log each split's skip summary once more if image failures changed it."""
        for split, ds in self.datasets.items():
            line = ds.summary()
            if ds.read_failures.any() and self._logged.get(split) != line:
                log.warning(line)
                self._logged[split] = line
