# Convenience targets; the README's two set-up commands are the source of truth.
.PHONY: setup train test lint bench

setup:
	pip install torch==2.13.0 && pip install -e ".[dev,hf]"

train:
	titans train --config small

test:
	python -m pytest -q tests

lint:
	ruff check titans tests benchmarks
