"""Fixtures shared by every test module."""

from __future__ import annotations

import contextlib

import pytest
import torch


@contextlib.contextmanager
def _one_thread():
    """One intra-op torch thread: on the tests' tiny tensors thread hand-offs cost more than
    they save, and on a loaded machine they cost ten times more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread():
    """The test runs on one intra-op thread."""
    with _one_thread():
        yield


@pytest.fixture(scope="module")
def single_thread_module():
    """The whole module, its module-scoped fixtures included, runs on one intra-op thread."""
    with _one_thread():
        yield
