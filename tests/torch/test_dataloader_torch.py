"""threadloom.DataLoader against torch.utils.data.DataLoader, both running here."""
import torch
import torch.utils.data as tud

import threadloom


class Squares(tud.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([i, i * i], dtype=torch.int64), i % 3


def _batches(loader):
    return [(x.tolist(), y.tolist()) for x, y in loader]


def test_sequential_batches_equal_torch():
    ds = Squares(23)
    want = _batches(tud.DataLoader(ds, batch_size=4, num_workers=0))
    got = _batches(threadloom.DataLoader(ds, batch_size=4, num_workers=2))
    assert got == want
