"""The embedded data set: deterministic stratified splits, the student's label budget, on-device augmentation."""
import numpy as np
import pytest
import torch

from kdbench.config import DataConfig
from kdbench.data import load_data
from kdbench.data.augment import random_crop_flip
from kdbench.data.datasets import student_labels


def test_digits_split_sizes_stratified_and_deterministic():
    a = load_data(DataConfig(image_size=16))
    b = load_data(DataConfig(image_size=16))
    assert (len(a.train), len(a.val), len(a.test)) == (1077, 360, 360)
    assert a.train.x.shape == (1077, 1, 16, 16) and a.num_classes == 10 and a.in_chans == 1
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y) and a.fingerprint == b.fingerprint
    # stratified: every class holds ~10% of each split
    for part in (a.train, a.val, a.test):
        share = torch.bincount(part.y, minlength=10).float() / len(part)
        assert share.min() > 0.08 and share.max() < 0.12
    # train statistics normalise the training split
    assert abs(a.train.x.mean().item()) < 1e-5 and a.train.x.std().item() == pytest.approx(1.0, abs=1e-4)
    c = load_data(DataConfig(image_size=16, seed=1))
    assert c.fingerprint != a.fingerprint and not torch.equal(c.test.y, a.test.y)


def test_splits_do_not_overlap():
    d = load_data(DataConfig(image_size=8))
    rows = lambda s: {tuple(r.tolist()) for r in s.x.flatten(1)}  # noqa: E731
    assert not rows(d.train) & rows(d.test) and not rows(d.val) & rows(d.test)


def test_student_labels_fraction_and_noise():
    y = np.repeat(np.arange(10), 100)
    pos, labels, flipped = student_labels(y, 0.25, 0.3, 10, seed=0)
    assert len(pos) == 250 and np.all(np.bincount(y[pos], minlength=10) == 25)
    assert flipped.sum() == 75
    assert np.all(labels[flipped] != y[pos][flipped]) and np.all(labels[~flipped] == y[pos][~flipped])
    again = student_labels(y, 0.25, 0.3, 10, seed=0)
    assert np.array_equal(again[0], pos) and np.array_equal(again[1], labels)


def test_bundle_student_view():
    d = load_data(DataConfig(image_size=8, student_fraction=0.25, student_label_noise=0.3))
    assert len(d.student_train) == 269 and int(d.noisy_mask.sum()) == round(0.3 * 269)
    assert torch.equal(d.student_train.x, d.train.x[d.student_index])
    clean = d.train.y[d.student_index]
    assert torch.equal(d.student_train.y != clean, torch.from_numpy(d.noisy_mask))


def test_random_crop_within_padding_and_repeatable():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = random_crop_flip(x, g1, pad=2, hflip=False), random_crop_flip(x, g2, pad=2, hflip=False)
    assert a.shape == x.shape and torch.equal(a, b)
    # each output is a window of the replicate-padded input at an offset in [0, 2·pad]
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(2):
        assert any(torch.equal(a[i], padded[i, :, oy:oy + 6, ox:ox + 6]) for oy in range(5) for ox in range(5))
    many = random_crop_flip(x.repeat(50, 1, 1, 1), torch.Generator().manual_seed(0), pad=2, hflip=False)
    assert (many != x.repeat(50, 1, 1, 1)).any()


def test_hflip_flips_about_half():
    x = torch.randn(400, 1, 4, 4)
    y = random_crop_flip(x, torch.Generator().manual_seed(0), pad=0, hflip=True)
    flipped = torch.tensor([torch.equal(y[i], x[i].flip(2)) for i in range(400)])
    kept = torch.tensor([torch.equal(y[i], x[i]) for i in range(400)])
    assert (flipped | kept).all() and 150 < int(flipped.sum()) < 250
