# The README's commands. Each creates .venv and installs what it needs on first use.
#
# PyTorch goes in first, on its own, so a GPU user picks the build, e.g.
#   make test TORCH_SPEC=torch==2.13.0 TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
# The default takes the CPU build of torch 2.13.0 (an open range would pull GBs of CUDA packages).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DATA ?= ../shared/data/wikitext-2
BIN := $(VENV)/bin

.PHONY: install demo test lint bench gpu-check clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e ".[dev,hf,serve,eval]"
	touch $@

install: $(BIN)/.installed

# ASHEM end to end (configs/ashem.yaml) on a slice of word-level WikiText-2, at most 3 epochs
# per phase: about 5 minutes on 2 CPU cores. Drop the overrides for the research's full setup.
demo: install
	$(BIN)/lego fit --config configs/ashem.yaml --data.path $(DATA) \
		--data.max_train_samples 2000 --data.calibration_samples 500 --data.max_val_samples 500 \
		--model.phase1_max_epochs 3 --model.phase2_max_epochs 3 \
		--trainer.log_every_n_steps 8

# Test files spread over one worker per core (pytest-xdist): a file's tests share a worker, so the checkpoints
# its fixtures train are trained once.
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist loadfile

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Research-size benchmarks: hours on 2 CPU cores, minutes on a GPU. Results land in
# benchmarks/results/ (markdown, JSON, curves); each module's --help lists smaller settings.
bench: install
	$(BIN)/python -m pip install --quiet -e ".[dev,hf,serve,bench]"
	$(BIN)/python -m benchmarks.char_study
	$(BIN)/python -m benchmarks.speed
	$(BIN)/python -m benchmarks.ashem
	$(BIN)/python -m benchmarks.progressive
	$(BIN)/python -m benchmarks.phase2_cost
	$(BIN)/python -m benchmarks.sd_study
	$(BIN)/python -m benchmarks.early_exit
	$(BIN)/python -m benchmarks.faults
	$(BIN)/python -m benchmarks.growth_plans
	$(BIN)/python -m benchmarks.ashem_phase2
	$(BIN)/python -m benchmarks.ashem --tokenizer bpe --vocab-cap 8192 --variants ours learned \
		--baselines standard_4_layers --name ashem_bpe
	$(BIN)/python -m benchmarks.data_scale --scales 1 10 100
	$(BIN)/python -m benchmarks.pretrained
	$(BIN)/python -m benchmarks.exits_added
	$(BIN)/python -m benchmarks.layerskip --seeds 0 1 2 --keep benchmarks/checkpoints/layerskip
	$(BIN)/python -m benchmarks.speculative
	$(BIN)/python -m benchmarks.draft_mining --seeds 0 1 2
	$(BIN)/python -m benchmarks.decoding
	$(BIN)/python -m benchmarks.greedy_hashes --against greedy_hashes_b19f5bb
	$(BIN)/python -m benchmarks.speculative_cells --against speculative_cells_b19f5bb
	$(BIN)/python -m benchmarks.auto_draft
	$(BIN)/python -m benchmarks.auto_draft_priced
	$(BIN)/python -m benchmarks.full_depth_stagger
	$(BIN)/python -m benchmarks.serve

# On a machine with one CUDA GPU (install torch's CUDA build through TORCH_SPEC/TORCH_INDEX):
# training speed and memory at bf16/fp32, eager/compiled, and generation speed, in under 8 minutes.
# Without CUDA it says so and exits non-zero. Results: benchmarks/results/gpu_check.{md,json}.
gpu-check: install
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache .ruff_cache *.egg-info
