# User-facing commands. Every target installs what it needs into .venv first (idempotent).
PY      := .venv/bin/python
STAMP   := .venv/.installed
RUNS    ?= runs

# Demo defaults: a synthetic COCO-format set the project generates itself, and a small teacher.
DEMO_DATA    ?= $(RUNS)/demo/data
DEMO_TEACHER ?= gfl-small
DEMO_STUDENT ?= gfl-nano

.PHONY: help setup test demo synth teacher bench clean
help:
	@echo "make setup                       create .venv and install the project (pinned torch)"
	@echo "make test                        run the test suite"
	@echo "make demo                        the whole story on a CPU: synthetic data -> teacher -> cache -> sweep of every method -> report, figures"
	@echo "make synth OUT=DIR               generate the synthetic COCO-format set"
	@echo "make teacher TEACHER=gfl-small DATA=DIR OUT=DIR [EPOCHS=..] [EXTRA='--flag v ...']"
	@echo "make bench                       run the benchmarks in bench/"
	@echo "make cache [TEACHER=r101 DATA=DIR CKPT=FILE CACHE=DIR FORMAT=zarr|wds VIEWS=.. FIELDS=.. SET='maskd.stage1_iters=500']  teacher outputs -> cache (python -m precompute --help)"
	@echo "make sweep [METHODS='none frs icd maskd ld defeat' SEEDS=2 CACHE=DIR DATA=DIR STUDENT=gfl-nano OUT=DIR EXTRA='epochs=12 lr=0.02' GRID='frs.feat_weight=0.1,0.2' JOBS=n]  many students from one cache, resumable (python -m train.sweep --help)"
	@echo "make report [SWEEP=DIR]          results.csv, results.md and figures of a sweep (python -m train.report --help)"
	@echo "make recipes [RECIPE=NAME]         the named recipes of the published runs and the AP each should reach (python -m train.recipes)"
	@echo "make cache|train|sweep RECIPE=NAME DATA=DIR [CKPT=FILE CACHE=DIR OUT=DIR ...]  a recipe's cache, student, sweep; given variables override it"
	@echo "make viz [DATA=DIR CACHE=DIR STUDENT_CKPT=FILE IMAGES='1 2' OUT=DIR]  what the methods see, as PNGs (python -m train.viz --help)"
	@echo "make train [METHOD=frs STUDENT=r50 CACHE=DIR OUT=DIR DATA=DIR EPOCHS=.. TEACHER_CKPT=FILE EXTRA='--set frs.feat_weight=0.2']  student from the cache, or online from TEACHER_CKPT (python -m train --help)"

setup: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

synth: $(STAMP)
	$(PY) -m detectors.synth --out $(or $(OUT),$(DEMO_DATA))

teacher: $(STAMP)
	$(PY) -m train.teacher --model $(or $(TEACHER),$(DEMO_TEACHER)) --data $(or $(DATA),$(DEMO_DATA)) \
		--out $(or $(OUT),$(RUNS)/teacher) $(if $(EPOCHS),--epochs $(EPOCHS)) $(EXTRA)

demo: $(STAMP)
	$(PY) -m train.demo --out $(RUNS)/demo

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(RUNS)

# Teacher cache. With no DATA: the demo set, the demo teacher (make demo), views at its scale, and a
# short MasKD stage 1 (the official 2000 iterations of 16 images take hours on a CPU).
DEMO_VIEWS       ?= 160:256,160:256:flip
DEMO_MASKD_ITERS ?= 100
DEMO_MASKD_BATCH ?= 4
# The demo's MasKD stage 1 settings, when the demo cache's fields name MasKD (all, or maskd).
comma := ,
DEMO_SET = $(if $(filter all maskd,$(subst $(comma), ,$(or $(FIELDS),all))),maskd.stage1_iters=$(DEMO_MASKD_ITERS) maskd.stage1_batch_size=$(DEMO_MASKD_BATCH))
.PHONY: cache
cache: $(STAMP)
ifdef RECIPE
	$(PY) -m precompute --recipe $(RECIPE) $(if $(CKPT),--ckpt $(CKPT)) --data $(or $(DATA),$(error make cache RECIPE=$(RECIPE): give DATA=the COCO root)) \
		--cache $(or $(CACHE),$(RUNS)/cache/$(RECIPE)) $(if $(TEACHER),--teacher $(TEACHER)) $(if $(FORMAT),--format $(FORMAT)) \
		$(if $(VIEWS),--views $(VIEWS)) $(if $(FIELDS),--fields $(FIELDS)) $(foreach s,$(SET),--set $(s)) $(EXTRA)
else
	$(PY) -m precompute --teacher $(or $(TEACHER),auto) --ckpt $(or $(CKPT),$(RUNS)/demo/teacher/best.pt) \
		--data $(or $(DATA),$(DEMO_DATA)) --cache $(or $(CACHE),$(RUNS)/demo/cache) --format $(or $(FORMAT),zarr) \
		--views $(or $(VIEWS),$(if $(DATA),default,$(DEMO_VIEWS))) --fields $(or $(FIELDS),all) \
		$(foreach s,$(if $(DATA),,$(DEMO_SET)) $(SET),--set $(s)) $(EXTRA)
endif

# Student training. With no DATA/CACHE: the demo set and its cache (make cache); TEACHER_CKPT: online teacher.
.PHONY: train
train: $(STAMP)
ifdef RECIPE
	$(PY) -m train --recipe $(RECIPE) --data $(or $(DATA),$(error make train RECIPE=$(RECIPE): give DATA=the COCO root)) \
		$(if $(TEACHER_CKPT),--teacher $(TEACHER_CKPT),--cache $(or $(CACHE),$(RUNS)/cache/$(RECIPE))) \
		--out $(or $(OUT),$(RUNS)/train/$(RECIPE)) $(if $(METHOD),--method $(METHOD)) $(if $(STUDENT),--student $(STUDENT)) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(EXTRA)
else
	$(PY) -m train --method $(or $(METHOD),none) --student $(or $(STUDENT),$(DEMO_STUDENT)) \
		--data $(or $(DATA),$(DEMO_DATA)) $(if $(TEACHER_CKPT),--teacher $(TEACHER_CKPT),--cache $(or $(CACHE),$(RUNS)/demo/cache)) \
		--out $(or $(OUT),$(RUNS)/train/$(or $(METHOD),none)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(EXTRA)
endif

# Sweeps: every METHODS x SEEDS (x GRID) student from one cache; EXTRA/GRID take KEY=VALUE words (trainer
# options such as epochs=12, or METHOD.KEY hyperparameters), each checked against its key's type and range
# before any run (an empty value is an error). Each word is quoted for the shell: milestones=(8,11) works.
# With no CACHE: the demo set and its cache.
DEMO_METHODS ?= none frs icd maskd ld defeat
.PHONY: sweep report viz
sweep: $(STAMP)
ifdef RECIPE
	$(PY) -m train.sweep --recipe $(RECIPE) --cache $(or $(CACHE),$(RUNS)/cache/$(RECIPE)) \
		--data $(or $(DATA),$(error make sweep RECIPE=$(RECIPE): give DATA=the COCO root)) \
		$(if $(STUDENT),--student $(STUDENT)) $(if $(METHODS),--methods $(METHODS)) --seeds $(or $(SEEDS),1) \
		--out $(or $(OUT),$(RUNS)/sweep/$(RECIPE)) $(foreach kv,$(EXTRA),--set '$(kv)') $(foreach kv,$(GRID),--grid '$(kv)') \
		$(if $(JOBS),--jobs $(JOBS))
else
	$(PY) -m train.sweep --cache $(or $(CACHE),$(RUNS)/demo/cache) --data $(or $(DATA),$(DEMO_DATA)) \
		--student $(or $(STUDENT),$(DEMO_STUDENT)) --methods $(or $(METHODS),$(DEMO_METHODS)) --seeds $(or $(SEEDS),1) \
		--out $(or $(OUT),$(RUNS)/sweep) $(foreach kv,$(EXTRA),--set '$(kv)') $(foreach kv,$(GRID),--grid '$(kv)') \
		$(if $(JOBS),--jobs $(JOBS))
endif

# Named recipes of the published runs (train/recipes.py): RECIPE=NAME describes one in full.
.PHONY: recipes
recipes: $(STAMP)
	$(PY) -m train.recipes $(RECIPE)

report: $(STAMP)
	$(PY) -m train.report $(or $(SWEEP),$(RUNS)/sweep)

viz: $(STAMP)
	$(PY) -m train.viz --data $(or $(DATA),$(DEMO_DATA)) --cache $(or $(CACHE),$(RUNS)/demo/cache) \
		$(if $(STUDENT_CKPT),--student-ckpt $(STUDENT_CKPT)) $(if $(IMAGES),--image-ids $(IMAGES)) \
		--out $(or $(OUT),$(RUNS)/viz)
