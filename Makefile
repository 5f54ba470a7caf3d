# The only commands a user needs. `make` lists them; each one installs the environment first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Re-run setup whenever pyproject.toml changes.
STAMP := $(VENV)/.vlm-setup.stamp
# torch/torchvision pins, read from pyproject.toml so there is one source of truth.
TORCH_PINS := $(shell grep -oE '"torch(vision)?==[^"]+"' pyproject.toml | tr -d '"')
ARGS ?=
STAGE2_ARGS ?=
# Installed without its dependencies: pyproject.toml lists those it needs (see the comment there).
LMMS_EVAL := lmms-eval==0.7.3

.PHONY: help setup setup-browser train eval demo sweep-calm sweep-mlvf sweep-qformer sweep-dense sweep-sam sweep-positions bench-gpu-dense bench-gpu test test-full prove-resume lint bench bench-train clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-16s %s\n", $$1, $$2}'
	@echo "  Variables: ARGS='<hydra overrides>' (train, bench), STAGE2_ARGS (train's stage 2 only), BAR and VAL_EVERY (bench-train), VENV=$(VENV)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH_PINS)
	$(BIN)/python -m pip install -e '.[dev]'
	$(BIN)/python -m pip install --no-deps $(LMMS_EVAL)
	touch $@

setup: $(STAMP) ## Create the venv and install the package with dev tools (once; again when pyproject changes)

# The default run: LLaVA's stages on ShapesWorld, each starting from the last one's last.ckpt:
# captions of one object, captions of one or two, then visual instruction tuning.
RUN := logs/llava_shapes/$(shell date +%Y-%m-%d_%H-%M-%S)
train: setup ## Train the default experiment, stages 1, 1b and 2 (ARGS='<overrides for all>')
	$(BIN)/vlm-train experiment=llava_shapes_stage1 hydra.run.dir=$(RUN)/stage1 $(ARGS)
	$(BIN)/vlm-train experiment=llava_shapes_stage1b hydra.run.dir=$(RUN)/stage1b \
		stage.init_from=$(RUN)/stage1/checkpoints/last.ckpt $(ARGS)
	$(BIN)/vlm-train experiment=llava_shapes hydra.run.dir=$(RUN)/stage2 \
		stage.init_from=$(RUN)/stage1b/checkpoints/last.ckpt $(ARGS) $(STAGE2_ARGS)
	@echo "checkpoint: $(RUN)/stage2/checkpoints/last.ckpt"

# The default checkpoint (the newest `make train` stage-2 best, or CKPT=<path.ckpt>) on every
# benchmark its ShapesWorld writes in a published layout: VQAv2, GQA, POPE, MME, through the same
# readers and official scorers as the real ones (vlm.eval), asked the bare question as in
# training; then the rows as one table, and lmms-eval's own run of the test questions of the
# default run's data set (SHAPES).
CKPT ?= $(lastword $(sort $(wildcard logs/llava_shapes/*/stage2/checkpoints/best-*.ckpt)))
EVAL := logs/eval/$(shell date +%Y-%m-%d_%H-%M-%S)
EMBEDDED := vqav2 gqa pope mme
SHAPES ?= data/shapesworld/llava_shapes
eval: setup ## Score the default checkpoint (CKPT=...) on every embedded benchmark: one table
	@test -n "$(CKPT)" || { echo "make eval: no logs/llava_shapes/*/stage2 checkpoint: run make train, or CKPT=<path.ckpt>"; exit 1; }
	for b in $(EMBEDDED); do \
		$(BIN)/vlm-eval ckpt=$(CKPT) benchmark=$$b "benchmark.prompt_suffix=''" out_dir=$(EVAL)/$$b $(ARGS) || exit 1; \
	done
	@{ echo "| benchmark | split | n | figures |"; echo "|---|---|---|---|"; \
		cat $(foreach b,$(EMBEDDED),$(EVAL)/$(b)/row.md); } | tee $(EVAL)/table.md
	SHAPESWORLD_DIR=$(SHAPES) HF_DATASETS_OFFLINE=1 $(BIN)/lmms-eval --model vlm_lab \
		--model_args ckpt=$(CKPT) --include_path vlm/eval/lmms/tasks --tasks shapesworld_vqa \
		--batch_size 32 --output_path $(EVAL)/lmms_eval

# The web demo of a checkpoint (default: the newest `make train` one), on http://127.0.0.1:7860.
demo: setup ## Web demo: ask a checkpoint about an image (ARGS='ckpt=<path.ckpt> port=7860 host=...')
	$(BIN)/vlm-demo $(ARGS)

# Debian's chromium, which the demo's browser test drives (Playwright cannot download its own offline).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
setup-browser: ## Install Debian's chromium for the demo's browser test (apt-get; sudo unless root)
	test -x /usr/bin/chromium || { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }

# CALM's ablation (sweeps/calm_layers_heads.yaml, 48 jobs) and its CLIP-only baseline in one
# folder, then the table: every job, and test accuracy by layers x fusion (mean over heads).
SWEEP_CALM := logs/sweep_calm/$(shell date +%Y-%m-%d_%H-%M-%S)
sweep-calm: setup ## CALM layers x heads x fusion on ShapesWorld + CLIP-only baseline, and the report
	$(BIN)/vlm-train -m --config-dir sweeps --config-name calm_layers_heads \
		hydra.sweep.dir=$(SWEEP_CALM)/calm $(ARGS)
	$(BIN)/vlm-train -m experiment=calm_shapes_clip_only task_name=sweep_calm \
		hydra.sweep.dir=$(SWEEP_CALM)/clip_only $(ARGS)
	$(BIN)/vlm-report $(SWEEP_CALM) --metric test/acc \
		--rows family.model.calm.num_layers --cols family.model.calm.fusion

# Layer fusion's ablation (sweeps/mlvf_grid.yaml: 4 strategies x 6 layer sets) and plain LLaVA on
# the same tiny model, one job after another; then the 4x6 table (markdown, CSV) and heatmap.
# On a SLURM cluster: ARGS='hydra/launcher=slurm trainer=gpu' (one job per cell).
SWEEP_MLVF := logs/sweep_mlvf/$(shell date +%Y-%m-%d_%H-%M-%S)
sweep-mlvf: setup ## Layer fusion strategies x layer sets on ShapesWorld + plain LLaVA, and the report
	$(BIN)/vlm-train -m --config-dir sweeps --config-name mlvf_grid \
		hydra.sweep.dir=$(SWEEP_MLVF)/mlvf $(ARGS)
	$(BIN)/vlm-train -m experiment=mlvf_shapes family=llava task_name=sweep_mlvf \
		hydra.sweep.dir=$(SWEEP_MLVF)/llava $(ARGS)
	$(BIN)/vlm-report $(SWEEP_MLVF) --metric test/acc --rows fusion --cols layers

SWEEP_QFORMER := logs/sweep_qformer/$(shell date +%Y-%m-%d_%H-%M-%S)
sweep-qformer: setup ## Q-Former captioner unfreezing x queries x conditioning on ShapesWorld, and the report
	$(BIN)/vlm-train -m --config-dir sweeps --config-name qformer_grid \
		hydra.sweep.dir=$(SWEEP_QFORMER) $(ARGS)
	$(BIN)/vlm-report $(SWEEP_QFORMER) --metric test/bleu4 --rows unfreeze --cols conditioning
	$(BIN)/vlm-report $(SWEEP_QFORMER) --metric test/cider --rows unfreeze --cols conditioning

# The dense_connector seed's matrix on ShapesWorld: curate its two subsets (vlm-curate), the 19
# stage-1 rows (rows 14-19 once with mlp4x_gelu and once with DCI in 4 groups), the 6 stage-2
# rows from their stage-1 checkpoints, then both tables: test accuracy per question type and
# the best val/loss, per row. ARGS apply to every training run.
SWEEP_DENSE := logs/sweep_dense/$(shell date +%Y-%m-%d_%H-%M-%S)
DENSE_ROWS := dense_matrix=row14,row15,row16,row17,row18,row19 connector=mlp4x_gelu,dense_dci4 \
	logger.wandb.project=multimodal-llama-dense-connector
DENSE_KEYS := --metric test/acc --extra val/loss:min --keys dense_matrix data.train_json connector \
	template scheduler trainer.max_epochs data.batch_size
sweep-dense: setup ## Dense connector: curation, the seed's 19 + 6 runs on ShapesWorld, and the matrix
	$(BIN)/vlm-curate
	$(BIN)/vlm-train -m --config-dir sweeps --config-name dense_connector_matrix \
		hydra.sweep.dir=$(SWEEP_DENSE)/stage1 $(ARGS)
	$(BIN)/vlm-train -m --config-dir sweeps --config-name dense_connector_matrix $(DENSE_ROWS) \
		hydra.sweep.dir=$(SWEEP_DENSE)/stage1 $(ARGS)
	$(BIN)/vlm-train -m --config-dir sweeps --config-name dense_connector_stage2 \
		hydra.sweep.dir=$(SWEEP_DENSE)/stage2 $(ARGS)
	$(BIN)/vlm-train -m --config-dir sweeps --config-name dense_connector_stage2 \
		dense_matrix=row16,row19 connector=mlp4x_gelu,dense_dci4 \
		logger.wandb.project=multimodal-llama-dense-connector hydra.sweep.dir=$(SWEEP_DENSE)/stage2 $(ARGS)
	$(BIN)/vlm-report $(SWEEP_DENSE)/stage1 $(DENSE_KEYS)
	$(BIN)/vlm-report $(SWEEP_DENSE)/stage2 $(DENSE_KEYS)

# image_positions x 3 seeds on the default run's three stages (sweeps/image_positions.yaml): each
# stage starts from the same mode's and seed's last checkpoint of the stage before; then test
# accuracy per question type per run, and position accuracy as mode x seed.
SWEEP_POS := logs/sweep_positions/$(shell date +%Y-%m-%d_%H-%M-%S)
POS_FROM = stage.init_from='$${hydra:sweep.dir}/../$(1)/$${hydra:runtime.choices.image_positions}-seed$${seed}/checkpoints/last.ckpt'
POS_KEYS := --keys image_positions seed --extra test/acc test/acc_color test/acc_shape test/acc_count test/acc_exists
sweep-positions: setup ## Image-token positions (flat, mrope, sincos2d, learned2d) x 3 seeds, default recipe, and the tables
	$(BIN)/vlm-train -m --config-dir sweeps --config-name image_positions hydra.sweep.dir=$(SWEEP_POS)/stage1 $(ARGS)
	$(BIN)/vlm-train -m --config-dir sweeps --config-name image_positions experiment=llava_shapes_stage1b \
		$(call POS_FROM,stage1) hydra.sweep.dir=$(SWEEP_POS)/stage1b $(ARGS)
	$(BIN)/vlm-train -m --config-dir sweeps --config-name image_positions experiment=llava_shapes \
		$(call POS_FROM,stage1b) hydra.sweep.dir=$(SWEEP_POS)/stage2 $(ARGS)
	$(BIN)/vlm-report $(SWEEP_POS)/stage2 --metric test/acc_position $(POS_KEYS)
	$(BIN)/vlm-report $(SWEEP_POS)/stage2 --metric test/acc_position --rows image_positions --cols seed

# The sam_segmentation ablation (sweeps/sam_grid.yaml: mode x prompt x LoRA rank x precision,
# 16 shorter runs of experiment=sam_shapes), then the tables: test gIoU (and per expression
# type) and cIoU per job, and gIoU as mode x prompt.
SWEEP_SAM := logs/sweep_sam/$(shell date +%Y-%m-%d_%H-%M-%S)
SAM_KEYS := --keys mode prompt stage.tune.llm.lora_r trainer.precision --extra test/ciou val/giou:max
sweep-sam: setup ## VLM-to-SAM mode x prompt x LoRA rank x precision on ShapesWorld, and the tables
	$(BIN)/vlm-train -m --config-dir sweeps --config-name sam_grid hydra.sweep.dir=$(SWEEP_SAM) $(ARGS)
	$(BIN)/vlm-report $(SWEEP_SAM) --metric test/giou $(SAM_KEYS)
	$(BIN)/vlm-report $(SWEEP_SAM) --metric test/giou --rows mode --cols prompt

test: export HF_HUB_OFFLINE := 1
test: setup ## Run the fast tests (not slow, not gpu)
	$(BIN)/python -m pytest -m "not slow and not gpu" $(ARGS)

test-full: export HF_HUB_OFFLINE := 1
test-full: setup ## Run every test that needs no GPU, slow ones included
	$(BIN)/python -m pytest -m "not gpu" $(ARGS)

prove-resume: setup ## Kill a run with SIGKILL at 3 random steps, resume each time: same weights as unkilled
	HF_HUB_OFFLINE=1 $(BIN)/python tests/apps/kill_resume.py --workers 2 $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python tests/apps/kill_resume.py --workers 2 --ddp $(ARGS)

lint: setup ## ruff check + ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Time to accuracy as MLPerf measures it: stage 2 validates every VAL_EVERY steps and stops at
# the first val/acc above BAR (callbacks=stop_at_target); the test split then says whether it holds.
BENCH_TRAIN := logs/bench_train/$(shell date +%Y-%m-%d_%H-%M-%S)
BAR ?= 0.9
VAL_EVERY ?= 100
bench-train: setup ## Time-to-accuracy of the default run: make train to BAR=0.9, timed part by part, and the table
	$(MAKE) --no-print-directory train RUN=$(BENCH_TRAIN) ARGS="$(ARGS)" STAGE2_ARGS="callbacks=stop_at_target \
		callbacks.stop_at_target.stopping_threshold=$(BAR) trainer.val_check_interval=$(VAL_EVERY) $(STAGE2_ARGS)"
	$(BIN)/python -m vlm.bench.train_report $(BENCH_TRAIN) --bar $(BAR)

bench: setup ## Benchmark the default configuration (ARGS='...')
	$(BIN)/vlm-bench $(ARGS)

bench-gpu-dense: setup ## On a GPU: the GPU tests and the dense_connector card's real-size benchmarks
	PY=$(BIN)/python bash experiments/dense_connector/bench_gpu.sh

# Every row of ../shared/PERF.md, ours (vlm-bench) and the reference (../shared/bench, or
# REFERENCE_DIR / reference_dir=), in 2 rounds each; ARGS: size=tiny (CPU check), rows=calm,llava,
# layer_fusion,caption,segmentation, rounds=, out=, timeout= (per run), budget= (all runs, s).
bench-gpu: setup ## On a GPU: PERF.md's rows, ours and the references, 2 rounds, one table (ARGS='size=tiny ...')
	HF_HUB_OFFLINE=1 $(BIN)/python -m vlm.bench.gpu_table $(ARGS)

clean: ## Remove logs, outputs and caches (keeps data/ and the venv)
	rm -rf logs outputs multirun wandb .pytest_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
