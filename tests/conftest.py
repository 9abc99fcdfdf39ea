"""Shared fixtures: tiny datasets written by the tests, and an in-process CLI runner."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from trakwomp.cli.main import app
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


def write_tiny_images(path: Path, n: int = 48, classes: int = 4, size: int = 16, seed: int = 0) -> Path:
    """An npz image dataset: x float32 (n, 3, size, size) in [0, 1], balanced labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.random((n, 3, size, size), dtype=np.float32) * 0.5
    x[np.arange(n), y % 3] += 0.5 * (y[:, None, None] / classes)
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    return write_tiny_images(tmp_path / "tiny.npz")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a user module `package.module` (packages created as needed) under tmp_path, make it
    importable as a user's working directory is, and return nothing but the writer."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])

    def write(name: str, source: str) -> None:
        *packages, module = name.split(".")
        folder = tmp_path
        for package in packages:
            folder = folder / package
            folder.mkdir(exist_ok=True)
            (folder / "__init__.py").touch()
        (folder / f"{module}.py").write_text(source)

    return write


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def plain(text: str) -> str:
    """Text without ANSI colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def soft_thresholded(tau: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """S(tau, T x each row's RMS) in numpy, T = 0.25 by default: the scores that lds, predict,
    groups, show and score's exports use unless told --threshold 0."""
    tau = np.asarray(tau, dtype=np.float64)
    rms = np.sqrt((tau ** 2).mean(axis=1, keepdims=True))
    return np.sign(tau) * np.maximum(np.abs(tau) - threshold * rms, 0)
