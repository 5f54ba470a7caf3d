"""Safety and failure, as a user (or a hostile file) meets them: a crafted checkpoint runs no
code, a config instantiates only the field's packages, every user error is said in one line
before anything is built (the traceback in the run's log file), and a checkpoint of the
earlier release is converted once."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from runs import (
    cli,
    cli_train_args,
    compose_run,
    data_overrides,
    experiment_names,
    load_ckpt,
    shapesworld_root,
)

from vlm.core.lit_module import VLMLitModule
from vlm.runtime.validate import check_targets


class WritesAFile:
    """Pickles as a call to ``open(marker, "w")``: unpickling it creates the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def said_in_one_line(proc, error: str, message: str) -> None:
    """The command failed, printed no traceback, and its last stderr line is the error."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{error}: ") and re.search(message, last), last


@pytest.fixture
def crafted(trained_run, tmp_path) -> tuple[Path, Path]:
    """A real checkpoint with one object that runs code when unpickled, and its marker file."""
    out, _ = trained_run
    marker = tmp_path / "ran"
    ckpt = load_ckpt(out / "checkpoints" / "last.ckpt")
    path = tmp_path / "shared.ckpt"
    torch.save({**ckpt, "vlm": {**ckpt["vlm"], "note": WritesAFile(marker)}}, path)
    return path, marker


def test_a_crafted_checkpoint_runs_no_code_in_any_command(crafted, shapesworld, tmp_path):
    path, marker = crafted
    image = shapesworld_root(shapesworld) / "images" / "test" / "test_000000.png"
    commands = {
        "vlm-predict": [f"ckpt={path}", f"image={image}", "question=What shape?"],
        "vlm-eval": [f"ckpt={path}"],
        "vlm-export": [f"ckpt={path}", f"out={tmp_path / 'export'}"],
        "vlm-train": [*cli_train_args(shapesworld, tmp_path / "logs"), f"stage.init_from={path}"],
    }
    for name, args in commands.items():
        proc = cli(name, args, tmp_path, timeout=120)
        said_in_one_line(proc, "CheckpointError", "holds objects other than tensors and plain values")
        assert not marker.exists(), name
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        VLMLitModule.from_checkpoint(path)
    assert not marker.exists()


def test_a_config_instantiates_only_the_fields_packages(tmp_path):
    cfg = compose_run(["+callbacks.evil._target_=builtins.print"], tmp_path)
    with pytest.raises(ValueError, match=r"callbacks.evil._target_='builtins.print' is outside the packages"):
        check_targets(cfg)
    cfg.allow_external_targets = True
    check_targets(cfg)
    for experiment in experiment_names():  # everything shipped passes
        check_targets(compose_run([f"experiment={experiment}"], tmp_path))


def truncated(trained_run, tmp_path) -> Path:
    out, _ = trained_run
    data = (out / "checkpoints" / "last.ckpt").read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    return path


USER_ERRORS = {  # overrides -> (error class, message pattern)
    "layer set past the depth": (
        ["experiment=mlvf_shapes", "layers=custom", "layers.blocks=[30]"],
        "ConfigError",
        r"layers=custom: block 30 is outside the 24-block encoder 'tiny_clip' \(valid 1\.\.24\)$",
    ),
    "CALM n not dividing the depth": (
        ["experiment=calm_shapes", "family.model.calm.num_layers=5"],
        "ConfigError",
        r"calm.num_layers=5 does not divide the anchor's 24 blocks .* one of \[1, 2, 3, 4, 6, 8, 12, 24\]$",
    ),
    "LoRA target not in the LLM": (
        ["stage.tune.llm.type=lora", "stage.tune.llm.lora_targets=[q_prj]"],
        "ConfigError",
        r"q_prj",
    ),
    "frozen dtype without mixed precision": (
        ["stage.frozen_dtype=bf16"],
        "ConfigError",
        r"stage.frozen_dtype=bf16 needs a mixed trainer.precision .* got 32-true$",
    ),
    "external target": (
        ["+callbacks.evil._target_=os.system", "+callbacks.evil.command=true"],
        "ConfigError",
        r"callbacks.evil._target_='os.system' is outside the packages .*: set allow_external_targets=true",
    ),
    "a data file that is not there": (
        ["data=llava_json", "data.root=/nonexistent", "data.train_json=train.json"],
        "ConfigError",
        r"data.train_json: /nonexistent/train.json does not exist$",
    ),
    "missing hub weights": (
        ["encoder=clip_vit_b32"],
        "CheckpointMissingError",
        r"checkpoint 'openai/clip-vit-base-patch32' is not in the local HF cache .*encoder.pretrained=false$",
    ),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_a_user_error_is_one_line_before_anything_is_built(case, shapesworld, tmp_path):
    overrides, error, message = USER_ERRORS[case]
    logs = tmp_path / "logs"
    data = [] if "data=llava_json" in overrides else data_overrides(shapesworld)
    args = [*data, f"paths.log_dir={logs}", "logger=csv", *overrides]
    proc = cli("vlm-train", args, tmp_path, timeout=120)
    said_in_one_line(proc, error, message)
    (run,) = (logs / "train" / "runs").iterdir()
    assert not (run / "tokenizer").exists() and not (run / "checkpoints").exists()  # nothing built
    assert "Traceback" in (run / "train.log").read_text()  # the traceback went to the log file


def test_a_truncated_checkpoint_is_refused_in_one_line(trained_run, shapesworld, tmp_path):
    path = truncated(trained_run, tmp_path)
    proc = cli(
        "vlm-train", [*cli_train_args(shapesworld, tmp_path / "logs"), f"ckpt_path={path}"], tmp_path, 120
    )
    said_in_one_line(proc, "CheckpointError", rf"ckpt_path: {re.escape(str(path))} is not a torch checkpoint")
    image = shapesworld_root(shapesworld) / "images" / "test" / "test_000000.png"
    out, _ = trained_run
    proc = cli(
        "vlm-predict",
        [f"ckpt={out / 'checkpoints' / 'last.ckpt'}", f"image={image}", "question=  "],
        tmp_path,
        120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "ConfigError: vlm-predict: the question is empty: give question='...'"
    )


def test_with_hydra_full_error_the_traceback_is_printed(shapesworld, tmp_path):
    env = {"HYDRA_FULL_ERROR": "1"}
    args = [*cli_train_args(shapesworld, tmp_path / "logs"), "stage.frozen_dtype=int8"]
    os.environ.update(env)
    try:
        proc = cli("vlm-train", args, tmp_path, timeout=120)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "stage.frozen_dtype='int8': choose from bf16, fp16 or null" in proc.stderr


def test_a_checkpoint_of_the_earlier_release_is_converted_once(trained_run, tmp_path):
    """The earlier release wrote one LightningModule per family, ``qtypes`` and
    ``frozen_dtype`` as module arguments, a model config without ``_target_`` and OmegaConf
    nodes among the data module's arguments; converted, it loads weights-only and is the
    same model."""
    out, _ = trained_run
    new = load_ckpt(out / "checkpoints" / "last.ckpt")
    hp = dict(new["hyper_parameters"])
    model = {k: v for k, v in hp.pop("model").items() if k != "_target_"}
    qtypes = hp.pop("objective")["qtypes"]
    old = {
        **new,
        "hyper_parameters": {**hp, "model": model, "qtypes": qtypes, "frozen_dtype": None},
        "datamodule_hyper_parameters": {
            **new["datamodule_hyper_parameters"],
            "shapesworld": OmegaConf.create(new["datamodule_hyper_parameters"]["shapesworld"]),
        },
        "vlm": {
            "module": "vlm.families.llava.module.LlavaModule",
            "tokenizer": new["vlm"]["tokenizer"],
            "data": new["vlm"]["data"],
        },
    }
    src, dst = tmp_path / "old.ckpt", tmp_path / "new.ckpt"
    torch.save(old, src)
    with pytest.raises(ValueError, match="convert it once with vlm-convert|holds objects other than"):
        VLMLitModule.from_checkpoint(src)
    proc = cli("vlm-convert", [f"ckpt={src}", f"out={dst}"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    converted = load_ckpt(dst)  # weights-only
    assert (
        converted["vlm"]["format"] == 2 and converted["vlm"]["module"] == "vlm.core.lit_module.VLMLitModule"
    )
    assert converted["hyper_parameters"]["objective"] == new["hyper_parameters"]["objective"]
    assert converted["hyper_parameters"]["model"] == new["hyper_parameters"]["model"]
    assert all(torch.equal(converted["state_dict"][k], v) for k, v in new["state_dict"].items())
    module = VLMLitModule.from_checkpoint(dst)
    assert type(module) is VLMLitModule and module.objective.qtypes == qtypes


def test_a_bad_image_with_raise_in_a_loader_worker_is_one_line_from_the_main_process(shapesworld, tmp_path):
    root = shapesworld_root(shapesworld)
    copy = tmp_path / "data" / root.relative_to(shapesworld)
    shutil.copytree(root, copy)
    victim = copy / "images" / "train" / "train_000005.png"
    victim.write_bytes(victim.read_bytes()[:40])
    args = [
        *cli_train_args(tmp_path / "data", tmp_path / "logs"), "data.on_bad_sample=raise",
        "data.num_workers=2", "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0",
    ]  # fmt: skip
    proc = cli("vlm-train", args, tmp_path, timeout=180)
    where = r"llava_train\.json record \d+ \(id \w+\)"
    said_in_one_line(proc, "BadSampleError", rf"{where}: unreadable image: {re.escape(str(victim))}")
