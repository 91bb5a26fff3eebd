# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo

.PHONY: demo test test-slow bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/fs demo-cohort $(DEMO)/cohort --n-slides 24 --size 2048
	$(BIN)/fs init $(DEMO)/store
	$(BIN)/fs slides add $(DEMO)/cohort/slides --store $(DEMO)/store
	$(BIN)/fs labels import $(DEMO)/cohort/labels.csv --store $(DEMO)/store
	$(BIN)/fs extract $(DEMO)/cohort/slides --store $(DEMO)/store --model efficientnet-lite0 \
	  --cache-pixels 224@0.5 --cache-pixels 224@2.0
	$(BIN)/fs sql "SELECT l.label, count(DISTINCT e.slide_id) AS slides, count(*) AS tiles, \
	  round(avg(l.grade), 2) AS mean_grade FROM emb_efficientnet_lite0 e JOIN labels l USING (slide_id) \
	  GROUP BY l.label ORDER BY l.label" --store $(DEMO)/store
	$(BIN)/fs train --store $(DEMO)/store --model efficientnet-lite0 --label label --task classification \
	  --head abmil --folds 3 --epochs 30 --hidden 128 --attention-dim 64 --out $(DEMO)/runs/abmil
	$(BIN)/fs predict $(DEMO)/runs/abmil --store $(DEMO)/store
	$(BIN)/fs distill --store $(DEMO)/store --teacher efficientnet-lite0 --student mobilenetv3_small_100 \
	  --objective feature --input-size 96 --epochs 10 --batch-size 16 --lr 3e-3 --out $(DEMO)/runs/student
	$(BIN)/fs extract $(DEMO)/cohort/slides --store $(DEMO)/store --model student:$(DEMO)/runs/student
	$(BIN)/fs index build --store $(DEMO)/store --model efficientnet-lite0
	tile=$$($(BIN)/fs sql "SELECT min(e.tile_id) AS tile_id FROM emb_efficientnet_lite0 e JOIN labels l \
	  USING (slide_id) WHERE l.label = 1" --store $(DEMO)/store --format csv | tail -n 1) && \
	$(BIN)/fs search --store $(DEMO)/store --model efficientnet-lite0 --tile $$tile --where "l.label = 1" -k 8
	$(BIN)/fs info --store $(DEMO)/store
	@echo "demo store: $(abspath $(DEMO)/store)   QC pictures: $(abspath $(DEMO)/store/qc)"
	@echo "MIL run (metrics.json, ROC, attention maps): $(abspath $(DEMO)/runs/abmil)"
	@echo "distilled student (report.md, curves.png): $(abspath $(DEMO)/runs/student)"
	@echo "try: $(BIN)/fs sql 'SELECT * FROM slides' --store $(DEMO)/store"
	@echo "browse it: $(BIN)/fs view --store $(DEMO)/store --runs $(DEMO)/runs/abmil   (then open http://127.0.0.1:8000/)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The default tier plus the research comparisons over seeds (tests/README.md).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --slow

bench: $(STAMP)
	$(BIN)/python -m benchmarks

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO)
