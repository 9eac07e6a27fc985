"""benchmarks.gpu_check: says so and exits 0 without a GPU; its fit-and-resume check is
exact on the CPU, where kernels are deterministic."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import gpu_check
from tests.conftest import make_tiny_backbone


def test_without_cuda_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "no CUDA GPU on this machine" in capsys.readouterr().out


def test_fit_and_resume_check_is_exact_on_the_cpu(tmp_path: Path, capsys):
    difference = gpu_check.fit_and_resume(torch.device("cpu"), tmp_path, size=32,
                                          build=lambda n: make_tiny_backbone(num_classes=n))
    assert difference == 0.0
    assert "fit: precision" in capsys.readouterr().out
