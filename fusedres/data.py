"""A small offline stand-in for CIFAR-10: nothing is downloaded.

Each class is a fixed random smooth colour pattern; a sample is its class pattern, randomly shifted
and flipped, plus noise. Deep nets must learn translation-tolerant features to separate the classes,
which is enough to watch training curves (fused against eager, residual against plain).
"""
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F


def _class_patterns(num_classes: int, size: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.randn(num_classes, 3, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def synthetic_cifar(num_samples: int, size: int = 32, num_classes: int = 10, noise: float = 0.5,
                    seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images [num_samples, 3, size, size] float32, labels [num_samples] int64), reproducible by seed."""
    gen = torch.Generator().manual_seed(seed)
    patterns = _class_patterns(num_classes, size, gen)
    labels = torch.randint(num_classes, (num_samples,), generator=gen)
    images = patterns[labels]
    shifts = torch.randint(-size // 8, size // 8 + 1, (num_samples, 2), generator=gen)
    flips = torch.rand(num_samples, generator=gen) < 0.5
    for i in range(num_samples):
        img = torch.roll(images[i], shifts=tuple(shifts[i].tolist()), dims=(1, 2))
        images[i] = img.flip(2) if flips[i] else img
    images = images + noise * torch.randn(images.shape, generator=gen)
    return images, labels


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int = 0
            ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled mini-batches, the same sequence for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield images[idx], labels[idx]
