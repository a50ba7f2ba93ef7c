"""Shared pytest set-up: fixture modules are registered here."""
pytest_plugins = ["tests.fixtures_llm", "tests.fixtures_ls", "tests.fixtures_redis"]
