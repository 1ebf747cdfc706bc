"""Packing many small latent variables into one Pyro site.

Pyro's per-site bookkeeping (tracing, one optimiser per parameter) costs a fraction of a
millisecond per site and step. A model with thirty small latent tensors spends most of a
training step there, so the models declare their latents in a :class:`Layout` and sample
one vector per prior family; the layout gives the named views back, for the model and for
diagnostics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Layout"]


@dataclass
class Layout:
    """Named blocks of a flat latent vector.

    Status: stable.

    Each block has a shape and a prior scale (used by half-normal and normal sites whose
    elements differ only in scale).
    """

    blocks: dict[str, tuple[slice, tuple[int, ...]]] = field(default_factory=dict)
    scales: list[float] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Length of the packed vector."""
        return len(self.scales)

    def add(self, name: str, *shape: int, scale: float = 1.0) -> None:
        """Append block ``name`` of the given shape whose prior scale is ``scale``."""
        if name in self.blocks:
            raise ValueError(f"block {name!r} declared twice")
        n = math.prod(shape)
        self.blocks[name] = (slice(self.size, self.size + n), tuple(shape))
        self.scales.extend([float(scale)] * n)

    def scale_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Prior scale of every element, shape (size,), cached per device."""
        cache = self.__dict__.setdefault("_tensors", {})
        key = (str(device), self.size)
        if key not in cache:
            cache[key] = torch.tensor(self.scales, dtype=torch.float32, device=device)
        return cache[key]

    def unpack(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views of ``vector`` of shape (..., size) as (..., *block shape)."""
        batch = vector.shape[:-1]
        return {
            name: vector[..., sl].reshape((*batch, *shape))
            for name, (sl, shape) in self.blocks.items()
        }

    def __contains__(self, name: str) -> bool:
        return name in self.blocks
