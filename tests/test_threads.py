"""Threads (issue 12): every op called from several Python threads at once, on shared read-only inputs,
gives the serial results bit for bit and leaves the inputs untouched; the automatic-fallback warning is
issued once per process however many threads meet it; ``use_backend`` is per thread (a ContextVar:
each thread, and each asyncio task, has its own; a new thread does not inherit the block it was
started in) while ``VLM_KERNELS_BACKEND`` is process-wide."""

from __future__ import annotations

import asyncio
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import vlm_kernels as vk
from vlm_kernels import _backend

from _robust import TARGETS, WORKLOADS, require_target, skip_unless_implemented, workload_entry, workload_table

THREADS = 4
CALLS_PER_THREAD = 3


@pytest.fixture(params=TARGETS)
def target(request):
    return require_target(request.param)


def _run_concurrently(fn, threads=THREADS, calls=CALLS_PER_THREAD):
    """Start ``threads`` threads together (a barrier), each calling ``fn`` ``calls`` times."""
    barrier = threading.Barrier(threads)

    def worker(_):
        barrier.wait()
        return [fn() for _ in range(calls)]

    with ThreadPoolExecutor(threads) as pool:
        return [r for rs in pool.map(worker, range(threads)) for r in rs]


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_concurrent_calls_equal_serial_calls(target, workload):
    backend, device = target
    make, run = WORKLOADS[workload]
    inputs = make(device)
    skip_unless_implemented(workload_table(workload), workload_entry(workload), backend, device,
                            next(iter(inputs.values())))
    before = {k: v.clone() for k, v in inputs.items()}

    def call():
        with vk.use_backend(backend):  # per thread: each worker forces its own
            return run(inputs)

    serial = call()
    # The interpreter takes its launches in turn (vlm_kernels.ops._common._INTERPRETER_LOCK), so fewer
    # calls show the same thing there; on a GPU all of them run.
    interpreted = backend == "triton" and device == "cpu"
    results = _run_concurrently(call, threads=3 if interpreted else THREADS, calls=1 if interpreted else CALLS_PER_THREAD)
    for result in results:
        for got, expect in zip(result, serial):
            assert torch.equal(got, expect), f"{workload} on {backend}: a concurrent call differs from the serial one"
    for k, v in inputs.items():
        assert torch.equal(v, before[k]), f"{workload}: input {k} was modified"


def test_use_backend_is_per_thread():
    """Two threads force different backends at the same time; each op sees its own thread's choice."""
    from vlm_kernels.ops import vq

    cpu = torch.device("cpu")
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        with vk.use_backend(name):
            barrier.wait()  # both blocks are open now
            seen[name] = (vk.forced_backend(), vq.TABLE.select("nearest", cpu)[0])
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("reference", "triton")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert seen == {"reference": ("reference", "reference"), "triton": ("triton", "triton")}


def test_a_new_thread_does_not_inherit_use_backend(monkeypatch):
    monkeypatch.delenv("VLM_KERNELS_BACKEND", raising=False)
    seen = []
    with vk.use_backend("reference"):
        th = threading.Thread(target=lambda: seen.append(vk.forced_backend()))
        th.start()
        th.join()
        assert vk.forced_backend() == "reference"
    # Python 3.14 can start threads with a copy of the caller's context (sys.flags.thread_inherit_context,
    # on by default in free-threaded builds): then the block is inherited.
    inherits = bool(getattr(sys.flags, "thread_inherit_context", 0))
    assert seen == (["reference"] if inherits else [None])


def test_use_backend_is_per_asyncio_task():
    async def task(name):
        with vk.use_backend(name):
            await asyncio.sleep(0)  # let the other task run inside its own block
            return vk.forced_backend()

    async def both():
        return await asyncio.gather(task("reference"), task("cpu"))

    assert asyncio.run(both()) == ["reference", "cpu"]


def test_environment_variable_is_process_wide(monkeypatch):
    monkeypatch.setenv("VLM_KERNELS_BACKEND", "reference")
    seen = []
    th = threading.Thread(target=lambda: seen.append(vk.forced_backend()))
    th.start()
    th.join()
    assert seen == ["reference"]


def test_fallback_warning_once_across_threads(monkeypatch):
    """The preferred backend is missing: many threads fall back at once, one warning is issued."""
    monkeypatch.setitem(_backend._cache, "cpu", _backend.Availability(False, "disabled by the test"))
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv("VLM_KERNELS_BACKEND", raising=False)
    x, codebook = torch.randn(50, 8), torch.randn(7, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _run_concurrently(lambda: vk.vq_nearest(x, codebook), threads=8, calls=4)
    fallback = [w for w in caught if "falling back" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in fallback]
    assert "vq" in str(fallback[0].message) and "disabled by the test" in str(fallback[0].message)
    for idx, dist in results:
        assert torch.equal(idx, results[0][0]) and torch.equal(dist, results[0][1])
