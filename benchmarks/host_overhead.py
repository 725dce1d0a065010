"""Host (CPU) time per call of the functional API, and where it goes.

    python benchmarks/host_overhead.py                  # CPU: Triton launches stubbed out
    python benchmarks/host_overhead.py --real           # GPU host: real launches, unsynchronised
    python benchmarks/host_overhead.py --profile        # plus a cProfile of guard fwd+bwd
    python benchmarks/host_overhead.py --json out.json  # the numbers as JSON

Method: ``time.perf_counter`` around ``--calls`` back-to-back calls with no device
synchronisation inside the timed region; per-call time = elapsed / calls; repeated
``--repeats`` times and reported as p20 / p50 / p80 over the repeats (microseconds).
Timed per call, for ``validate=False`` and ``validate=True``:

* ``guard_fwdbwd``  -- ``guard()`` then ``torch.autograd.grad`` of (hidden_out, loss)
* ``geometry_loss`` -- forward only
* ``project``       -- forward only

Stubbed mode (default without a GPU) replaces the four ``@triton.jit`` kernels of
``ops/triton_penalty.py`` by objects whose ``kernel[grid](...)`` does nothing: the
launchers still run in full (layout, grid sizes, output allocation, basis-split cache),
so what is timed is our Python + torch.library + autograd path, without Triton's own
launch cost (about 12 us per launch on a fast host, measured separately with --real).
Outputs are uninitialised buffers of the right shape; values are not checked here.

``--real`` runs the kernels on the GPU (small shapes, so the device keeps up with the
host and the launch queue never blocks); the device is synchronised before and after
each timed block, never inside it.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time

import torch

# Time this checkout's package, not whatever an editable install points at.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OPS = ("guard_fwdbwd", "geometry_loss", "project")
KERNELS = ("_split_basis_kernel", "_penalty_fwd_kernel", "_penalty_finalize_kernel", "_penalty_bwd_kernel")


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        _NoLaunch.launches += 1


@contextlib.contextmanager
def stubbed_launches():
    """Triton launches become no-ops, and backend="triton" accepts CPU tensors.

    TRITON_INTERPRET=1 is what lets resolve_backend take CPU tensors; the launcher's own
    interpreter branches (fp32 staging buffer for bf16 rounding, upcast dots) are turned
    off so the host work timed is the work the GPU path does."""
    from refusalguard_kernels import backends
    from refusalguard_kernels.ops import triton_penalty as tp

    saved = {name: getattr(tp, name) for name in KERNELS}
    saved_interp = tp.interpreting
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    backends.refresh()
    try:
        for name in KERNELS:
            setattr(tp, name, _NoLaunch())
        tp.interpreting = lambda: False
        yield
    finally:
        for name, fn in saved.items():
            setattr(tp, name, fn)
        tp.interpreting = saved_interp
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        backends.refresh()


def make_inputs(N: int, d: int, k: int, dtype: torch.dtype, device: str):
    import refusalguard_kernels as rg

    gen = torch.Generator(device="cpu").manual_seed(0)
    basis = rg.orthonormalize_basis(torch.randn(d, k, dtype=torch.float64, generator=gen)).to(device)
    hidden = torch.randn(N, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    anchors = torch.randn(N, k, generator=gen).to(device)
    weight = torch.rand(N, generator=gen).to(device)
    grad_out = torch.randn(N, d, generator=gen).to(device=device, dtype=dtype)
    return dict(hidden=hidden, basis=basis, anchors=anchors, weight=weight, grad_out=grad_out)


def make_call(op: str, inp: dict, backend: str, validate: bool):
    import refusalguard_kernels as rg

    h, b, a, w, g = inp["hidden"], inp["basis"], inp["anchors"], inp["weight"], inp["grad_out"]
    one = torch.ones((), device=h.device)
    kw = dict(backend=backend, validate=validate)
    if op == "guard_fwdbwd":

        def call():
            out, loss = rg.guard(h, b, a, w, drift_coef=1.0, gram_coef=0.1, **kw)
            torch.autograd.grad([out, loss], [h], [g, one])

    elif op == "geometry_loss":

        def call():
            rg.geometry_loss(h, b, a, w, drift_coef=1.0, gram_coef=0.1, **kw)

    elif op == "project":

        def call():
            rg.project(h, b, **kw)

    else:
        raise ValueError(op)
    return call


def time_per_call(call, calls: int, repeats: int, sync) -> dict:
    """p20/p50/p80 over repeats of (perf_counter elapsed / calls), in microseconds."""
    for _ in range(max(3, calls // 10)):
        call()
    sync()
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        t1 = time.perf_counter()
        sync()  # outside the timed region: the queue drains before the next block
        per_call.append(1e6 * (t1 - t0) / calls)
    q = statistics.quantiles(per_call, n=10, method="inclusive")
    return {"p20_us": q[1], "p50_us": statistics.median(per_call), "p80_us": q[7], "calls": calls, "repeats": repeats}


def component_times(inp: dict, backend: str, calls: int, repeats: int, sync) -> dict:
    """The layers of one guard fwd+bwd timed alone (validate=False), to show where the time goes."""
    from refusalguard_kernels import functional as F
    from refusalguard_kernels.backends import resolve_backend
    from refusalguard_kernels.ops import penalty
    from refusalguard_kernels.validation import check_inputs

    h, b, a, w, g = inp["hidden"], inp["basis"], inp["anchors"], inp["weight"], inp["grad_out"]
    name, b32, a32, w32 = F._prepare(h, b, a, w, backend, False)
    mod = __import__("refusalguard_kernels.backends", fromlist=["kernel_module"]).kernel_module(name)
    hd = h.detach()
    coords, loss, state = mod.loss_forward(hd, b32, a32, w32, 1.0, 0.1)
    one = torch.ones((), device=h.device)
    parts = {
        "resolve_backend": lambda: resolve_backend(backend, h.device),
        "check_inputs": lambda: check_inputs(h, b, a, w, allowed_hidden_dtypes=F._KERNEL_DTYPES),
        "_prepare (all host checks + fp32 views)": lambda: F._prepare(h, b, a, w, backend, False),
        "launcher loss_forward (no torch.library)": lambda: mod.loss_forward(hd, b32, a32, w32, 1.0, 0.1),
        "launcher loss_backward (no torch.library)": lambda: mod.loss_backward(
            g, one, coords, a32, w32, state, b32, list(h.shape), h.dtype, 0.1
        ),
        "loss_forward_op (torch.library, no grad)": lambda: penalty.loss_forward_op(hd, b32, a32, w32, 1.0, 0.1, name),
        "GuardFunction.apply + autograd.grad": lambda: torch.autograd.grad(
            list(penalty.GuardFunction.apply(h, b32, a32, w32, 1.0, 0.1, name)), [h], [g, one]
        ),
    }
    return {label: time_per_call(fn, calls, repeats, sync)["p50_us"] for label, fn in parts.items()}


def ab_dispatch(inp: dict, backend: str, calls: int, repeats: int, sync) -> dict:
    """guard fwd+bwd (validate=False) with GuardFunction calling the torch.library ops (as before
    the host-path change) and calling the launchers directly (now), alternated block by block in
    one process, so both see the same load on a shared machine."""
    from refusalguard_kernels.ops import penalty

    call = make_call("guard_fwdbwd", inp, backend, False)
    orig = penalty.plain_eager
    arms = {"via torch.library ops": lambda *t: False, "direct launcher calls": orig}
    times = {label: [] for label in arms}
    try:
        for _ in range(3):
            call()
        for _ in range(repeats):
            for label, pred in arms.items():
                penalty.plain_eager = pred
                sync()
                t0 = time.perf_counter()
                for _ in range(calls):
                    call()
                times[label].append(1e6 * (time.perf_counter() - t0) / calls)
                sync()
    finally:
        penalty.plain_eager = orig
    out = {}
    for label, v in times.items():
        q = statistics.quantiles(v, n=10, method="inclusive")
        out[label] = {"p20_us": q[1], "p50_us": statistics.median(v), "p80_us": q[7]}
    return out


def profile(call, calls: int, top: int = 30) -> str:
    prof = cProfile.Profile()
    for _ in range(10):
        call()
    prof.enable()
    for _ in range(calls):
        call()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def git_commit() -> str | None:
    import subprocess

    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return None


def measure_host(
    *,
    real: bool,
    N: int = 256,
    d: int = 256,
    k: int = 8,
    dtype: str = "bfloat16",
    backend: str = "triton",
    calls: int = 200,
    repeats: int = 15,
    components: bool = True,
) -> dict:
    """Everything this script reports, as a dict (also the ``host`` section of the bench JSON)."""
    device = "cuda" if real else "cpu"
    sync = torch.cuda.synchronize if real else (lambda: None)
    ctx = contextlib.nullcontext() if real else stubbed_launches()
    with ctx:
        inp = make_inputs(N, d, k, getattr(torch, dtype), device)
        ops = {}
        for op in OPS:
            for validate in (False, True):
                ops[f"{op}/validate={validate}"] = time_per_call(
                    make_call(op, inp, backend, validate), calls, repeats, sync
                )
        comp = component_times(inp, backend, calls, repeats, sync) if components else {}
    cpu = platform.processor() or platform.machine()
    return {
        "mode": "real launches (GPU)" if real else "Triton launches stubbed (CPU)",
        "method": "time.perf_counter around `calls` unsynchronised calls; per call = elapsed/calls; "
        "p20/p50/p80 over `repeats` blocks; device synchronised only between blocks",
        "host_cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": {"N": N, "d": d, "k": k, "dtype": dtype, "backend": backend},
        "ops": ops,
        "components_p50_us": comp,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="real kernel launches on a GPU (default: stubbed on CPU)")
    ap.add_argument("--backend", default="triton", choices=["triton", "cuda"], help="cuda needs --real")
    ap.add_argument("--N", type=int, default=256)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: the CPU-side small ops do not fight)"
    )
    ap.add_argument("--profile", action="store_true", help="print a cProfile of guard fwd+bwd (validate=False)")
    ap.add_argument("--ab", action="store_true", help="also A/B the op dispatch of guard fwd+bwd, interleaved")
    ap.add_argument("--json", default=None, help="write the numbers to this file")
    args = ap.parse_args(argv)
    if args.real and not torch.cuda.is_available():
        raise SystemExit("--real needs a CUDA GPU; without one the launches are stubbed (drop --real)")
    if args.backend == "cuda" and not args.real:
        raise SystemExit("--backend cuda needs --real (only the Triton launches can be stubbed)")

    torch.set_num_threads(args.threads)
    res = measure_host(
        real=args.real,
        N=args.N,
        d=args.d,
        k=args.k,
        dtype=args.dtype,
        backend=args.backend,
        calls=args.calls,
        repeats=args.repeats,
    )
    res["git_commit"] = git_commit()
    print(f"host overhead: {res['mode']}; {res['host_cpu']}, {res['cpu_count']} CPUs, torch {res['torch']}")
    print(f"shape N={args.N} d={args.d} k={args.k} {args.dtype}, backend={args.backend}; {res['method']}")
    print(f"{'op':>34} {'p20 us':>9} {'p50 us':>9} {'p80 us':>9}")
    for name, r in res["ops"].items():
        print(f"{name:>34} {r['p20_us']:9.1f} {r['p50_us']:9.1f} {r['p80_us']:9.1f}")
    print("\nbreakdown, guard fwd+bwd with validate=False (each layer timed alone, p50 us per call):")
    for name, us in res["components_p50_us"].items():
        print(f"  {name:<45} {us:8.1f}")
    if args.ab:
        ctx = contextlib.nullcontext() if args.real else stubbed_launches()
        with ctx:
            inp = make_inputs(args.N, args.d, args.k, getattr(torch, args.dtype), "cuda" if args.real else "cpu")
            sync = torch.cuda.synchronize if args.real else (lambda: None)
            res["ab_dispatch"] = ab_dispatch(inp, args.backend, args.calls, args.repeats, sync)
        print("\nA/B, guard fwd+bwd validate=False, alternated blocks in one process:")
        for label, r in res["ab_dispatch"].items():
            print(f"  {label:<24} p20 {r['p20_us']:7.1f}  p50 {r['p50_us']:7.1f}  p80 {r['p80_us']:7.1f} us")
    if args.profile:
        ctx = contextlib.nullcontext() if args.real else stubbed_launches()
        with ctx:
            inp = make_inputs(args.N, args.d, args.k, getattr(torch, args.dtype), "cuda" if args.real else "cpu")
            print(profile(make_call("guard_fwdbwd", inp, args.backend, False), 2000))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
