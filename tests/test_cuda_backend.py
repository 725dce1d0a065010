"""The CUDA C++ backend (csrc/, refusalguard_kernels.ops.cuda_penalty).

CPU (always):
* csrc compiles (nvcc -c, sm_80 + sm_90) and the compile check fails on a broken file;
* without the extension, backend="cuda" is a clear ValueError naming how to build it,
  available_backends() leaves it out, and csrc_build skips the extension;
* the csrc kernels themselves, compiled for the CPU (tests/cuda_emulation/: every CUDA
  block as 256 host threads with a real barrier), against the float64 reference over
  the contract's grid, through the same autograd wiring as on a GPU.
GPU (marked gpu; skipped without CUDA): the built extension through the public API.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import refusalguard_kernels as rk
from refusalguard_kernels import backends, reference
from refusalguard_kernels.ops import cuda_penalty, penalty

ROOT = Path(__file__).resolve().parents[1]
CHECK_SCRIPT = ROOT / "scripts" / "check_csrc_compiles.sh"


def _load_csrc_build():
    spec = importlib.util.spec_from_file_location("csrc_build", ROOT / "csrc_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


csrc_build = _load_csrc_build()

LOSS_TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 5e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    den = ref.norm().item()
    return (x - ref).norm().item() / (den if den > 0 else 1.0)


def make_inputs(n, d, k, dtype, device, weight_kind="rand", layout="contiguous", seed=0):
    """hidden (N x d; or a transposed 3-D tensor; or "padded": rows inside a NaN-filled buffer
    whose row stride is a multiple of 16 bytes, so 16-byte loads run and the last one of a
    row straddles d -- reading past d would turn the result NaN), orthonormal fp32 basis,
    fp32 anchors near Z, and weights."""
    g = torch.Generator().manual_seed(seed)
    if layout == "padded":
        buffer = torch.full((n, (d + 7) // 8 * 8 + 8), float("nan"), dtype=dtype, device=device)
        hidden = buffer[:, :d]
        hidden.copy_(torch.randn(n, d, generator=g).to(dtype))
        lead = (n,)
    elif layout == "transposed3d":
        assert n % 4 == 0
        hidden = torch.randn(4, n // 4, d, generator=g).to(dtype).to(device).transpose(0, 1)  # (n/4, 4, d) view
        lead = hidden.shape[:-1]
    else:
        hidden = torch.randn(n, d, generator=g).to(dtype).to(device)
        lead = (n,)
    basis = rk.orthonormalize_basis(torch.randn(d, k, generator=g, dtype=torch.float64)).to(device)
    z = reference.project(hidden.double().cpu(), basis.double().cpu())
    anchors = (z + 0.5 * torch.randn(z.shape, generator=g, dtype=torch.float64)).float().to(device)
    if weight_kind is None:
        weight = None
    else:
        weight = torch.rand(lead, generator=g)
        if weight_kind == "zeros":
            weight[..., ::3] = 0.0
        elif weight_kind == "allzero":
            weight.zero_()
        weight = weight.to(device)
    return hidden, basis, anchors, weight


def reference_loss_and_grad(hidden, basis, anchors, weight, drift_coef, gram_coef):
    """float64 loss and dL/dH on the same rounded inputs."""
    h = hidden.detach().double().cpu()
    b = basis.double().cpu()
    a = anchors.double().cpu()
    w = None if weight is None else weight.double().cpu()
    loss = reference.geometry_loss(h, b, a, w, drift_coef=drift_coef, gram_coef=gram_coef)
    dz = reference.loss_grad_coords(reference.project(h, b), a, w, drift_coef=drift_coef, gram_coef=gram_coef)
    return loss, dz @ b.T


# ================================================================== CPU: build and packaging


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_csrc_compile_check_passes():
    proc = subprocess.run(["bash", str(CHECK_SCRIPT)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if "SKIP: nvcc not found" in proc.stdout:
        pytest.skip("nvcc not found: compile check skipped")
    assert "ok    refusalguard_penalty.cu (sm_80, sm_90)" in proc.stdout, proc.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="needs nvcc")
def test_csrc_compile_check_fails_on_a_broken_file(tmp_path):
    shutil.copy(ROOT / "csrc" / "refusalguard_penalty.h", tmp_path)
    broken = '#include "refusalguard_penalty.h"\n__global__ void f(float* x) { x[0] = y; }\n'
    (tmp_path / "broken.cu").write_text(broken)
    proc = subprocess.run(
        ["bash", str(CHECK_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CSRC_DIR": str(tmp_path)},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL  broken.cu" in proc.stdout


def test_compile_check_skips_without_nvcc(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NVCC", "CUDA_HOME")}
    env["PATH"] = str(tmp_path)  # an empty folder: no nvcc anywhere
    proc = subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(CHECK_SCRIPT)], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SKIP: nvcc not found" in proc.stdout


def test_csrc_build_modes_without_cuda_torch(monkeypatch):
    assert csrc_build.extension_modules("0") == ([], {})
    with pytest.raises(SystemExit, match="must be 0, 1 or auto"):
        csrc_build.extension_modules("yes")
    if torch.version.cuda:
        pytest.skip("this torch has CUDA: 'auto' may build here")
    assert csrc_build.extension_modules("auto") == ([], {})
    assert csrc_build.extension_modules(None) == ([], {})
    with pytest.raises(SystemExit, match="CPU-only"):
        csrc_build.extension_modules("1")


def test_csrc_build_skips_when_torch_is_not_importable(monkeypatch):
    # pip's build isolation: setup.py runs without torch.
    monkeypatch.setitem(sys.modules, "torch", None)
    assert csrc_build.extension_modules("auto") == ([], {})
    with pytest.raises(SystemExit, match="torch is not importable"):
        csrc_build.extension_modules("1")


def test_csrc_build_with_a_cuda_torch_builds_the_extension(monkeypatch):
    """The decision path of a machine with a CUDA torch (simulated here) and nvcc."""
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("needs nvcc")
    release = csrc_build._nvcc_release(nvcc)
    monkeypatch.setattr(torch.version, "cuda", release)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(Path(os.path.realpath(nvcc)).parents[1]))
    if not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    ext, cmdclass = csrc_build.extension_modules("1")
    assert [e.name for e in ext] == ["refusalguard_kernels._cuda"]
    assert ext[0].sources == ["csrc/refusalguard_penalty.cu", "csrc/bindings.cpp"]
    flags = ext[0].extra_compile_args["nvcc"]
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags
    assert issubclass(cmdclass["build_ext"], cpp_extension.BuildExtension)

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    ext, _ = csrc_build.extension_modules("auto")
    assert not any("arch" in f for f in ext[0].extra_compile_args["nvcc"])  # torch applies the env list

    major = int(release.split(".")[0])
    monkeypatch.setattr(torch.version, "cuda", f"{major + 1}.0")
    assert csrc_build.extension_modules("auto") == ([], {})
    with pytest.raises(SystemExit, match="majors must match"):
        csrc_build.extension_modules("1")


@pytest.fixture
def extension_missing(monkeypatch):
    """As on a machine where the extension was never built (even if it is built here)."""
    monkeypatch.setitem(sys.modules, "refusalguard_kernels._cuda", None)  # import raises ModuleNotFoundError
    monkeypatch.delenv(cuda_penalty.JIT_ENV, raising=False)
    monkeypatch.setattr(cuda_penalty, "_ops_registered", lambda: False)
    monkeypatch.setattr(cuda_penalty, "_load_state", cuda_penalty._UNSET)
    backends.refresh()  # available_backends() caches its answer
    yield
    cuda_penalty._load_state = cuda_penalty._UNSET
    backends.refresh()


def test_backend_cuda_without_extension_is_a_clear_error(extension_missing):
    why = cuda_penalty.load_error()
    assert why is not None
    assert "REFUSALGUARD_BUILD_CUDA=1 pip install --no-build-isolation -e ." in why
    assert "build_jit()" in why
    assert "cuda" not in rk.available_backends()
    hidden = torch.randn(6, 16)
    basis = rk.orthonormalize_basis(torch.randn(16, 2))
    for call in (
        lambda b: rk.project(hidden, basis, backend=b),
        lambda b: rk.geometry_loss(hidden, basis, torch.randn(6, 2), backend=b),
        lambda b: rk.guard(hidden, basis, torch.randn(6, 2), backend=b),
    ):
        with pytest.raises(ValueError, match="backend='cuda' is not available.*REFUSALGUARD_BUILD_CUDA=1"):
            call("cuda")


@pytest.mark.skipif(bool(torch.version.cuda), reason="checks the CPU-only torch messages")
def test_cpu_only_torch_messages():
    cuda_penalty._load_state = cuda_penalty._UNSET
    try:
        assert "CPU-only" in cuda_penalty.load_error()
    finally:
        cuda_penalty._load_state = cuda_penalty._UNSET
    with pytest.raises(RuntimeError, match="CPU-only"):
        cuda_penalty.build_jit()


def test_jit_env_reports_build_failure(extension_missing, monkeypatch):
    monkeypatch.setenv(cuda_penalty.JIT_ENV, "1")
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # past the CPU-only check, into the build
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    why = cuda_penalty.load_error()
    assert why is not None and "no CUDA toolkit found" in why


def test_sources_are_found_for_jit():
    src = cuda_penalty.csrc_dir()
    assert src is not None and (src / "refusalguard_penalty.cu").is_file() and (src / "bindings.cpp").is_file()


def test_launchers_match_triton_signatures():
    import inspect

    triton_penalty = pytest.importorskip("refusalguard_kernels.ops.triton_penalty")
    for name in ("project", "loss_forward", "loss_backward", "project_backward"):
        assert list(inspect.signature(getattr(cuda_penalty, name)).parameters) == list(
            inspect.signature(getattr(triton_penalty, name)).parameters
        ), name


# ================================================================== CPU: the kernels, emulated

from cuda_emulation import emulated_cuda  # noqa: E402


@pytest.fixture(scope="module")
def emu_dll(tmp_path_factory):
    why = emulated_cuda.unavailable_reason()
    if why:
        pytest.skip(f"cannot build the CPU emulation of the kernels: {why}")
    try:
        return emulated_cuda.build(tmp_path_factory.mktemp("emu"))
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"the emulation harness does not compile:\n{exc.stderr}")


@pytest.fixture
def emu(emu_dll, monkeypatch):
    """penalty's ops with backend="cuda" run the emulated csrc kernels on CPU tensors."""
    launchers = emulated_cuda.EmulatedCuda(emu_dll)
    original = penalty.kernel_module
    monkeypatch.setattr(penalty, "kernel_module", lambda b: launchers if b == "cuda" else original(b))
    emu_dll.rg_set_sm_count(1)  # forward: 2 blocks, backward: 16, so both grid-stride loops run
    yield launchers
    emu_dll.rg_set_sm_count(1)


def _prepared(hidden, basis, anchors, weight):
    """What functional._prepare hands the kernel backends."""
    k = basis.shape[1]
    return (
        basis.float().contiguous(),
        anchors.reshape(-1, k).float().contiguous(),
        None if weight is None else weight.reshape(-1).float().contiguous(),
    )


def _loss_and_grad(hidden, basis, anchors, weight, drift_coef, gram_coef, grad_scale):
    b, a, w = _prepared(hidden, basis, anchors, weight)
    h = hidden.detach().requires_grad_(True)
    _, loss, _ = penalty.loss_forward_op(h, b, a, w, drift_coef, gram_coef, "cuda")
    (grad,) = torch.autograd.grad(loss, h, grad_outputs=torch.tensor(grad_scale))
    return loss.detach(), grad


EMU_GRID = [
    # (N, d, k, dtype, weight_kind, layout)
    (1, 1000, 3, torch.float32, "rand", "contiguous"),
    (1, 100, 64, torch.bfloat16, None, "contiguous"),
    (200, 1000, 1, torch.bfloat16, "zeros", "contiguous"),
    (200, 1000, 8, torch.float16, "rand", "transposed3d"),
    (200, 4099, 16, torch.float32, "zeros", "padded"),
    (130, 4099, 4, torch.bfloat16, "rand", "padded"),
    (200, 4099, 33, torch.bfloat16, "rand", "transposed3d"),
    (200, 1000, 64, torch.float32, "rand", "transposed3d"),
    (200, 1000, 64, torch.float16, "zeros", "contiguous"),
    (1100, 136, 3, torch.bfloat16, "rand", "contiguous"),  # 18 backward tiles > 16 blocks
    (96, 7, 5, torch.float16, None, "contiguous"),
]


@pytest.mark.parametrize("n,d,k,dtype,weight_kind,layout", EMU_GRID)
@pytest.mark.parametrize("gram_coef", [0.0, 0.7])
def test_emulated_kernels_match_float64_reference(emu, n, d, k, dtype, weight_kind, layout, gram_coef):
    hidden, basis, anchors, weight = make_inputs(n, d, k, dtype, "cpu", weight_kind, layout)
    ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.3, gram_coef)
    loss, grad = _loss_and_grad(hidden, basis, anchors, weight, 1.3, gram_coef, grad_scale=0.37)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, ref_loss) <= LOSS_TOL[dtype]
    assert grad.shape == hidden.shape and grad.dtype == dtype
    assert rel_err(grad, 0.37 * ref_grad.reshape(hidden.shape)) <= GRAD_TOL[dtype]

    b, _, _ = _prepared(hidden, basis, anchors, weight)
    coords = penalty.project_op(hidden, b, "cuda")
    assert rel_err(coords, reference.project(hidden.double(), basis.double()).reshape(-1, k)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_all_zero_weights_give_zero(emu, dtype):
    hidden, basis, anchors, weight = make_inputs(64, 300, 4, dtype, "cpu", "allzero")
    loss, grad = _loss_and_grad(hidden, basis, anchors, weight, 1.0, 0.5, grad_scale=2.0)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("k", [1, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_emulated_step0_is_exactly_zero_and_z_bitwise(emu, k, dtype):
    hidden, basis, _, weight = make_inputs(160, 515, k, dtype, "cpu", "zeros", "transposed3d")
    b = basis.float().contiguous()
    anchors = penalty.project_op(hidden, b, "cuda")  # (N, k): what project() hands out
    coords, loss, state = penalty.loss_forward_op(hidden, b, anchors, weight.reshape(-1), 1.0, 0.9, "cuda")
    assert torch.equal(coords, anchors)
    assert loss.item() == 0.0 and torch.count_nonzero(state[2:]) == 0
    h = hidden.detach().requires_grad_(True)
    grad_out = torch.randn(h.shape).to(dtype)
    out, loss = penalty.GuardFunction.apply(h, b, anchors, weight.reshape(-1), 1.0, 0.9, "cuda")
    gh = torch.autograd.grad((out, loss), h, grad_outputs=(grad_out, torch.tensor(3.0)))[0]
    assert torch.equal(gh, grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_emulated_guard_fused_backward(emu, dtype):
    hidden, basis, anchors, weight = make_inputs(120, 777, 6, dtype, "cpu", "zeros", "transposed3d")
    b, a, w = _prepared(hidden, basis, anchors, weight)
    s = 0.61
    _, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.0, 0.25)
    g = torch.Generator().manual_seed(5)
    scale = ref_grad.norm() / math.sqrt(ref_grad.numel())
    # Non-contiguous incoming gradient, on the same scale as s * dL/dH.
    grad_out = (torch.randn(4, 30, 777, generator=g, dtype=torch.float64) * scale).to(dtype).transpose(0, 1)
    h = hidden.detach().requires_grad_(True)
    out, loss = penalty.GuardFunction.apply(h, b, a, w, 1.0, 0.25, "cuda")
    assert torch.equal(out, hidden)
    gh = torch.autograd.grad((out, loss), h, grad_outputs=(grad_out, torch.tensor(s)))[0]
    expected = grad_out.double() + s * ref_grad.reshape(hidden.shape)
    assert rel_err(gh, expected) <= GRAD_TOL[dtype]
    # grad_loss None (loss unused): the incoming gradient passes through unchanged.
    out, loss = penalty.GuardFunction.apply(h, b, a, w, 1.0, 0.25, "cuda")
    assert torch.equal(torch.autograd.grad(out, h, grad_outputs=grad_out)[0], grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_project_backward(emu, dtype):
    hidden, basis, _, _ = make_inputs(130, 1001, 12, dtype, "cpu", None)
    b = basis.float().contiguous()
    h = hidden.detach().requires_grad_(True)
    coords = penalty.project_op(h, b, "cuda")
    gz = torch.randn(coords.shape, dtype=torch.float32)
    (gh,) = torch.autograd.grad(coords, h, grad_outputs=gz)
    assert gh.dtype == dtype
    assert rel_err(gh, gz.double() @ basis.double().T) <= GRAD_TOL[dtype]


def test_emulated_runs_are_bitwise_identical(emu, emu_dll):
    """256 host threads per block, scheduled differently each run: equal bits mean no races."""
    hidden, basis, anchors, weight = make_inputs(300, 1000, 33, torch.bfloat16, "cpu", "zeros", "transposed3d")
    results = []
    for _ in range(3):
        loss, grad = _loss_and_grad(hidden, basis, anchors, weight, 1.0, 0.5, grad_scale=1.7)
        results.append((loss, grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_emulated_z_does_not_depend_on_grid_or_load_path(emu, emu_dll):
    """Z is one FMA chain per (row, coordinate): the same bits for any number of blocks and
    whether hidden is read with 16-byte vectors or element by element."""
    n, d = 130, 1000
    hidden = torch.randn(n, d + 8).to(torch.bfloat16)[:, :d]  # rows 16-byte aligned: vector loads
    buffer = torch.empty(n * d + 1, dtype=torch.bfloat16)
    misaligned = buffer[1:].view(n, d)  # data pointer 2 bytes past alignment: element loads
    misaligned.copy_(hidden)
    basis = rk.orthonormalize_basis(torch.randn(d, 9, dtype=torch.float64))
    z = penalty.project_op(hidden, basis, "cuda")
    assert torch.equal(z, penalty.project_op(misaligned, basis, "cuda"))
    assert torch.equal(z, penalty.project_op(hidden.contiguous(), basis, "cuda"))
    emu_dll.rg_set_sm_count(3)
    assert torch.equal(z, penalty.project_op(hidden, basis, "cuda"))


def test_emulated_vector_path_with_a_ragged_row_end(emu):
    """Rows 16-byte aligned but d = 1001: the last vector of each row straddles d; the
    padding is NaN, so a read past the row end would show."""
    d = 1001
    for dtype in (torch.float32, torch.bfloat16):
        hidden, basis, anchors, _ = make_inputs(70, d, 5, dtype, "cpu", None, "padded")
        ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, None, 1.0, 0.3)
        loss, grad = _loss_and_grad(hidden, basis, anchors, None, 1.0, 0.3, grad_scale=1.0)
        assert rel_err(loss, ref_loss) <= LOSS_TOL[dtype]
        assert rel_err(grad, ref_grad) <= GRAD_TOL[dtype]


@pytest.mark.slow
def test_emulated_kernels_stay_in_bounds(tmp_path):
    """AddressSanitizer over the emulated kernels on exactly-sized buffers: no read or write
    outside any input, output or workspace (tails, padded rows, 3-D layouts, every dtype)."""
    why = emulated_cuda.unavailable_reason()
    if why:
        pytest.skip(why)
    exe = tmp_path / "bounds_check"
    cmd = [
        os.environ.get("CXX", "g++"),
        "-std=c++20",
        "-O1",
        "-g",
        "-pthread",
        "-ffp-contract=off",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-unknown-pragmas",
        f"-I{emulated_cuda.CSRC}",
        f"-I{emulated_cuda.HERE}",
        "-isystem",
        str(emulated_cuda.cuda_include_dir()),
        "-o",
        str(exe),
        str(emulated_cuda.HERE / "bounds_check.cpp"),
    ]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if build.returncode != 0 and "sanitize" in build.stderr and "cannot find" in build.stderr:
        pytest.skip("the host compiler has no sanitizer runtime")
    assert build.returncode == 0, build.stderr
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0"}
    env.pop("LD_PRELOAD", None)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0 and "bounds check: ok" in run.stdout, run.stdout + run.stderr[-4000:]


def test_emulated_compile_traces_the_ops(emu):
    hidden, basis, anchors, weight = make_inputs(64, 256, 4, torch.float32, "cpu", "rand")
    b, a, w = _prepared(hidden, basis, anchors, weight)

    def fn(h):
        out, loss = penalty.GuardFunction.apply(h, b, a, w, 1.0, 0.5, "cuda")
        return out.sum() * 0 + loss

    h = hidden.clone().requires_grad_(True)
    eager = fn(h)
    (g_eager,) = torch.autograd.grad(eager, h)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(h)  # traces the ops' fake impls
    (g_comp,) = torch.autograd.grad(compiled, h)
    assert torch.equal(eager.detach(), compiled.detach()) and torch.equal(g_eager, g_comp)


# ================================================================== GPU: the built extension

gpu = pytest.mark.gpu
GPU_GRID_N = [1, 256, 1000]
GPU_GRID_D = [1000, 4099]
GPU_GRID_K = [1, 3, 8, 16, 33, 64]
GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def cuda_backend():
    """On a GPU machine the extension must be usable: installed, or built here just in time."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if cuda_penalty.load_error() is not None:
        try:
            cuda_penalty.build_jit()
        except RuntimeError as exc:
            pytest.fail(f"the CUDA extension is not available on this GPU machine: {exc}")
    return "cuda"


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(cuda_penalty, "_poison_outputs", True)


def _gpu_loss_and_grad(hidden, basis, anchors, weight, drift_coef, gram_coef, grad_scale):
    h = hidden.detach().requires_grad_(True)
    loss = rk.geometry_loss(h, basis, anchors, weight, drift_coef=drift_coef, gram_coef=gram_coef, backend="cuda")
    (grad,) = torch.autograd.grad(loss, h, grad_outputs=torch.tensor(grad_scale, device=h.device))
    return loss.detach(), grad


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("k", GPU_GRID_K)
@pytest.mark.parametrize("d", GPU_GRID_D)
@pytest.mark.parametrize("n", GPU_GRID_N)
def test_gpu_matches_float64_reference(cuda_backend, poisoned, n, d, k, dtype):
    weight_kind = ["rand", "zeros", None][(n + k) % 3]
    layout = "transposed3d" if n % 4 == 0 and k % 2 == 1 else "contiguous"
    hidden, basis, anchors, weight = make_inputs(n, d, k, dtype, "cuda", weight_kind, layout)
    for gram_coef in (0.0, 0.7):
        ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.3, gram_coef)
        grad_scale = 0.37
        if dtype == torch.float16:
            # fp16 training runs with a (dynamic) loss scale: without one, gradients of large N
            # land in fp16's subnormals, where even the correctly rounded float64 answer is
            # 1e-3 to 2e-3 off (measured). Scale them into the normal range, as GradScaler does.
            grad_scale *= 2.0 ** math.floor(math.log2(1024.0 / max(0.37 * ref_grad.abs().max().item(), 1e-30)))
        loss, grad = _gpu_loss_and_grad(hidden, basis, anchors, weight, 1.3, gram_coef, grad_scale=grad_scale)
        assert rel_err(loss, ref_loss) <= LOSS_TOL[dtype], (gram_coef, loss.item(), ref_loss.item())
        assert grad.dtype == dtype and grad.shape == hidden.shape
        assert rel_err(grad, grad_scale * ref_grad.reshape(hidden.shape)) <= GRAD_TOL[dtype], gram_coef
    coords = rk.project(hidden, basis, backend="cuda")
    assert coords.shape == hidden.shape[:-1] + (k,)
    assert rel_err(coords, reference.project(hidden.double().cpu(), basis.double().cpu())) <= 1e-5


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_all_zero_weights(cuda_backend, poisoned, dtype):
    hidden, basis, anchors, weight = make_inputs(256, 1000, 8, dtype, "cuda", "allzero")
    loss, grad = _gpu_loss_and_grad(hidden, basis, anchors, weight, 1.0, 0.5, grad_scale=2.0)
    assert loss.item() == 0.0 and torch.count_nonzero(grad).item() == 0


@gpu
@pytest.mark.parametrize("k", [1, 16, 33, 64])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_step0_exact_zero_and_bitwise_z(cuda_backend, poisoned, k, dtype):
    hidden, basis, _, weight = make_inputs(1000, 4099, k, dtype, "cuda", "zeros", "transposed3d")
    anchors = rk.project(hidden, basis, backend="cuda")
    b, a, w = _prepared(hidden, basis, anchors, weight)
    coords, loss, _ = penalty.loss_forward_op(hidden, b, a, w, 1.0, 0.9, "cuda")
    assert torch.equal(coords, a)
    assert loss.item() == 0.0
    h = hidden.detach().requires_grad_(True)
    grad_out = torch.randn(h.shape, device="cuda").to(dtype)
    out, loss = rk.guard(h, basis, anchors, weight, gram_coef=0.9, backend="cuda")
    assert loss.item() == 0.0
    gh = torch.autograd.grad((out, loss), h, grad_outputs=(grad_out, torch.tensor(3.0, device="cuda")))[0]
    assert torch.equal(gh, grad_out)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_guard_fused_backward(cuda_backend, poisoned, dtype):
    hidden, basis, anchors, weight = make_inputs(1000, 4099, 16, dtype, "cuda", "zeros", "transposed3d")
    s = 0.61
    _, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.0, 0.25)
    scale = ref_grad.norm() / math.sqrt(ref_grad.numel())
    g = torch.Generator().manual_seed(5)
    grad_out = (torch.randn(4, 250, 4099, generator=g, dtype=torch.float64) * scale).to(dtype).cuda().transpose(0, 1)
    h = hidden.detach().requires_grad_(True)
    out, loss = rk.guard(h, basis, anchors, weight, gram_coef=0.25, backend="cuda")
    gh = torch.autograd.grad((out, loss), h, grad_outputs=(grad_out, torch.tensor(s, device="cuda")))[0]
    expected = grad_out.double().cpu() + s * ref_grad.reshape(hidden.shape)
    assert rel_err(gh, expected) <= GRAD_TOL[dtype]


@gpu
def test_gpu_runs_are_bitwise_identical(cuda_backend):
    hidden, basis, anchors, weight = make_inputs(4096, 4099, 33, torch.bfloat16, "cuda", "zeros", "transposed3d")
    first = _gpu_loss_and_grad(hidden, basis, anchors, weight, 1.0, 0.5, grad_scale=1.7)
    for _ in range(3):
        again = _gpu_loss_and_grad(hidden, basis, anchors, weight, 1.0, 0.5, grad_scale=1.7)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("k", [3, 16, 64])
def test_gpu_cuda_agrees_with_triton(cuda_backend, k, dtype):
    if "triton" not in rk.available_backends():
        pytest.skip("triton backend unavailable")
    hidden, basis, anchors, weight = make_inputs(1000, 4099, k, dtype, "cuda", "zeros")
    results = {}
    for backend in ("cuda", "triton"):
        h = hidden.detach().requires_grad_(True)
        loss = rk.geometry_loss(h, basis, anchors, weight, gram_coef=0.5, backend=backend)
        (grad,) = torch.autograd.grad(loss, h)
        coords = rk.project(hidden, basis, backend=backend)
        results[backend] = (loss.detach(), grad, coords)
    (lc, gc, zc), (lt, gt, zt) = results["cuda"], results["triton"]
    assert rel_err(lc, lt) <= 2 * LOSS_TOL[dtype]
    assert rel_err(gc, gt) <= 2 * GRAD_TOL[dtype]
    assert rel_err(zc, zt) <= 1e-4


@gpu
def test_gpu_compile_traces_cuda_backend(cuda_backend):
    hidden, basis, anchors, weight = make_inputs(256, 1000, 8, torch.bfloat16, "cuda", "rand")

    def fn(h):
        out, loss = rk.guard(h, basis, anchors, weight, gram_coef=0.5, backend="cuda", validate=False)
        return out.float().square().mean() + loss

    h = hidden.detach().requires_grad_(True)
    eager = fn(h)
    (g_eager,) = torch.autograd.grad(eager, h)
    out = torch.compile(fn)(h)
    (g_comp,) = torch.autograd.grad(out, h)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_comp.float(), g_eager.float(), rtol=2e-2, atol=1e-4)


@gpu
@pytest.mark.slow
def test_gpu_more_than_2_pow_31_elements(cuda_backend):
    """N * d > 2^31: 64-bit offsets in both passes (about 9 GB of GPU memory)."""
    n, d, k = 2**20 + 3, 2112, 8
    assert n * d > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=g, dtype=torch.bfloat16)
    basis = rk.orthonormalize_basis(torch.randn(d, k, dtype=torch.float64)).cuda()
    b64 = basis.double()
    z64 = torch.cat([hidden[i : i + 65536].double() @ b64 for i in range(0, n, 65536)])
    anchors = (z64 + 0.5 * torch.randn(z64.shape, device="cuda", dtype=torch.float64)).float()
    weight = torch.rand(n, device="cuda", generator=g)
    h = hidden.requires_grad_(True)
    loss = rk.geometry_loss(h, basis, anchors, weight, gram_coef=0.5, backend="cuda", validate=False)
    (grad,) = torch.autograd.grad(loss, h)
    ref_loss = reference.geometry_loss(
        z64,
        torch.eye(k, dtype=torch.float64, device="cuda"),
        anchors.double(),
        weight.double(),
        drift_coef=1.0,
        gram_coef=0.5,
    )
    assert rel_err(loss, ref_loss) <= LOSS_TOL[torch.bfloat16]
    dz = reference.loss_grad_coords(z64, anchors.double(), weight.double(), drift_coef=1.0, gram_coef=0.5)
    for rows in (slice(0, 4096), slice(n - 4096, n)):  # the tail lies past element 2^31
        assert rel_err(grad[rows], dz[rows] @ b64.T) <= GRAD_TOL[torch.bfloat16]
    coords = rk.project(hidden.detach(), basis, backend="cuda", validate=False)
    assert rel_err(coords[-4096:], z64[-4096:]) <= 1e-5
