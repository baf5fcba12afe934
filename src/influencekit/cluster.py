"""The one place influencekit starts or connects to a Dask cluster.

Work that outgrows one process (leave-one-out refits, LiSSA chains, score
matrices) runs on Dask distributed: a local cluster of single-threaded worker
processes by default, or an existing cluster (``dask scheduler`` and ``dask
worker`` processes, possibly on other machines) given by its address.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import dask
from distributed import Client, LocalCluster

__all__ = ["dask_client", "local_cluster"]


def local_cluster(workers: int) -> LocalCluster:
    """A local Dask cluster of ``workers`` single-threaded worker processes.

    No dashboard, logs below ERROR silenced. Dask limits the workers' BLAS and
    OpenMP threads to one and, by default, also sets
    ``MALLOC_TRIM_THRESHOLD_=65536`` in them; the latter fixes glibc's mmap
    threshold at 128 KiB, so every short-lived tensor above it (a LiSSA step
    over several chains allocates a few of ~100 KiB-1 MiB) is mapped and
    page-faulted afresh, which makes vectorised work several times slower.
    These workers keep glibc's default, adaptive, malloc settings instead.
    Use it as a context manager, or close it.
    """
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )


@contextlib.contextmanager
def environment_restored() -> Iterator[None]:
    """Undo changes to ``os.environ`` made inside the block.

    Dask's ``Nanny`` sets ``distributed.nanny.pre-spawn-environ`` (``OMP_NUM_THREADS=1``,
    ``MKL_NUM_THREADS=1``, ``OPENBLAS_NUM_THREADS=1``, ``MALLOC_TRIM_THRESHOLD_``) in
    the *client's* ``os.environ`` before it spawns each worker, and leaves them there.
    Every process this one starts afterwards would then run single-threaded BLAS,
    whose results differ from multi-threaded BLAS in the last bits, so a model fitted
    in such a subprocess has another :func:`~influencekit.validation.refit_cache.fingerprint_of` than the same fit here,
    and a resumed run would not find the refits it saved.
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        os.environ.update(saved)


@contextlib.contextmanager
def dask_client(
    workers: int, scheduler_address: str | None = None, client: Client | None = None
) -> Iterator[Client]:
    """A connected client: ``client`` itself (left open), one to ``scheduler_address``, or a new local cluster.

    A new local cluster (:func:`local_cluster`) is waited for until all
    ``workers`` are up, so that a broadcast reaches every one of them; it is
    closed on exit, and the environment variables its nannies set in this
    process are restored (:func:`environment_restored`).
    """
    if client is not None:
        yield client
        return
    with contextlib.ExitStack() as stack:
        if scheduler_address is not None:
            yield stack.enter_context(Client(scheduler_address))
            return
        stack.enter_context(environment_restored())  # exited last, after the cluster has closed
        cluster = stack.enter_context(local_cluster(workers))
        connected = stack.enter_context(Client(cluster))
        connected.wait_for_workers(workers)
        yield connected
