"""threadloom.data: a thread-based drop-in for torch.utils.data (DataLoader, datasets, samplers).

    from threadloom.data import DataLoader, get_worker_info   # instead of torch.utils.data
"""

from threadloom.data.collate import default_collate, default_convert
from threadloom.data.loader import (DataLoader, DataLoaderTimeoutError, Dataset, IterableDataset,
                                    Subset)
from threadloom.data.sampler import (BatchSampler, DistributedSampler, RandomSampler, Sampler,
                                     SequentialSampler, SubsetRandomSampler, WeightedRandomSampler)
from threadloom.data.worker import WorkerInfo, get_worker_info

__all__ = ["BatchSampler", "DataLoader", "DataLoaderTimeoutError", "Dataset", "DistributedSampler",
           "IterableDataset", "RandomSampler", "Sampler", "SequentialSampler", "Subset",
           "SubsetRandomSampler", "WeightedRandomSampler", "WorkerInfo", "default_collate",
           "default_convert", "get_worker_info"]
