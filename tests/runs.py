"""Running the real entry points from tests: compose ``conf/train.yaml`` as ``@hydra.main``
would, call ``train``, run console scripts, and read back what a run wrote."""

import contextlib
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from vlm.cli.common import CONFIG_DIR
from vlm.cli.train import train
from vlm.core.zoo.errors import UnknownModelError
from vlm.core.zoo.registry import llm_entry, vision_entry

APPS = Path(__file__).parent / "apps"  # train_probes, importable by console-script runs too
BIN = Path(sys.executable).parent  # the venv's console scripts
SHAPES = ["num_train=64", "num_val=16", "num_test=16"]
PROBE = "+callbacks.batch_log._target_=train_probes.BatchLog"


def data_overrides(data_dir: Path) -> list[str]:
    """The shared tiny ShapesWorld: 64 train images (8 steps of 8), 16 val samples."""
    return [
        f"paths.data_dir={data_dir}",
        *(f"data.shapesworld.{kv}" for kv in SHAPES),
        "data.batch_size=8",
        "data.max_val_samples=16",
    ]


def cli_train_args(data_dir: Path, log_dir: Path) -> list[str]:
    """``vlm-train`` as a command on the tiny ShapesWorld: csv logs under ``log_dir``, no test."""
    return [*data_overrides(data_dir), f"paths.log_dir={log_dir}", "logger=csv", "test=false"]


def steps(n: int, val_every: int) -> list[str]:
    """Train ``n`` optimizer steps, validating every ``val_every`` steps, logging every step."""
    return [
        f"trainer.max_steps={n}",
        "trainer.max_epochs=-1",
        "trainer.check_val_every_n_epoch=null",
        f"trainer.val_check_interval={val_every}",
        "trainer.log_every_n_steps=1",
    ]


def compose_run(overrides: list[str], output_dir: Path) -> DictConfig:
    """``conf/train.yaml`` as ``@hydra.main`` hands it to ``train``: Hydra's run config set
    (output dir in tmp), the ``hydra`` node itself removed."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def experiment_names() -> list[str]:
    return sorted(
        p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml") if not p.stem.startswith("_")
    )


def experiment_overrides(experiment: str, data_dir: Path, *extra: str) -> list[str]:
    """``experiment`` on the shared tiny ShapesWorld under ``data_dir`` (stage-1 experiments
    with 16 caption scenes of their own), then ``extra``; one on real data files as it is."""
    try:
        as_written = compose_run([f"experiment={experiment}"], data_dir)
    finally:
        HydraConfig.instance().cfg = None
    if as_written.data.source != "shapesworld":
        return [f"experiment={experiment}", *extra]
    tiny = data_overrides(data_dir)
    if OmegaConf.select(as_written, "data.shapesworld.num_pretrain", default=None):
        tiny.append("data.shapesworld.num_pretrain=16")
    return [f"experiment={experiment}", *tiny, *extra]


TEXT_ONLY = [  # mix665k has conversations without an image
    {"id": f"text{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    for i, (q, a) in enumerate(
        [("Name a colour.", "red"), ("Name a shape.", "a circle"), ("Count to two.", "one two")]
    )
]


def shapesworld_as(source: str, data_dir: Path, out: Path) -> list[str]:
    """Overrides that point a real-data config (``llava_json``, ``coco_captions``) at the files
    ShapesWorld wrote in that format under ``data_dir``: LLaVA JSON plus a few text-only
    records (no val file: validation holds out part of train), or COCO captions with their
    Karpathy split file."""
    root = shapesworld_root(data_dir)
    if source == "coco_captions":
        every = "[" + ",".join(f"annotations/captions_{s}.json" for s in ("train", "val", "test")) + "]"
        files = [f"data.{split}_json={every}" for split in ("train", "val", "test")]
        karpathy = ["data.karpathy_json=dataset_coco.json", "data.image_folder=images"]
        return [f"data.root={root}", *files, *karpathy]
    mix = out / "llava_mix.json"
    mix.parent.mkdir(parents=True, exist_ok=True)
    mix.write_text(json.dumps([*json.loads((root / "llava_train.json").read_text()), *TEXT_ONLY]))
    return [f"data.root={out}", f"data.train_json={mix.name}", f"data.image_folder={root}"]


def tiny_real_data(cfg: DictConfig, data_dir: Path, out: Path) -> list[str]:
    """A real-data, real-weights experiment made runnable here: its data config pointed at
    ShapesWorld's files in that format, every part at its tiny preset (``+size=tiny``, random
    weights), CALM's module count cut to what the tiny anchor's 2 blocks allow."""
    overrides = [*shapesworld_as(cfg.data.source, data_dir, out), "+size=tiny"]
    if "calm" in cfg.family.get("model", {}):
        overrides.append("family.model.calm.num_layers=2")
    return overrides


def pretrained_hub_ids(cfg: DictConfig) -> set[str]:
    """Hub ids of every zoo part (and hub tokenizer) the config loads with real weights."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            if node.get("pretrained") is True and isinstance(node.get("name"), str):
                try:
                    entry = vision_entry(node["name"])
                except UnknownModelError:
                    entry = llm_entry(node["name"])
                found.add(entry.hub_id or node["name"])  # timm: its own hub id, named by the error
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(OmegaConf.to_container(cfg, resolve=True))
    if cfg.tokenizer.get("name") not in (None, "auto"):
        found.add(cfg.tokenizer.name)
    return found


def offline_reason(cfg: DictConfig) -> str | None:
    """Why a composed run cannot run on a test machine (its data files or hub weights), else None."""
    if cfg.data.source != "shapesworld":
        return f"reads {cfg.data.source} files, which a test machine does not have"
    hub_ids = pretrained_hub_ids(cfg)
    return f"loads hub weights {sorted(hub_ids)}" if hub_ids else None


def with_probes(overrides: list[str]) -> list[str]:
    """The probes (``tests/apps/train_probes.py``) are code outside ``vlm``: a run that adds
    one allows external targets, as a user's own callback would."""
    if any("train_probes." in o for o in overrides) and "allow_external_targets=true" not in overrides:
        return [*overrides, "allow_external_targets=true"]
    return overrides


def run_train(overrides: list[str], output_dir: Path) -> dict[str, float]:
    try:
        return train(compose_run(with_probes(overrides), output_dir))
    finally:
        HydraConfig.instance().cfg = None


def cli(name: str, args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """A console script of this venv, as a user runs it (probes importable, one thread)."""
    path = os.pathsep.join(filter(None, [str(APPS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "WANDB_MODE": "offline"}
    return subprocess.run(
        [str(BIN / name), *with_probes(args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    (path,) = run_dir.glob("csv/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def per_step(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """``key`` by global step, from the rows that have it."""
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def batches(run_dir: Path, rank: int = 0) -> dict[int, list[str]]:
    lines = (run_dir / f"batches_rank{rank}.jsonl").read_text().splitlines()
    return {(d := json.loads(line))["step"]: d["samples"] for line in lines}


def final_state(run_dir: Path, rank: int = 0) -> dict:
    return json.loads((run_dir / f"state_rank{rank}.json").read_text())


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # our checkpoints hold no code


def shapesworld_root(data_dir: Path) -> Path:
    """The folder the data config generates the tiny ShapesWorld in, under ``data_dir``."""
    try:
        return Path(compose_run(data_overrides(data_dir), data_dir).data.root)
    finally:
        HydraConfig.instance().cfg = None


@contextlib.contextmanager
def one_thread():
    """In-process runs use one intra-op thread, as the CLI runs here do (OMP_NUM_THREADS=1): on
    shared cores two threads that wait for each other make a tiny model many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encode_batch(processor, samples: list[dict], prompts: bool = False) -> dict:
    """Samples as the data module batches them: training items, or prompts to generate from."""
    if prompts:
        return processor.collate_prompts([processor.encode_prompt(s) for s in samples])
    return processor.collate([processor.encode(s) for s in samples])


def vqa_batch(module, prompts: bool = False, colours=("red", "blue")) -> dict:
    """One question about a plain image of each colour, through the module's own processor."""
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red circle"}]
    samples = [{"image": Image.new("RGB", (32, 32), c), "conversations": turns} for c in colours]
    return encode_batch(module.processor, samples, prompts)


def open_gates(part: torch.nn.Module, value: float = 0.5) -> None:
    """Every tanh gate of ``part`` (``*_gate``) set off zero, so what is behind it acts."""
    for name, p in part.named_parameters():
        if name.endswith("_gate"):
            p.data.fill_(value)


def on_cuda(batch: dict) -> dict:
    """A collated batch with its tensors on the GPU (the rest, ids and metadata, as it is)."""
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
