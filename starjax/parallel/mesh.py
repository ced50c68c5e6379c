"""Device mesh construction from a config."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """Mesh axis sizes; exactly one may be -1 ("use the remaining devices")."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, n_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
      raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(AXES, sizes))}.")
    if any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"Mesh axis sizes must be positive or -1, got {dict(zip(AXES, sizes))}.")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
      if n_devices % fixed:
        raise ValueError(f"{n_devices} devices cannot be split into mesh "
                         f"{dict(zip(AXES, sizes))}: {fixed} does not divide {n_devices}.")
      sizes[free[0]] = n_devices // fixed
    if math.prod(sizes) != n_devices:
      raise ValueError(f"Mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                       f"but {n_devices} are available.")
    return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: list | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh with classic auto (GSPMD) axes."""
  config = config or MeshConfig()
  devices = list(jax.devices()) if devices is None else list(devices)
  shape = config.shape(len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
  return Mesh(np.asarray(devices).reshape(shape), AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
