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
	@echo "make demo                        synthetic data -> teacher -> eval (prints the metrics)"
	@echo "make synth OUT=DIR               generate the synthetic COCO-format set"
	@echo "make teacher TEACHER=gfl-small DATA=DIR OUT=DIR [EPOCHS=..] [EXTRA='--flag v ...']"
	@echo "make bench                       run the benchmarks in bench/"

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
