"""Pytest setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
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
