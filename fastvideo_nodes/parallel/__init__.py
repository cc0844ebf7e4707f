"""Sequence parallelism: the Ulysses plan around the DiT and the worker pool that runs it.

Importing this package starts nothing; the pool starts when first used.
"""


def __getattr__(name):
    if name == "WorkerPool":
        from .pool import WorkerPool
        return WorkerPool
    if name == "UlyssesPlan":
        from .ulysses import UlyssesPlan
        return UlyssesPlan
    raise AttributeError(name)
