"""Capturing Adam second moments from a live optimizer and from a saved optimizer state_dict."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from registry.client.capture import (
    CaptureError,
    capture_second_moments,
    second_moments_from_optimizer_file,
)


def trained(steps: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
    return model, optimizer


def test_capture_matches_optimizer_state_exactly(tmp_path: Path) -> None:
    model, optimizer = trained()
    path = capture_second_moments(model, optimizer, tmp_path / "sm.safetensors")
    saved = load_file(str(path))
    names = dict(model.named_parameters())
    assert set(saved) == set(names) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for name, parameter in names.items():
        assert torch.equal(saved[name], optimizer.state[parameter]["exp_avg_sq"])


def test_capture_before_step_names_parameters(tmp_path: Path) -> None:
    model, optimizer = trained(steps=0)
    with pytest.raises(CaptureError, match=r"\['0.weight', '0.bias', '2.weight', '2.bias'\]"):
        capture_second_moments(model, optimizer, tmp_path / "sm.safetensors")


def test_capture_with_sgd_fails(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    with pytest.raises(CaptureError, match="exp_avg_sq"):
        capture_second_moments(model, optimizer, tmp_path / "sm.safetensors")


def test_from_optimizer_file(tmp_path: Path) -> None:
    model, optimizer = trained()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    names = [name for name, _ in model.named_parameters()]
    moments = second_moments_from_optimizer_file(tmp_path / "optimizer.pt", names)
    for name, parameter in model.named_parameters():
        assert torch.equal(moments[name], optimizer.state[parameter]["exp_avg_sq"])


def test_from_optimizer_file_wrong_name_count(tmp_path: Path) -> None:
    _, optimizer = trained()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(CaptureError, match="4 optimizer parameters but 2 parameter names"):
        second_moments_from_optimizer_file(tmp_path / "optimizer.pt", ["a", "b"])


def test_from_optimizer_file_refuses_pickled_objects(tmp_path: Path) -> None:
    torch.save({"state": {}, "evil": Path("x")}, tmp_path / "optimizer.pt")
    with pytest.raises(pickle.UnpicklingError, match=r"(?i)weights.only"):
        second_moments_from_optimizer_file(tmp_path / "optimizer.pt", [])
