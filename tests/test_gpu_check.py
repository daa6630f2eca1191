"""benchmarks/gpu_check.py runs its CPU dry run (what CI can run of the prepared GPU check), and the meta-device
estimators of benchmarks/memory_table.py count what they claim."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory_table import activation_peak, echo_config  # noqa: E402


def test_gpu_check_dry_run_prints_a_table_then_every_figure():
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert "| check | setting | result | peak GiB |" in lines
    figures = dict(pair.split("=", 1) for pair in lines[-1].split())
    for key in ("train_step_s", "step_s_480x832x81", "step_s_512x512x81", "pass_s_480x832x81", "mamba_scan_ms_64"):
        assert math.isfinite(float(figures[key])) and float(figures[key]) > 0, (key, figures)
    assert float(figures["train_tflop"]) > 0  # FLOPs counted on the meta device
    assert figures["train_mfu"] == "nan" and figures["device"] == "cpu-dry-run"  # no GPU peak to divide by
    assert figures["mamba_kernel"] == "skipped" and "skipped: " in run.stdout


def test_activation_peak_counts_live_tensors_and_flash_attention_memory():
    """Peak bytes alive at once on the meta device: a linear output and its GELU are both alive at the peak (weights
    and inputs excluded); attention holds its output, not the L × L scores."""
    linear = torch.nn.Linear(64, 256, device="meta", dtype=torch.bfloat16)
    x = torch.zeros(1, 100, 64, device="meta", dtype=torch.bfloat16)
    assert activation_peak(linear, lambda m, i: F.gelu(m(i["x"])), {"x": x}) == 2 * 100 * 256 * 2
    # a view of an input is the input's memory: only the product counts
    assert activation_peak(linear, lambda m, i: i["x"].reshape(100, 64) * 2, {"x": x}) == 100 * 64 * 2
    q = torch.zeros(1, 2, 1000, 32, device="meta", dtype=torch.bfloat16)
    attention = activation_peak(
        torch.nn.Identity(), lambda m, i: F.scaled_dot_product_attention(i["q"], i["q"], i["q"]), {"q": q}
    )
    assert attention == 1 * 2 * 1000 * 32 * 2


def test_memory_table_generators_have_the_published_widths():
    small, large = echo_config("wan2.1-t2v-1.3b"), echo_config("wan2.1-i2v-14b-480p")
    for config, widths in ((small, (1536, 30, 8960)), (large, (5120, 40, 13824))):
        inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
        assert (inner_dim, config["num_layers"], config["ffn_dim"]) == widths
    assert small["in_channels"] == large["in_channels"] == 52 and large["image_dim"] == 1280
