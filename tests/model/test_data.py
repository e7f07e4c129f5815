"""StoreDataset: evaluation views are the policy's prefix decoded at a center crop; training views read every scan."""

import torch

from dynres.io.decode import decode
from dynres.model.data import StoreDataset
from tiny_store import MemoryStore


def test_evaluation_views_are_the_policys_prefix_at_the_crop_side():
    store = MemoryStore(per_class=1)
    key = store.keys[1]
    dataset = StoreDataset(store, 32, crop_side=0.5, scans=2)
    image, label = dataset[1]
    assert label == store.label(key) and image.shape == (3, 32, 32)
    assert torch.equal(image, decode(store.read(key, scans=2), 32, 0.5, name=key))
    assert not torch.equal(image, StoreDataset(store, 32, scans=2)[1][0])  # the default crop side is another view


def test_training_views_have_the_resolution_and_cover_the_given_keys():
    store = MemoryStore(per_class=2)
    dataset = StoreDataset(store, 24, keys=store.keys[:3], train=True)
    assert len(dataset) == 3
    image, label = dataset[2]
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8 and label == store.label(store.keys[2])
