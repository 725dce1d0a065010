"""Measurement helpers for the penalty microbenchmarks (GPU).

What is timed: the op a forward hook runs, ``guard(hidden, basis, anchors, weight)``,
forward, backward (``grad_hidden = grad_out + s * dL/dH``) and both, for each variant:

* ``eager``     -- the PyTorch reference (backend="torch")
* ``compiled``  -- ``torch.compile`` of the same reference function
* ``triton``    -- the fused Triton kernels
* ``cuda``      -- the CUDA C++ kernels (when built)

How: each variant's calls are captured in a CUDA graph that cycles through enough
independent input sets (> 4x the L2 cache) that no call finds its data in L2; the
graph is replayed between CUDA events and the median per-call time is reported
(device time only; launch overhead is reported separately as ``call_ms``, from
plain ``triton.testing.do_bench`` without a graph).  Inputs are random, never zeros.

Bytes counted (the floor): forward reads H once; backward reads grad_out once and
writes grad_hidden once; plus the small N x k / N arrays.  % of bandwidth is against
a device-to-device copy measured in the same run (bytes read + bytes written).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

import torch

import refusalguard_kernels as rg
from refusalguard_kernels import reference

L2_MULTIPLE = 4  # input sets together exceed this many L2 caches


@dataclass
class Case:
    N: int
    d: int
    k: int
    dtype: str = "bfloat16"
    drift_coef: float = 1.0
    gram_coef: float = 0.1

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def bytes(self, mode: str) -> int:
        hidden = self.N * self.d * self.elem
        small_fwd = self.N * self.k * 4 * 2 + self.N * 4  # anchors read, coords written, weight read
        small_bwd = self.N * self.k * 4 * 2 + self.N * 4  # coords, anchors, weight read
        if mode == "fwd":
            return hidden + small_fwd
        if mode == "bwd":
            return 2 * hidden + small_bwd
        return 3 * hidden + small_fwd + small_bwd


@dataclass
class Result:
    variant: str
    mode: str
    N: int
    d: int
    k: int
    dtype: str
    gpu_ms: float
    call_ms: float | None
    gbps: float
    pct_copy_bw: float
    extra_peak_mb: float | None = None
    notes: dict = field(default_factory=dict)
    p20_ms: float | None = None  # over the graph replays, like gpu_ms (the median)
    p80_ms: float | None = None


def copy_bandwidth_gbps(nbytes: int = 2 * 1024**3, reps: int = 20) -> float:
    """Device-to-device copy, counting bytes read + bytes written, median of reps."""
    n = nbytes // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def _reference_guard(hidden, basis, anchors, weight, drift_coef: float, gram_coef: float):
    loss = reference.geometry_loss(hidden, basis, anchors, weight, drift_coef=drift_coef, gram_coef=gram_coef)
    return hidden, loss


_compiled = {}


def variant_fn(variant: str):
    """fn(hidden, basis, anchors, weight, drift_coef, gram_coef) -> (hidden_out, loss).

    "compiled" is one dynamic-shape compile reused across the sweep (a static compile
    per shape would cost minutes); "compiled-static" specialises to the shape."""
    if variant == "eager":
        return _reference_guard
    if variant in ("compiled", "compiled-static"):
        if variant not in _compiled:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            # The backward-only timing replays one compiled graph with retain_graph=True,
            # which donated buffers forbid.
            torch._functorch.config.donated_buffer = False
            _compiled[variant] = torch.compile(_reference_guard, dynamic=variant == "compiled")
        return _compiled[variant]
    if variant in ("triton", "cuda"):

        def fn(hidden, basis, anchors, weight, drift_coef, gram_coef):
            return rg.guard(
                hidden,
                basis,
                anchors,
                weight,
                drift_coef=drift_coef,
                gram_coef=gram_coef,
                backend=variant,
                validate=False,
            )

        return fn
    raise ValueError(variant)


def make_sets(case: Case, count: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    basis = rg.orthonormalize_basis(torch.randn(case.d, case.k, device="cuda", dtype=torch.float64, generator=gen))
    sets = []
    for _ in range(count):
        hidden = torch.randn(case.N, case.d, device="cuda", generator=gen).to(case.torch_dtype)
        coords = (hidden @ basis.to(case.torch_dtype)).float()
        anchors = coords + 0.1 * torch.randn(case.N, case.k, device="cuda", generator=gen)
        weight = torch.rand(case.N, device="cuda", generator=gen)
        grad_out = torch.randn(case.N, case.d, device="cuda", generator=gen).to(case.torch_dtype)
        sets.append(dict(hidden=hidden.requires_grad_(True), anchors=anchors, weight=weight, grad_out=grad_out))
    return basis, sets


def sets_needed(case: Case) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    per_set = 2 * case.N * case.d * case.elem  # hidden + grad_out
    return max(2, min(16, math.ceil(L2_MULTIPLE * l2 / per_set)))


def _graph_time(body, calls: int, replays: int = 10) -> float:
    """Median ms per call of ``body`` replayed from a CUDA graph (see _graph_quantiles)."""
    return _graph_quantiles(body, calls, replays)[1]


def _graph_quantiles(body, calls: int, replays: int = 10) -> tuple[float, float, float]:
    """p20, median and p80 ms per call of ``body`` (which performs ``calls`` calls) replayed from a CUDA graph.

    Runs on the current stream, which must be a side stream: the autograd graphs that
    backward replays were built there, and capture cannot use the legacy default stream."""
    stream = torch.cuda.current_stream()
    for _ in range(2):
        body()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        body()
    graph.replay()
    stream.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    q = statistics.quantiles(times, n=10, method="inclusive")
    return q[1], statistics.median(times), q[7]


def measure(case: Case, variant: str, copy_gbps: float, modes=("fwd", "bwd", "fwdbwd"), call_overhead=True):
    """Time one variant on one case in every mode; returns a list of Result."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        results = _measure(case, variant, copy_gbps, modes, call_overhead)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    return results


def _measure(case, variant, copy_gbps, modes, call_overhead):
    import triton.testing

    fn = variant_fn(variant)
    count = sets_needed(case)
    basis, sets = make_sets(case, count)
    dc, gc = case.drift_coef, case.gram_coef
    s = torch.full((), 1.0, device="cuda")
    results = []

    def fwd_all():
        for st in sets:
            fn(st["hidden"], basis, st["anchors"], st["weight"], dc, gc)

    graphs = [None] * count

    def fwdbwd_all():
        for st in sets:
            st["hidden"].grad = None  # time producing the gradient, not accumulating into an old one
            out, loss = fn(st["hidden"], basis, st["anchors"], st["weight"], dc, gc)
            torch.autograd.backward([out, loss], [st["grad_out"], s])

    for mode in modes:
        for st in sets:
            st["hidden"].grad = None
        if mode == "fwd":
            p20, ms, p80 = _graph_quantiles(fwd_all, count)
        elif mode == "fwdbwd":
            p20, ms, p80 = _graph_quantiles(fwdbwd_all, count)
        else:  # backward alone: forward graphs built outside, replayed backward with retain_graph
            for i, st in enumerate(sets):
                graphs[i] = fn(st["hidden"], basis, st["anchors"], st["weight"], dc, gc)

            def bwd_all():
                for st, (out, loss) in zip(sets, graphs):
                    st["hidden"].grad = None
                    torch.autograd.backward([out, loss], [st["grad_out"], s], retain_graph=True)

            p20, ms, p80 = _graph_quantiles(bwd_all, count)
        call_ms = None
        if call_overhead:
            st = sets[0]
            if mode == "fwd":
                call = lambda: fn(st["hidden"], basis, st["anchors"], st["weight"], dc, gc)  # noqa: E731
            elif mode == "fwdbwd":

                def call():
                    out, loss = fn(st["hidden"], basis, st["anchors"], st["weight"], dc, gc)
                    torch.autograd.backward([out, loss], [st["grad_out"], s])
            else:
                out0, loss0 = graphs[0]
                call = lambda: torch.autograd.backward([out0, loss0], [st["grad_out"], s], retain_graph=True)  # noqa: E731
            call_ms = triton.testing.do_bench(call, grad_to_none=[st["hidden"]], return_mode="median")
        gbps = case.bytes(mode) / (ms * 1e-3) / 1e9
        results.append(
            Result(
                variant,
                mode,
                case.N,
                case.d,
                case.k,
                case.dtype,
                ms,
                call_ms,
                gbps,
                100.0 * gbps / copy_gbps,
                p20_ms=p20,
                p80_ms=p80,
            )
        )
    graphs.clear()
    # Peak memory beyond inputs and the gradient backward must produce, for one fwd+bwd.
    st = sets[0]
    st["hidden"].grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, loss = fn(st["hidden"], basis, st["anchors"], st["weight"], dc, gc)
    torch.autograd.backward([out, loss], [st["grad_out"], s])
    torch.cuda.synchronize()
    grad_bytes = case.N * case.d * case.elem
    extra = (torch.cuda.max_memory_allocated() - base - grad_bytes) / 2**20
    for r in results:
        if r.mode == "fwdbwd":
            r.extra_peak_mb = extra
            r.notes["N*k*4 bytes (MB)"] = case.N * case.k * 4 / 2**20
    sets.clear()  # frees the input sets; the closures above are not called again
    del out, loss
    torch.cuda.empty_cache()
    return results


def as_dict(result: Result) -> dict:
    return asdict(result)
