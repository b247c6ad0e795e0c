"""Shared fixtures: tiny random models (seconds to build) and the embedded trained model."""

from __future__ import annotations

import os

import pytest

# Two cores on CI: keep torch from oversubscribing when tests run beside each other.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-weight CLIP + Llama LLaVA directory."""
    from qvlm_export.load.tiny import save_tiny_random_model

    return save_tiny_random_model(tmp_path_factory.mktemp("tiny_clip_llama"), vision="clip", text="llama")


@pytest.fixture(scope="session")
def embedded_model_dir():
    from qvlm_export.load.model import EMBEDDED_MODEL_DIR

    return EMBEDDED_MODEL_DIR
