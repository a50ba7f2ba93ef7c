"""Shared pytest set-up: fixture modules are registered here.

The tests run FreeAL on a few dozen texts with FREEAL_SLM_EPOCHS lowered for speed; the product's floor of
FREEAL_SLM_MIN_STEPS optimiser steps per fold model (useful from a few hundred texts on) would multiply their
epochs, so it is off here, for the CLI and server processes the tests start too (they inherit the environment).
Settings built directly in a test pass ``slm_min_steps=0`` for the same reason; tests/test_slm_recipe.py covers
the floor itself.
"""
import os

os.environ["FREEAL_SLM_MIN_STEPS"] = "0"

pytest_plugins = ["tests.fixtures_llm", "tests.fixtures_ls", "tests.fixtures_redis"]
