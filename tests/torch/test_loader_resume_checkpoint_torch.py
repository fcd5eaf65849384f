"""A DataLoader's state_dict() through the Checkpointer and back, with torch's RNG in it.

With torch as the RNG source the loader state holds a torch generator's state; it must survive
a durable checkpoint (the way a training job saves it) and resume to torch's batches."""
import torch
import torch.utils.data as tud

import threadloom


def _batches(loader):
    return [b.tolist() for b in loader]


def test_loader_state_survives_a_checkpoint(tmp_path):
    ds = list(range(50))

    def make(cls):
        return cls(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7),
                   **({"num_workers": 2} if cls is threadloom.DataLoader else {}))

    theirs = make(tud.DataLoader)
    want, want2 = _batches(theirs), _batches(theirs)      # epochs 0 and 1 of one loader

    first = make(threadloom.DataLoader)
    it = iter(first)
    head = [next(it).tolist() for _ in range(5)]
    with threadloom.Checkpointer(str(tmp_path / "ck")) as ck:
        ck.save({"loader": first.state_dict(), "step": 5}, step=5).result()
    first.close()

    loaded = threadloom.load(str(tmp_path / "ck"))
    again = make(threadloom.DataLoader)
    assert loaded["step"] == 5
    again.load_state_dict(loaded["loader"])
    assert head + _batches(again) == want
    assert _batches(again) == want2
