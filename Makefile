# pifarm.inference — the two commands of the README, and the pieces they use.
#   make farm   brings up the local container farm with the site playbook
#   make test   runs everything CI checks
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := $(CURDIR)/.venv
export ANSIBLE_COLLECTIONS_PATH := $(VENV)/collections
# The venv's tools first: ansible-playbook, molecule, and pifarm-agent, which
# publish_model.yml runs on the controller.
export PATH := $(VENV)/bin:$(PATH)
LOCAL_INVENTORY := inventory/local
STAGES ?=

.PHONY: help bootstrap venv farm farm-down prompt test lint unit sanity molecule bench bench-serving bench-gateway bench-rollout clean

help:
	@echo "make farm       start the local container farm and converge playbooks/site.yml"
	@echo "make farm-down  remove the local farm's containers and network"
	@echo "make prompt PROMPT=\"...\"  ask the running farm through HAProxy and as a NATS job"
	@echo "make test       lint, unit, sanity, collection build, molecule incl. the farm (what CI runs;"
	@echo "                it replaces a running local farm and removes it at the end)"
	@echo "make lint | unit | sanity | molecule SCENARIO=node_base"
	@echo "make bench      model sync figures (BENCH_ARGS=\"--runs 9 --json --link-mb-s 117\")"
	@echo "make bench-serving  llama-server figures (SERVING_ARGS=\"--only batching --json\")"
	@echo "make bench-gateway  HAProxy and NATS overhead on the running farm (GATEWAY_ARGS=\"--rounds 80\")"
	@echo "make bench-rollout  a staged rollout against a raw restart under load, on the running farm"

bootstrap:
	@scripts/testbed.sh all

venv:
	@scripts/testbed.sh venv

# scripts/farm.sh: the test bed, the llama.cpp build (or its cache), the
# containers, the store, the chat model published, the site playbook, and a
# chat prompt answered; each stage timed. The store comes up first and gets
# the model, as an operator would publish theirs, so the nodes find it on
# their first sync.
farm:
	@scripts/farm.sh

# Ask the running local farm: once through HAProxy, once as a NATS job.
PROMPT ?= Write one short sentence about cats.
prompt: export PIFARM_PROMPT = $(PROMPT)
prompt: venv
	@$(VENV)/bin/ansible-playbook -i $(LOCAL_INVENTORY) molecule/resources/farm_answer.yml
	@cat build/farm.txt

farm-down: venv
	$(VENV)/bin/ansible-playbook -i $(LOCAL_INVENTORY) molecule/resources/farm_down.yml

test: bootstrap
	@scripts/run-tests.sh $(STAGES)

lint: venv
	@scripts/run-tests.sh yamllint ansible-lint ruff

unit: venv
	@scripts/run-tests.sh pytest-unit pytest

sanity: venv
	@scripts/run-tests.sh sanity

SCENARIO ?= node_base
molecule: bootstrap
	@scripts/run-tests.sh molecule-$(SCENARIO)

# Prints figures (raw GET vs agent sync, re-sync, peak RSS); fails only when a sync fails.
BENCH_ARGS ?=
bench: venv
	@$(VENV)/bin/python bench/model_sync.py $(BENCH_ARGS)

# Prints figures (serving efficiency, continuous batching, build once vs compile
# per node); fails only when something does not run. Needs the cached llama.cpp
# build (scripts/llama-server.sh).
SERVING_ARGS ?=
bench-serving: venv
	@$(VENV)/bin/python bench/llama_serving.py $(SERVING_ARGS)

# Prints figures (HAProxy's added latency and tok/s ratio, NATS job round trip
# vs HTTP) on the farm `make farm` started; fails only when something does not answer.
GATEWAY_ARGS ?=
bench-gateway: venv
	@$(VENV)/bin/python bench/gateway.py $(GATEWAY_ARGS)

# Prints figures (seconds per node and failed requests of a staged rollout of a
# re-release against a raw restart, under the same load) on the farm `make farm`
# started; fails only when something does not run or a request failed.
ROLLOUT_ARGS ?=
bench-rollout: venv
	@$(VENV)/bin/python bench/rollout.py $(ROLLOUT_ARGS)

clean:
	rm -rf build
