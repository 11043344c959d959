# The two commands a newcomer needs:
#   make demo   set up, build the sample corpus and tokenizer, pretrain the tiny model (GPU if present, else CPU)
#   make test   set up and run the test suite (GPU tests skip without a GPU; on a GPU host: make test-gpu)
PY := .venv/bin/python
SAMPLE := data/sample

.PHONY: setup sample demo test test-gpu clean-demo

setup:
	bash scripts/setup.sh

sample: setup
	$(PY) -m corpus.sample --out $(SAMPLE)

demo: sample
	$(PY) pretrain.py -c tiny -d $(SAMPLE)/corpus --tokenizer $(SAMPLE)/tokenizer \
		-b 8 -l 256 --lr 2e-3 --max_steps 200 --log_interval 10 --eval_interval 25 \
		-o checkpoints/demo -t runs/demo

test: setup
	$(PY) -m pytest -q

test-gpu:
	python3 -m pytest -m gpu -q

clean-demo:
	rm -rf checkpoints/demo runs/demo data/prepared
