"""IDC multi-formation: decode / decode_labels / tile layouts and errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dream_dist.formation import decode, decode_labels, tile


def blocks(values: list[list[float]], size: int, channels: int = 1) -> torch.Tensor:
    """One (1, C, size, size) image made of len(values)² constant blocks, row-major."""
    f = len(values)
    v = torch.tensor(values, dtype=torch.float32)
    img = v.repeat_interleave(size // f, 0).repeat_interleave(size // f, 1)
    return img.expand(1, channels, size, size).clone()


def test_decode_hand_made_2x2_gives_four_constant_images() -> None:
    img = blocks([[1.0, 2.0], [3.0, 4.0]], 28, channels=3)
    out = decode(img, 2)
    assert out.shape == (4, 3, 28, 28)
    for k, v in enumerate([1.0, 2.0, 3.0, 4.0]):  # row-major: TL, TR, BL, BR
        torch.testing.assert_close(out[k], torch.full((3, 28, 28), v))


def test_decode_orders_parts_per_image_and_labels_follow() -> None:
    imgs = torch.cat([blocks([[1, 2], [3, 4]], 8), blocks([[5, 6], [7, 8]], 8)])
    out = decode(imgs, 2)
    assert out.shape == (8, 1, 8, 8)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), torch.arange(1.0, 9.0))
    labels = torch.tensor([3, 7])
    assert decode_labels(labels, 2).tolist() == [3, 3, 3, 3, 7, 7, 7, 7]
    soft = F.one_hot(labels, 10).float()
    assert decode_labels(soft, 2).shape == (8, 10)
    assert torch.equal(decode_labels(soft, 2)[4:], soft[1:].expand(4, 10))


def test_decode_is_bilinear_upsampling_of_each_part() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 2, 12, 12)
    out = decode(x, 3)
    assert out.shape == (27, 2, 12, 12)
    part = x[1:2, :, 4:8, 8:12]  # image 1, row 1, col 2 → index 1*9 + 1*3 + 2
    ref = F.interpolate(part, size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[9 + 5], ref[0])


def test_factor_one_is_identity_and_decode_is_differentiable() -> None:
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    assert decode(x, 1) is x
    assert tile(x, 1) is x
    assert torch.equal(decode_labels(torch.tensor([1, 2]), 1), torch.tensor([1, 2]))
    decode(x, 2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_tile_places_downsampled_images_row_major() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    imgs = torch.stack([torch.full((3, 28, 28), v) for v in values])
    out = tile(imgs, 2)
    assert out.shape == (2, 3, 28, 28)
    torch.testing.assert_close(out[0], blocks([[1, 2], [3, 4]], 28, 3)[0])
    torch.testing.assert_close(out[1], blocks([[5, 6], [7, 8]], 28, 3)[0])


def test_tile_then_decode_round_trip_on_constant_blocks() -> None:
    torch.manual_seed(0)
    vals = torch.rand(2 * 9)
    imgs = vals.view(-1, 1, 1, 1).expand(-1, 1, 27, 27).contiguous()
    back = decode(tile(imgs, 3), 3)
    torch.testing.assert_close(back, imgs)
    # and the other way: a stored image of constant blocks survives decode → tile
    img = blocks([[0.1, 0.2], [0.3, 0.4]], 32)
    torch.testing.assert_close(tile(decode(img, 2), 2), img)


def test_bad_factor_and_shapes_are_errors() -> None:
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="not divisible by factor 3"):
        decode(x, 3)
    with pytest.raises(ValueError, match="not divisible by factor 3"):
        tile(torch.rand(9, 1, 28, 28), 3)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive int"):
            decode(x, bad)
        with pytest.raises(ValueError, match="positive int"):
            decode_labels(torch.tensor([1]), bad)
    with pytest.raises(ValueError, match="not a multiple of factor"):
        tile(torch.rand(6, 1, 28, 28), 2)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        decode(torch.rand(28, 28), 2)
