# Two commands set everything up on a fresh machine (see README):
#   make main   # the offline main job: pre-train a small ViT, adapt it with HTA and LoRA, print the table
#   make test   # the whole test suite, PEFT's own method matrix on HTA included
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data main test test-fast conformance benchmarks benchmarks-speed accuracy learning-curves

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints.txt pins torch/torchvision exactly: pip never resolves an unpinned (multi-GB) torch
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,recipes]'
	rm -f $(VENV)/.installed-*
	touch $@

data:  # Fashion-MNIST from Debian (the offline pre-training set of the main job and the uRNN recipes)
	@test -d $(FASHION_MNIST) || (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist))

setup: $(STAMP) data

main: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) recipes/main_job.py

test: setup
	$(PY) scripts/fetch_conformance_suites.py
	HH_REQUIRE_SUITES=1 $(PY) -m pytest -n 2 --timeout 900 tests
	$(PY) scripts/run_peft_conformance.py -n 2 -p no:warnings --timeout 900

test-fast: setup  # everything but the tests marked slow and the conformance suites
	$(PY) -m pytest -n 2 -m "not slow and not conformance" tests

benchmarks: benchmarks-speed accuracy learning-curves  # every figure of the README's Results section (about 12 hours on 2 cores)

benchmarks-speed: setup  # step times and scaling: HTA vs LoRA / HRA / full, HTA's two paths, uRNN forward, Cayley, projUNN (about 30 minutes, quiet)
	$(PY) benchmarks/bench_hta.py
	$(PY) benchmarks/bench_hta_paths.py
	$(PY) benchmarks/bench_unitary_rnn.py
	$(PY) benchmarks/bench_cayley.py
	$(PY) benchmarks/bench_projunn.py

accuracy: setup  # HTA vs linear / full / LoRA r=1,8 / HRA r=8, 3 seeds x 3 lrs (extended upward where the best is the top): track B (EfficientNet-Lite0 -> Fashion-MNIST, about 3.5 hours) and track A (main job's ViT -> MNIST, about 2 hours)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[benchmarks]'
	$(PY) benchmarks/bench_adapter_accuracy.py
	$(PY) benchmarks/bench_adapter_accuracy.py --track a

LC := $(PY) benchmarks/unitary_learning_curves.py
LC_OUT := benchmarks/results/unitary_learning_curves
learning-curves: setup  # full vs restricted uRNN vs LSTM and Cayley vs projUNN on copy T=1000, adding T=100, permuted pixel MNIST and Fashion-MNIST (short), 3 seeds (about 7 hours on 2 cores, most of it the restricted uRNN)
	$(LC) --tasks copy --seeds 0 1 2 --out $(LC_OUT)_copy_T1000
	$(LC) --tasks copy --models full --methods projunn_t projunn_d --rank 1 --seeds 0 1 2 --out $(LC_OUT)_copy_T1000_projunn_k1
	$(LC) --tasks copy --models full --methods projunn_t projunn_d --rank 4 --seeds 0 1 2 --out $(LC_OUT)_copy_T1000_projunn_k4
	$(LC) --tasks adding --adding-length 100 --batch-size 50 --adding-steps 10000 --models full lstm --seeds 0 1 2 --out $(LC_OUT)_adding_T100
	$(LC) --tasks pmnist --dataset mnist_5k --pmnist-steps 500 --batch-size 50 --hidden full=64 restricted=64 lstm=32 --seeds 0 1 2 --out $(LC_OUT)_pmnist_mnist5k_short
	$(LC) --tasks pmnist --dataset mnist_5k --pmnist-steps 500 --batch-size 50 --hidden full=64 --models full --methods projunn_t projunn_d --rank 1 --seeds 0 1 2 --out $(LC_OUT)_pmnist_mnist5k_short_projunn_k1
	$(LC) --tasks pmnist --dataset mnist_5k --pmnist-steps 500 --batch-size 50 --hidden full=64 --models full --methods projunn_t projunn_d --rank 4 --seeds 0 1 2 --out $(LC_OUT)_pmnist_mnist5k_short_projunn_k4
	$(LC) --tasks pmnist --dataset mnist_5k --pmnist-steps 500 --batch-size 50 --hidden full=64 --models full --methods projunn_t projunn_d --rank 4 --unitary-lr 3e-4 --seeds 0 1 2 --out $(LC_OUT)_pmnist_mnist5k_short_projunn_k4_ulr3e-4
	$(LC) --tasks pmnist --dataset mnist_5k --pmnist-steps 500 --batch-size 50 --hidden full=64 --models full --methods cayley projunn_t projunn_d --rank 1 --unitary-lr 3e-4 --seeds 0 1 2 --out $(LC_OUT)_pmnist_mnist5k_short_k1_ulr3e-4
	$(LC) --tasks pmnist --dataset fashion_mnist --pmnist-steps 500 --batch-size 50 --hidden full=64 restricted=64 lstm=32 --seeds 0 1 2 --out $(LC_OUT)_pmnist_fashion_short
