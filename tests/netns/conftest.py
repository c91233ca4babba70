"""Every test here runs once per datapath engine (tests/engine_param.py)."""

from engine_param import daemon_engine, pytest_generate_tests

__all__ = ["daemon_engine", "pytest_generate_tests"]
