"""torch-style DataLoader code moved onto threads: only the import changes.

Before (worker processes, each with a pickled copy of the dataset):
    from torch.utils.data import DataLoader, Dataset, get_worker_info
After (worker threads of one free-threaded process, each with its own replica):
    from threadloom.data import DataLoader, Dataset, get_worker_info

Run: python examples/dataloader_threads.py
"""

import random

from threadloom.data import DataLoader, Dataset, get_worker_info


class Augmented(Dataset):
    def __init__(self, n):
        self.items = [("sample-%d" % i, i) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        name, label = self.items[i]
        # a worker-local RNG: threads share the `random` module, so use the worker's own
        rng = get_worker_info().rng if get_worker_info() else random
        return {"name": name, "label": label, "noise": rng.random()}


if __name__ == "__main__":
    loader = DataLoader(Augmented(1000), batch_size=64, shuffle=True, num_workers=4,
                        generator=random.Random(0), drop_last=True)
    for epoch in range(2):
        for step, batch in enumerate(loader):
            if step == 0:
                print("epoch %d: first labels %s" % (epoch, batch["label"].tolist()[:8]))
    print(loader.stats()["samples_per_s"], "samples/s in the last epoch")
