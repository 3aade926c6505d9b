"""CUDA green contexts: a device's SMs split in two groups, with streams whose kernels run on one group only.

Why (issue 7, the flat-scaling target; ``benchmarks/RESULTS.md`` section 6, session 43): in a wavefront step at MAC
65536 x 1 a memory block's backward segment chain runs ~0.6 ms a segment alone on the GPU and ~1.2 ms beside the
other two chains and everything else on the GPU; sessions 28-41 found its kernels 1.4-1.9x slower in the step than
alone, the cost of their neighbours (shared caches, instruction fetch), not of waiting.  A green context holds a
fixed set of SMs: with the chains' streams in one group and every other stream of the wavefront in the other
(:func:`partition_stream`), no kernel of the rest runs on a chain's SMs.  Whether that is faster is what
``TITANS_WAVEFRONT_GREEN_SMS`` (the chains' SMs; unset or 0: no partition) is there to time.

Built on the CUDA driver's green-context calls (CUDA 12.4 or later: ``cuDevSmResourceSplitByCount``,
``cuGreenCtxCreate``, ``cuGreenCtxStreamCreate``) through ``ctypes``, because torch's own
``torch.cuda.green_contexts`` (beta) hands out one group of the first N SMs, not the disjoint pair a partition
needs.  The streams reach PyTorch as ``torch.cuda.ExternalStream``; they live as long as the process (like
:func:`titans.utils.tensors.side_stream`'s).  ``python -m titans.utils.green_contexts`` probes a GPU: the split,
a matmul and a Triton kernel on each group's stream, and a CUDA graph captured across both, against the same work
on ordinary streams.
"""

from __future__ import annotations

import ctypes

import torch

from titans.utils.switches import switch_value

GREEN_SMS_ENV = "TITANS_WAVEFRONT_GREEN_SMS"
_SM_RESOURCE = 1  # CU_DEV_RESOURCE_TYPE_SM
_DEFAULT_STREAM = 1  # CU_GREEN_CTX_DEFAULT_STREAM, the flag cuGreenCtxCreate requires
_NON_BLOCKING = 1  # CU_STREAM_NON_BLOCKING
# CUdevResource is 144 bytes in CUDA 12.4-12.9 and larger in CUDA 13 (a pointer to a next resource): the driver
# writes into buffers this big, whatever its version
_RESOURCE_BYTES = 1024

_PARTITIONS: dict = {}  # device index -> (chains' green context, the rest's, their SM counts)
_STREAMS: dict = {}  # (device index, part, role, urgent) -> ExternalStream


def chain_sms() -> int:
    """SMs for the wavefront's segment chains (``TITANS_WAVEFRONT_GREEN_SMS``), 0 for no partition."""
    return int(switch_value(GREEN_SMS_ENV) or 0)


class GreenContextError(RuntimeError):
    """A driver call of the partition failed: its name and CUDA's error code."""


def _driver():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise GreenContextError(f"green contexts need the CUDA driver library (libcuda.so.1): {e}") from e


def _call(driver, name: str, *args) -> None:
    fn = getattr(driver, name, None)
    if fn is None:
        raise GreenContextError(f"{name}: not in this CUDA driver (green contexts need CUDA 12.4 or later)")
    status = fn(*args)
    if status != 0:
        raise GreenContextError(f"{name} failed with CUDA error {status}")


def _partition(index: int, sms: int):
    """The two green contexts of device ``index``: ``sms`` SMs (rounded up by the driver to its split granularity,
    8 on Hopper) for the chains, the remaining SMs for the rest.  Made once per process."""
    if index in _PARTITIONS:
        if _PARTITIONS[index][2] != sms:
            raise GreenContextError(f"{GREEN_SMS_ENV}: device {index} was already partitioned with "
                                    f"{_PARTITIONS[index][2]} SMs for the chains, now {sms} asked")
        return _PARTITIONS[index]
    total = torch.cuda.get_device_properties(index).multi_processor_count
    if not 0 < sms < total:
        raise ValueError(f"{GREEN_SMS_ENV}={sms}: expected between 1 and {total - 1} (device {index} has {total} SMs)")
    torch.cuda.init()
    driver = _driver()
    dev = ctypes.c_int(0)
    _call(driver, "cuDeviceGet", ctypes.byref(dev), ctypes.c_int(index))
    whole = ctypes.create_string_buffer(_RESOURCE_BYTES)
    _call(driver, "cuDeviceGetDevResource", dev, whole, ctypes.c_int(_SM_RESOURCE))
    group = ctypes.create_string_buffer(_RESOURCE_BYTES)
    remaining = ctypes.create_string_buffer(_RESOURCE_BYTES)
    groups = ctypes.c_uint(1)
    _call(driver, "cuDevSmResourceSplitByCount", group, ctypes.byref(groups), whole, remaining,
          ctypes.c_uint(0), ctypes.c_uint(sms))
    if groups.value != 1:
        raise GreenContextError(f"cuDevSmResourceSplitByCount: no group of {sms} SMs on device {index}")
    contexts = []
    for res in (group, remaining):
        desc = ctypes.c_void_p()
        _call(driver, "cuDevResourceGenerateDesc", ctypes.byref(desc), res, ctypes.c_uint(1))
        ctx = ctypes.c_void_p()
        _call(driver, "cuGreenCtxCreate", ctypes.byref(ctx), desc, dev, ctypes.c_uint(_DEFAULT_STREAM))
        contexts.append(ctx)
    # the SM count sits right after the resource type and its 92 bytes of padding (every CUDA version so far)
    counts = tuple(ctypes.c_uint.from_buffer(res, 96).value for res in (group, remaining))
    _PARTITIONS[index] = (contexts[0], contexts[1], sms, counts)
    return _PARTITIONS[index]


def partition_counts(device: torch.device | str) -> tuple[int, int]:
    """The SMs of the chains' group and of the rest on ``device`` (after :func:`partition_stream` made them)."""
    index = _index(device)
    if index not in _PARTITIONS:
        raise GreenContextError(f"device {index} is not partitioned")
    return _PARTITIONS[index][3]


def _index(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"green contexts need a CUDA device, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def partition_stream(device: torch.device | str, chains: bool, role: tuple | str, urgent: bool = False,
                     sms: int | None = None) -> torch.cuda.ExternalStream:
    """The stream of ``role`` whose kernels run on the chains' SMs (``chains``) or on the rest, at the device's
    highest priority when ``urgent``; made once per process, like ``side_stream``'s.  ``sms``: the chains' SMs
    (default ``TITANS_WAVEFRONT_GREEN_SMS``)."""
    index = _index(device)
    sms = chain_sms() if sms is None else sms
    key = (index, chains, role, urgent)
    if key not in _STREAMS:
        ctx = _partition(index, sms)[0 if chains else 1]
        low, high = torch.cuda.Stream.priority_range()
        handle = ctypes.c_void_p()
        _call(_driver(), "cuGreenCtxStreamCreate", ctypes.byref(handle), ctx, ctypes.c_uint(_NON_BLOCKING),
              ctypes.c_int(high if urgent else low))
        _STREAMS[key] = torch.cuda.ExternalStream(handle.value, device=torch.device("cuda", index))
    return _STREAMS[key]


def _probe() -> dict:  # pragma: no cover - needs a GPU
    """What ``python -m titans.utils.green_contexts`` reports (see the module docstring)."""
    import time

    report: dict = {"torch": torch.__version__, "torch_green_contexts": hasattr(torch._C, "_CUDAGreenContext")
                    or hasattr(torch._C, "GreenContext")}
    dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).multi_processor_count
    sms = chain_sms() or 64
    chain = partition_stream(dev, True, "probe", urgent=True, sms=sms)
    rest = partition_stream(dev, False, "probe", sms=sms)
    report["sms"] = {"device": total, "asked": sms, "chains": partition_counts(dev)[0], "rest": partition_counts(dev)[1]}
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    main = torch.cuda.current_stream(dev)

    def work(stream):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            out = (a @ a).float().softmax(-1)  # a cuBLAS matmul, then a PyTorch kernel
            out = torch.compile(lambda t: (t * 2 + 1).sum(-1), dynamic=False)(out)  # an inductor Triton kernel
        main.wait_stream(stream)
        return out

    expect = work(torch.cuda.Stream(dev))
    for name, stream in (("chains", chain), ("rest", rest)):
        got = work(stream)
        torch.cuda.synchronize(dev)
        report[f"{name}_equal"] = bool(torch.equal(got, expect))

    def timed(stream, n=20):  # one matmul's time on a stream whose kernels have the group's SMs only
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        with torch.cuda.stream(stream):
            for _ in range(n):
                a @ a
        torch.cuda.synchronize(dev)
        return (time.perf_counter() - t) / n * 1e3

    report["matmul_ms"] = {"all SMs": timed(torch.cuda.Stream(dev)), "chains": timed(chain), "rest": timed(rest)}
    # a CUDA graph whose capture forks into both groups' streams and joins them
    g = torch.cuda.CUDAGraph()
    work(chain), work(rest)
    torch.cuda.synchronize(dev)
    try:
        with torch.cuda.graph(g):
            x = work(chain)
            y = work(rest)
        g.replay()
        torch.cuda.synchronize(dev)
        report["graph_equal"] = bool(torch.equal(x, expect) and torch.equal(y, expect))
    except Exception as e:  # noqa: BLE001 - the probe reports what the capture raised
        report["graph_error"] = f"{type(e).__name__}: {e}"
    return report


if __name__ == "__main__":  # pragma: no cover - needs a GPU
    import json

    print(json.dumps(_probe(), indent=1))
