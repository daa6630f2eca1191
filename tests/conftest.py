"""Suite-wide test settings.

Tiny models run fastest on one thread: with several torch threads per process on a small shared machine, the
threads' synchronisation dominates (tens of times slower). Each test process therefore uses one intra-op thread,
unless ``ECHO_TEST_THREADS`` says otherwise; subprocesses inherit ``OMP_NUM_THREADS`` from the Makefile.
"""

import os

import torch


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("ECHO_TEST_THREADS", "1")))
