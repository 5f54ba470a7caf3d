"""Readers, bad-sample policy and VLMDataModule (loaders, corpus, resumable order) on ShapesWorld."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from runs import data_overrides, metrics_rows, one_thread, run_train, steps
from torch.utils.data import DataLoader

from vlm.data.datamodule import GENERATE, LOSS, VLMDataModule
from vlm.data.datasets import BadSampleError, ConversationDataset
from vlm.data.readers import DataFormatError, caption_conversations, read_coco_captions, read_llava_json
from vlm.data.sampling import ResumableSampler, length_grouped

WORLD = dict(seed=1, image_size=32, num_train=10, num_val=4, num_test=4, questions_per_image=3)


class FakeProcessor:
    """The processor contract with character-level "tokens" and a flat image tensor."""

    pad = 0

    def encode(self, sample: dict) -> dict:
        return self._encode(sample, prompt=False)

    def encode_prompt(self, sample: dict) -> dict:
        return self._encode(sample, prompt=True)

    def collate(self, items: list) -> dict:
        return self._collate(items, left=False)

    def collate_prompts(self, items: list) -> dict:
        return self._collate(items, left=True)

    def _encode(self, sample: dict, prompt: bool) -> dict:
        turns = sample["conversations"]
        text = "".join(t["value"] for t in turns[:-1])
        ids = [ord(c) for c in text]
        pixels = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1).float()  # 3,H,W
        if prompt:
            return {
                "input_ids": torch.tensor(ids),
                "pixel_values": pixels,
                "answer": turns[-1]["value"],
                "meta": sample["meta"],
                "id": sample["id"],
            }
        answer = [ord(c) for c in turns[-1]["value"]]
        return {
            "input_ids": torch.tensor(ids + answer),
            "labels": torch.tensor([-100] * len(ids) + answer),
            "pixel_values": pixels,
            "id": sample["id"],
        }

    def _collate(self, items: list, left: bool) -> dict:
        items = [it for it in items if it is not None]
        width = max(len(it["input_ids"]) for it in items)

        def pad(seq: torch.Tensor, value: int) -> torch.Tensor:
            fill = torch.full((width - len(seq),), value)
            return torch.cat([fill, seq] if left else [seq, fill])

        batch = {
            "input_ids": torch.stack([pad(it["input_ids"], self.pad) for it in items]),
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "id": [it["id"] for it in items],
        }
        if left:
            batch.update(answer=[it["answer"] for it in items], meta=[it["meta"] for it in items])
        else:
            batch["labels"] = torch.stack([pad(it["labels"], -100) for it in items])
        return batch


def make_dm(world: Path, **kw) -> VLMDataModule:
    dm = VLMDataModule(root=str(world), shapesworld=WORLD, **kw)
    dm.prepare_data()
    dm.attach(FakeProcessor())
    return dm


# -- LLaVA JSON ------------------------------------------------------------------------------
def test_llava_json_round_trip(world):
    records = read_llava_json(world / "llava_train.json")
    ds = ConversationDataset(records, world, source="llava_train.json")
    assert len(ds) == len(records) == WORLD["num_train"]  # multi-turn: one record per image
    for k in (0, len(ds) - 1):
        s, rec = ds[k], records[k]
        assert s["id"] == rec["id"] and s["conversations"] == rec["conversations"]
        assert s["image"].mode == "RGB" and s["image"].size == (32, 32)
        assert s["image"].tobytes() == Image.open(world / rec["image"]).convert("RGB").tobytes()
        assert s["meta"] == {"qtype": "multi", "qtypes": rec["qtypes"]}


def test_malformed_json_names_file_and_position(tmp_path):
    bad = tmp_path / "llava_train.json"
    bad.write_text('[{"id": "a", "conversations": []}\n {"id": "b"}]')
    with pytest.raises(DataFormatError) as e:
        read_llava_json(bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "line 2 column 2" in msg
    bad.write_text('{"id": "a"}')
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        read_llava_json(bad)


def test_jsonl_holds_one_record_per_line_and_a_bad_line_is_skipped_or_named(tmp_path, caplog):
    path = tmp_path / "Cambrian737k.jsonl"
    path.write_text('{"id": "a", "conversations": []}\n\n{"id": "b", "conversations": []}\n')
    assert [r["id"] for r in read_llava_json(path)] == ["a", "b"]
    good = json.dumps({"id": "g", "conversations": conv(("human", "hi"), ("gpt", "ho"))}).encode()
    path.write_bytes(b"\n".join([good, b'{"id": "b",', b'\xff{"id": "c"}', good]) + b"\n")
    with caplog.at_level(logging.WARNING):
        ds = ConversationDataset(read_llava_json(path), tmp_path, require_image=False, source=str(path))
    assert len(ds) == 2 and ds.bad_samples == {"malformed JSON line": 1, "undecodable line": 1}
    named = [r.getMessage() for r in caplog.records]
    assert f"skipped {path} record 1 (id ?): malformed JSON line: line 2: Expecting" in "\n".join(named)
    assert f"skipped {path} record 2 (id ?): undecodable line: line 3: not UTF-8" in "\n".join(named)
    with pytest.raises(BadSampleError, match=r"record 1 \(id \?\): malformed JSON line: line 2: "):
        ConversationDataset(read_llava_json(path), tmp_path, "raise", require_image=False, source=str(path))
    (tmp_path / "bad.json").write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(DataFormatError, match=r"bad.json is not UTF-8 text: invalid start byte at byte 9$"):
        read_llava_json(tmp_path / "bad.json")


# -- bad samples -----------------------------------------------------------------------------
def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"from": r, "value": v} for r, v in turns]


QA = conv(("human", "<image>\nWhat colour?"), ("gpt", "red"))
BAD = {  # kind: (record changes, reason counted, found at construction)
    "missing image": ({"image": "images/nope.png"}, "missing image", False),
    "corrupt image": ({"image": "corrupt.png"}, "unreadable image", False),
    "gpt first": (
        {"conversations": conv(("gpt", "<image>\nhi"), ("human", "x"))},
        "malformed conversation",
        True,
    ),
    "not alternating": (
        {"conversations": conv(("human", "<image>\nq"), ("human", "q"), ("gpt", "a"))},
        "malformed conversation",
        True,
    ),
    "empty value": (
        {"conversations": conv(("human", "<image>\nq"), ("gpt", "  "))},
        "malformed conversation",
        True,
    ),
    "unknown role": (
        {"conversations": conv(("human", "<image>\nq"), ("robot", "a"))},
        "malformed conversation",
        True,
    ),
    "no answer": ({"conversations": conv(("human", "<image>\nq"))}, "malformed conversation", True),
    "no <image>": (
        {"conversations": conv(("human", "What colour?"), ("gpt", "red"))},
        "missing <image>",
        True,
    ),
    "two <image>": (
        {"conversations": conv(("human", "<image><image>\nq"), ("gpt", "a"))},
        "multiple <image>",
        True,
    ),
}


def write_records(world: Path, tmp_path: Path, kind: str) -> tuple[Path, int]:
    """Three good records and one bad one (at index 2) in a LLaVA JSON file; images under tmp_path."""
    shutil.copytree(world / "images", tmp_path / "images", dirs_exist_ok=True)
    png = (world / "images" / "train" / "train_000000.png").read_bytes()
    (tmp_path / "corrupt.png").write_bytes(png[: len(png) // 2])
    good = [
        {"id": f"r{i}", "image": f"images/train/train_00000{i}.png", "conversations": QA, "qtype": "color"}
        for i in range(4)
    ]
    good[2] |= BAD[kind][0]
    path = tmp_path / "llava_bad.json"
    path.write_text(json.dumps(good))
    return path, 2


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_sample_is_skipped_and_counted(world, tmp_path, kind, caplog):
    path, i = write_records(world, tmp_path, kind)
    _, reason, structural = BAD[kind]
    with caplog.at_level(logging.WARNING):
        ds = ConversationDataset(read_llava_json(path), tmp_path, on_bad_sample="skip", source=str(path))
        samples = [ds[k] for k in range(len(ds))]
        [ds[k] for k in range(len(ds))]  # a second epoch neither counts nor names the same image again
    assert len(ds) == (3 if structural else 4)
    assert [s["id"] for s in samples if s is not None] == ["r0", "r1", "r3"]
    assert ds.bad_samples == {reason: 1}
    assert ds.summary() == f"skipped 1/4 samples from {path}: 1 {reason}"
    logged = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    named = [m for m in logged if m.startswith(f"skipped {path} record 2 (id r2): {reason}: ")]
    assert len(named) == 1  # the record, named once
    assert logged == named + ([ds.summary()] if structural else [])  # the summary at construction


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_sample_raises_with_file_index_and_reason(world, tmp_path, kind):
    path, i = write_records(world, tmp_path, kind)
    _, reason, structural = BAD[kind]
    with pytest.raises(BadSampleError) as e:
        ds = ConversationDataset(read_llava_json(path), tmp_path, on_bad_sample="raise", source=str(path))
        [ds[k] for k in range(len(ds))]
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path} record {i} (id r{i}): {reason}")


def test_text_only_records(world, tmp_path):
    recs = [
        {"id": "t", "conversations": conv(("human", "hi"), ("gpt", "hello"))},
        {"id": "u", "conversations": conv(("human", "<image>\nhi"), ("gpt", "hello"))},
    ]
    ds = ConversationDataset(recs, tmp_path, require_image=False)
    assert len(ds) == 1 and ds[0]["image"] is None and ds.bad_samples == {"<image> without image": 1}
    assert ConversationDataset(recs, tmp_path).bad_samples == {"no image": 2}


def _as_list(batch: list) -> list:
    return batch


def test_image_failures_in_workers_reach_the_main_process(world, tmp_path):
    path, _ = write_records(world, tmp_path, "corrupt image")
    ds = ConversationDataset(read_llava_json(path), tmp_path, source=str(path))
    items = [x for b in DataLoader(ds, batch_size=2, num_workers=1, collate_fn=_as_list) for x in b]
    assert sum(x is None for x in items) == 1
    assert ds.bad_samples == {"unreadable image": 1}


# -- COCO captions + Karpathy ----------------------------------------------------------------
def test_coco_captions_with_karpathy_split(world, tmp_path):
    caps = [world / "annotations" / f"captions_{s}.json" for s in ("train", "val", "test")]
    karpathy = json.loads((world / "dataset_coco.json").read_text())
    for split, n in (("train", 10), ("val", 4), ("test", 4)):
        recs = read_coco_captions(caps, world / "dataset_coco.json", split)
        assert len(recs) == n and all(r["image"].startswith(f"{split}/") for r in recs)
        assert all(Path(world / "images" / r["image"]).exists() and len(r["captions"]) >= 1 for r in recs)
    first = karpathy["images"][0]
    rec = read_coco_captions(caps, world / "dataset_coco.json", "train")[0]
    assert rec["captions"] == [s["raw"] for s in first["sentences"]]
    # restval is training data
    for im in karpathy["images"][:3]:
        im["split"] = "restval"
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    assert len(read_coco_captions(caps, tmp_path / "k.json", "train")) == 10
    # without Karpathy: every image of the given file, paths as COCO writes them
    assert {r["image"] for r in read_coco_captions(caps[1])} == {f"val/val_{i:06d}.png" for i in range(4)}
    with pytest.raises(DataFormatError, match="Karpathy split 'val' have no captions in captions_train.json"):
        read_coco_captions(caps[0], world / "dataset_coco.json", "val")


def test_caption_conversations_for_plain_template(world):
    recs = read_coco_captions(world / "annotations" / "captions_val.json")
    each = caption_conversations(recs, per_caption=True)
    assert len(each) == sum(len(r["captions"]) for r in recs)
    assert each[0]["conversations"] == conv(("human", "<image>"), ("gpt", recs[0]["captions"][0]))
    first = caption_conversations(recs, per_caption=False)
    assert len(first) == len(recs) and first[0]["captions"] == recs[0]["captions"]


# -- datamodule ------------------------------------------------------------------------------
def test_corpus_is_train_text_without_image_token(world):
    dm = make_dm(world)
    texts = list(dm.corpus())
    assert texts and not any("<image>" in t for t in texts)
    turns = [
        t["value"].replace("<image>", "").strip()
        for r in read_llava_json(world / "llava_train.json")
        for t in r["conversations"]
    ]
    assert texts == turns


def test_train_and_eval_loaders(world):
    dm = make_dm(world, batch_size=4, eval_batch_size=3, max_val_samples=5)
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    assert train["input_ids"].shape == train["labels"].shape and train["pixel_values"].shape == (4, 3, 32, 32)
    loaders = dm.val_dataloader()
    assert len(loaders[LOSS].dataset) == len(loaders[GENERATE].dataset) == 5
    loss, gen = next(iter(loaders[LOSS])), next(iter(loaders[GENERATE]))
    assert "labels" in loss and "labels" not in gen
    assert gen["id"] == loss["id"] and gen["meta"][0]["qtype"] in {
        "caption",
        "color",
        "shape",
        "count",
        "position",
        "exists",
    }
    val = {r["id"]: r for r in read_llava_json(world / "llava_val.json")}
    assert gen["answer"] == [val[i]["conversations"][-1]["value"] for i in gen["id"]]
    assert (gen["input_ids"][:, -1] != 0).all()  # left padded: every prompt ends at the last column
    test = dm.test_dataloader()
    assert len(test[GENERATE].dataset) == len(read_llava_json(world / "llava_test.json"))  # never capped


def test_datamodule_counts_and_logs_image_failures(world, tmp_path, caplog):
    path, _ = write_records(world, tmp_path, "corrupt image")
    dm = VLMDataModule(
        source="llava_json", root=str(tmp_path), train_json=path.name, batch_size=2, num_workers=1
    )
    dm.attach(FakeProcessor())
    ids = [i for b in dm.train_dataloader() for i in b["id"]]
    assert sorted(ids) == ["r0", "r1", "r3"]
    assert dm.datasets["train"].bad_samples == {"unreadable image": 1}
    with caplog.at_level(logging.WARNING):
        dm.teardown("fit")
        dm.teardown("test")
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 1/4 samples from {path}: 1 unreadable image"
    ]


def test_instantiate_from_hydra_config(tmp_path):
    cfg = OmegaConf.create(
        {
            "_target_": "vlm.data.datamodule.VLMDataModule",
            "root": str(tmp_path / "sw"),
            "batch_size": 2,
            "shapesworld": {
                **WORLD,
                "num_train": 3,
                "colors": ["red", "blue"],
                "train_turns": {"position": 3},
            },
        }
    )
    dm = hydra.utils.instantiate(cfg)
    dm.prepare_data()
    dm.prepare_data()  # idempotent
    manifest = json.loads((tmp_path / "sw" / "manifest.json").read_text())
    assert manifest["config"]["colors"] == ["red", "blue"] and manifest["config"]["num_train"] == 3
    assert manifest["config"]["train_turns"] == {"position": 3}  # a DictConfig, stored as JSON
    assert len(dm.datasets) == 0 and len(list(dm.corpus())) > 0


def test_shapesworld_as_coco_captions(world):
    dm = make_dm(world, reader="coco_captions")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == sum(
        len(r["captions"]) for r in read_coco_captions(world / "annotations" / "captions_train.json")
    )
    gen = next(iter(dm.val_dataloader()[GENERATE]))
    assert gen["meta"][0]["qtype"] == "caption" and gen["answer"][0] == gen["meta"][0]["captions"][0]
    # real COCO without Karpathy: one captions file per split, images beside them
    real = VLMDataModule(
        source="coco_captions",
        root=str(world),
        train_json="annotations/captions_train.json",
        val_json="annotations/captions_val.json",
        image_folder="images",
    )
    real.attach(FakeProcessor())
    real.setup("fit")
    assert len(real.datasets["train"]) == len(dm.datasets["train"])
    assert next(iter(real.val_dataloader()[GENERATE]))["id"] == gen["id"]


def endless(loader: DataLoader):
    """Batches over epochs, calling set_epoch between them as the fit loop does."""
    first = epoch = loader.sampler.epoch
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        assert not empty or epoch == first, f"epoch {epoch} was empty"  # the first may resume at its end
        epoch += 1
        loader.sampler.set_epoch(epoch)


def test_resume_order_without_trainer(world):
    """Consume k batches, save, restore into a new datamodule: the next batch is the same."""
    for k in (1, 3, 4, 5):  # 10 samples, 3 per batch: 4 batches an epoch; 4 ends epoch 0
        dm = make_dm(world, batch_size=3, seed=7)
        it = endless(dm.train_dataloader())
        for _ in range(k):
            next(it)
        state = dm.state_dict()
        expected = next(it)["id"]
        dm2 = make_dm(world, batch_size=3, seed=7)
        dm2.load_state_dict(state)
        assert next(endless(dm2.train_dataloader()))["id"] == expected, (k, state)


def test_length_grouped_batches_hold_similar_lengths_and_resume_in_order(world):
    """Every epoch is a permutation; within each megabatch the order runs longest first; a
    restored position gives the next batch; the two ranks of a DDP pair share no sample."""
    dm = make_dm(world, batch_size=3, seed=7, group_by_length=True)
    loader = dm.train_dataloader()
    ds, sampler = dm.datasets["train"], loader.sampler
    lengths = [sum(len(t["value"].split()) for t in c) for c in ds.conversations()]
    assert len(set(lengths)) > 1 and sampler.lengths == lengths
    order = list(sampler)
    assert sorted(order) == list(range(len(ds)))  # 10 samples < one megabatch: one group
    assert [lengths[k] for k in order] == sorted(lengths, reverse=True)
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(len(ds)))
    it = endless(loader)
    next(it)
    state, expected = dm.state_dict(), next(it)["id"]
    assert state["train_order"]["by_length"] is True
    dm2 = make_dm(world, batch_size=3, seed=7, group_by_length=True)
    dm2.load_state_dict(state)
    assert next(endless(dm2.train_dataloader()))["id"] == expected
    ranks = [
        ResumableSampler(ds, seed=7, num_replicas=2, rank=r, lengths=lengths, batch_size=1) for r in (0, 1)
    ]
    shards = [list(r) for r in ranks]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(10))
    assert length_grouped(list(range(6)), [1, 5, 2, 6, 3, 4], group=3) == [1, 2, 0, 3, 5, 4]


def test_pretokenize_gives_the_same_run_with_the_text_encoded_up_front(shapesworld, tmp_path, caplog):
    """``data.pretokenize`` changes when the text is encoded, not what: the same losses step by
    step; and it needs the text cache it fills."""
    losses = {}
    for on in (False, True):
        args = [*data_overrides(shapesworld), *steps(8, 8), "test=false", f"data.pretokenize={on}"]
        with one_thread(), caplog.at_level(logging.INFO, logger="vlm.data.datamodule"):
            run_train(args, tmp_path / str(on))
        losses[on] = [r["train/loss"] for r in metrics_rows(tmp_path / str(on)) if r.get("train/loss")]
    assert len(losses[True]) == 8 and losses[True] == losses[False]
    assert "pretokenized 64/64 train conversations" in caplog.text
    with pytest.raises(ValueError, match="data.pretokenize fills the text cache: set data.text_cache"):
        VLMDataModule(pretokenize=True, text_cache=0)


class Recorder(L.LightningModule):
    """Records the sample ids of every training batch; optionally reads
    ``estimated_stepping_batches`` in ``configure_optimizers`` like a cosine schedule does."""

    def __init__(self, read_total_steps: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.read_total_steps = read_total_steps
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["id"])
        return (self.w * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        if self.read_total_steps:
            assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveAt(L.Callback):
    def __init__(self, step: int, path: Path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def fit(
    world: Path,
    steps: int,
    ckpt: Path | None = None,
    save_at: int | None = None,
    read_total_steps=False,
    num_workers=0,
    limit=None,
) -> list[list[str]]:
    model = Recorder(read_total_steps)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=10,
        limit_train_batches=limit,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[SaveAt(save_at, ckpt)] if save_at else [],
    )
    dm = make_dm(world, batch_size=3, seed=7, num_workers=num_workers)
    trainer.fit(model, datamodule=dm, ckpt_path=None if save_at else ckpt)
    return model.seen


@pytest.mark.parametrize(
    "save_at,read_total_steps,num_workers,limit",
    [
        (2, False, 0, None),
        (4, False, 0, None),
        (6, True, 0, None),
        (4, False, 1, None),
        (6, True, 1, None),
        (2, False, 1, 2),
    ],
)
def test_resume_order_through_lightning(world, tmp_path, save_at, read_total_steps, num_workers, limit):
    """fit(ckpt_path=...) continues the exact data order of an uninterrupted run: mid-epoch and at
    an epoch's end (4 batches an epoch, or 2 with limit_train_batches), also when
    configure_optimizers reads estimated_stepping_batches (Lightning then builds the loader before
    it restores loop state) and with a worker (whose first iterator draws indices before the fit
    loop's set_epoch)."""
    opts = dict(read_total_steps=read_total_steps, num_workers=num_workers, limit=limit)
    full = fit(world, 9, **opts)
    assert full[:4] != full[4:8]  # epochs are shuffled differently
    ckpt = tmp_path / "step.ckpt"
    assert fit(world, save_at, ckpt, save_at, **opts) == full[:save_at]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fit(world, 9, ckpt, **opts) == full[save_at:]
    assert not [w for w in caught if "not resumable" in str(w.message)]


def test_a_data_mix_of_several_llava_files_reads_them_in_order(tmp_path):
    (tmp_path / "mix665k.json").write_text(json.dumps([{"id": "a", "conversations": []}]))
    lines = [json.dumps({"id": i, "conversations": []}) for i in "bc"]
    (tmp_path / "cambrian.jsonl").write_text("\n".join(lines) + "\n")
    dm = VLMDataModule(source="llava_json", root=str(tmp_path), train_json=["mix665k.json", "cambrian.jsonl"])
    ds = dm._dataset("train")
    assert [r["id"] for r in ds.records] == ["a", "b", "c"]
    assert "mix665k.json" in ds.source and "cambrian.jsonl" in ds.source  # bad samples name both


def test_data_text_cache_reaches_the_processor(tmp_path):
    class Processor:
        size = None

        def cache_text(self, size):
            self.size = size

    for n, expected in ((0, None), (500, 500)):
        proc = Processor()
        VLMDataModule(source="llava_json", root=str(tmp_path), text_cache=n).attach(proc)
        assert proc.size == expected
