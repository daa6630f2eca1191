"""Suite-wide test settings and shared fixtures.

Tiny models run fastest on one thread: with several torch threads per process on a small shared machine, the
threads' synchronisation dominates (tens of times slower). Each test process therefore uses one intra-op thread,
unless ``ECHO_TEST_THREADS`` says otherwise; subprocesses inherit ``OMP_NUM_THREADS`` from the Makefile.
"""

import logging
import os

import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("ECHO_TEST_THREADS", "1")))


@pytest.fixture
def diffusers_caplog(caplog):
    """``caplog`` seeing diffusers' loggers (they do not propagate to the root logger by default)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            yield caplog
    finally:
        diffusers_logging.disable_propagation()
