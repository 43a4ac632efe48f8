"""scikit-learn's 8x8 digits: the embedded default dataset (ships inside scikit-learn).

1,797 images of 8x8 pixels with values 0..16. We scale them to uint8 and upsample them
bilinearly to 28 px so the standard 28-px ConvNet-3 (first conv padding 3) runs on them
unchanged. The test split is a fixed, seeded, stratified 20 % hold-out (360 images).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dream_dist.data.base import ImageSet

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits(root, split: str, size: int = 28) -> ImageSet:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N,1,8,8) in [0,1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.from_numpy(d.target.astype(np.int64))
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=d.target
    )
    pick = np.sort(train_idx if split == "train" else test_idx)
    pick_t = torch.from_numpy(pick)
    return ImageSet(images[pick_t], labels[pick_t], [str(i) for i in range(10)])
