"""Fixtures of the mpx.learning tests: one local factory and one 2-worker pool for the whole session."""

from __future__ import annotations

import pytest

import mp_executors as mpx


@pytest.fixture(scope="session")
def local():
    factory = mpx.local_executor_factory()
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def mp2():
    factory = mpx.mp_executor_factory(num_workers=2)
    yield factory
    factory.close()
