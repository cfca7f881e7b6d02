# The paper: included from the Makefile (uses its PY and STAMP).
#
#   make paper       regenerate paper/tables and paper/figures from the committed results, refill
#                    the fk-table blocks of paper/paper.md and check every number written in it
#                    (exit 1 listing each mismatch)
#   make paper-fill  print marker + number of every table cell (to paste into paper.md)
#   make report      the full report of the experiment (results/<exp>/report/index.md)
#   make reproduce   rerun the experiment behind the paper into $(REPRO_DIR) and report every
#                    (the sweep too: make reproduce PAPER_EXPERIMENT=ewc_medical_sweep)
#                    number that moved beyond its committed 95 % CI

PAPER_EXPERIMENT ?= ewc_medical
# every experiment the paper draws from (committed under results/)
PAPER_EXPERIMENTS ?= ewc_medical,ewc_medical_sweep,ewc_medical_v2,ewc_medical_v3,ewc_medical_v4,sequence_medical
PAPER_CONFIG ?= experiments/$(PAPER_EXPERIMENT).yaml
PAPER_SEEDS ?= 0,1,2
REPRO_DIR ?= runs/reproduce

.PHONY: paper paper-fill report reproduce

paper: $(STAMP)
	$(PY) -m forgetkit.paper --experiments $(PAPER_EXPERIMENTS) --update

paper-fill: $(STAMP)
	$(PY) -m forgetkit.paper --experiments $(PAPER_EXPERIMENTS) --fill

report: $(STAMP)
	$(PY) -m forgetkit.report results/$(PAPER_EXPERIMENT)

# The override comes before the options (argparse reads the positionals in one run).
reproduce: $(STAMP)
	$(PY) -m forgetkit.run $(PAPER_CONFIG) experiment.results_dir=$(REPRO_DIR)/$(PAPER_EXPERIMENT) \
		--seeds $(PAPER_SEEDS) --force
	$(PY) -m forgetkit.report $(REPRO_DIR)/$(PAPER_EXPERIMENT)
	$(PY) -m forgetkit.paper --experiments $(PAPER_EXPERIMENT) --compare $(REPRO_DIR)
