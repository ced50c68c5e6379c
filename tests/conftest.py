"""Pytest setup: 8 fake CPU devices and fast-compile XLA flags, set before jax is imported."""

import os

import xla_env

# A device count given from outside (the Makefile gives 8) is kept.
_given = xla_env.DEVICE_FLAG in os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = xla_env.flags(devices=None if _given else 8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  del config
  if jax.device_count() < 8:
    skip = pytest.mark.skip(reason="needs 8 (fake) devices")
    for item in items:
      if "needs_8_devices" in item.keywords:
        item.add_marker(skip)
