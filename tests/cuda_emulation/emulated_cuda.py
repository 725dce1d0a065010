"""The csrc/ kernels compiled for the CPU (cuda_host_emulation.h) behind the same
launcher functions as refusalguard_kernels.ops.cuda_penalty.

Each launcher does what csrc/bindings.cpp does -- B^T, output allocation (always
NaN-poisoned here, so an element a kernel forgets to write shows up), the row layout
of hidden / grad_in -- and calls the emulated launch_* functions through ctypes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from refusalguard_kernels.ops.layout import row_layout

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HERE = Path(__file__).resolve().parent
SOURCES = [
    CSRC / "refusalguard_penalty.cu",
    CSRC / "refusalguard_penalty.h",
    HERE / "cuda_host_emulation.h",
    HERE / "emulation_harness.cpp",
]
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_i64, _int, _flt, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p


def cuda_include_dir() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_bf16.h").is_file():
            return Path(c) / "include"
    return None


def unavailable_reason() -> str | None:
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no host C++ compiler (g++)"
    if cuda_include_dir() is None:
        return "no CUDA toolkit headers (cuda_bf16.h) found"
    return None


def build(out_dir: Path | None = None) -> ctypes.CDLL:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    out_dir = Path(out_dir or tempfile.gettempdir()) / "refusalguard_cuda_emulation"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"emulated_{digest}.so"
    if not lib.exists():
        tmp = out_dir / f".{lib.name}.{os.getpid()}.tmp"
        cmd = [
            os.environ.get("CXX", "g++"),
            "-std=c++20",
            "-O1",
            "-shared",
            "-fPIC",
            "-pthread",
            "-ffp-contract=off",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wno-unknown-pragmas",
            f"-I{CSRC}",
            f"-I{HERE}",
            "-isystem",
            str(cuda_include_dir()),
            "-o",
            str(tmp),
            str(HERE / "emulation_harness.cpp"),
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    dll.rg_forward.argtypes = [
        _int,
        _ptr,
        _int,
        _i64,
        _i64,
        _int,
        _i64,
        _i64,
        _i64,
        _i64,
        _ptr,
        _ptr,
        _int,
        _ptr,
        _ptr,
        _flt,
        _flt,
        _int,
        _ptr,
        _ptr,
        _ptr,
        _ptr,
    ]
    dll.rg_backward.argtypes = [
        _ptr,
        _i64,
        _i64,
        _i64,
        _i64,
        _int,
        _ptr,
        _i64,
        _i64,
        _int,
        _ptr,
        _int,
        _ptr,
        _ptr,
        _ptr,
        _ptr,
        _ptr,
        _int,
    ]
    dll.rg_forward_num_blocks.argtypes = [_i64, _int]
    dll.rg_part_width.argtypes = [_int, _int]
    dll.rg_set_sm_count.argtypes = [_int]
    dll.rg_launches.restype = ctypes.c_long
    return dll


class EmulatedCuda:
    """Launchers with cuda_penalty's signatures over the CPU-emulated kernels."""

    def __init__(self, dll: ctypes.CDLL):
        self.dll = dll

    @staticmethod
    def _rows(t: torch.Tensor):
        # What bindings.cpp's rows_of reads from the tensor row_layout hands over.
        t = row_layout(t).tensor
        if t.dim() == 2:
            return t, t.shape[0], 1, t.stride(0), 0, t.stride(1)
        return t, t.shape[0] * t.shape[1], t.shape[1], t.stride(0), t.stride(1), t.stride(2)

    @staticmethod
    def _nan(shape, dtype=torch.float32):
        return torch.full(shape, float("nan"), dtype=dtype)

    def _forward(self, hidden, basis, anchors, weight, drift_coef, gram_coef, loss: bool):
        t, rows, n1, s0, s1, sd = self._rows(hidden)
        d, k = basis.shape
        basis_t = basis.t().contiguous()
        coords = self._nan((rows, k))
        blocks = self.dll.rg_forward_num_blocks(rows, k)
        gram = loss and gram_coef != 0.0
        width = self.dll.rg_part_width(k, int(gram))
        partials, sums = self._nan((blocks, width)), self._nan((width,))
        loss_out, state = self._nan(()), self._nan((width,))
        err = self.dll.rg_forward(
            int(loss),
            t.data_ptr(),
            DTYPES[hidden.dtype],
            rows,
            d,
            k,
            n1,
            s0,
            s1,
            sd,
            basis_t.data_ptr(),
            coords.data_ptr(),
            blocks,
            anchors.data_ptr() if loss else None,
            weight.data_ptr() if (loss and weight is not None) else None,
            float(drift_coef),
            float(gram_coef),
            int(gram),
            partials.data_ptr(),
            sums.data_ptr(),
            loss_out.data_ptr(),
            state.data_ptr(),
        )
        assert err == 0, f"emulated forward returned cudaError {err}"
        return coords, loss_out, state

    def project(self, hidden, basis):
        return self._forward(hidden, basis, None, None, 0.0, 0.0, loss=False)[0]

    def loss_forward(self, hidden, basis, anchors, weight, drift_coef, gram_coef):
        return self._forward(hidden, basis, anchors, weight, drift_coef, gram_coef, loss=True)

    def _backward(
        self, grad_in, coords, anchors, weight, state, grad_loss, basis, hidden_shape, hidden_dtype, dz_given
    ):
        rows, k = coords.shape
        d = hidden_shape[-1]
        basis_t = basis.t().contiguous()
        out = self._nan(tuple(hidden_shape), hidden_dtype)
        if grad_in is not None:
            if grad_in.dtype != hidden_dtype:
                grad_in = grad_in.to(hidden_dtype)
            gin, g_rows, n1, s0, s1, sd = self._rows(grad_in)
            assert g_rows == rows
            gin_ptr = gin.data_ptr()
        else:
            gin_ptr, n1, s0, s1, sd = None, 1, 0, 0, 1
        gl = None if grad_loss is None else grad_loss.to(torch.float32).contiguous()
        err = self.dll.rg_backward(
            gin_ptr,
            n1,
            s0,
            s1,
            sd,
            DTYPES[hidden_dtype],
            out.data_ptr(),
            rows,
            d,
            k,
            basis_t.data_ptr(),
            int(dz_given),
            coords.data_ptr(),
            None if anchors is None else anchors.data_ptr(),
            None if weight is None else weight.data_ptr(),
            None if state is None else state.data_ptr(),
            None if gl is None else gl.data_ptr(),
            int(state is not None and state.numel() == 2 + k * k),
        )
        assert err == 0, f"emulated backward returned cudaError {err}"
        return out

    def loss_backward(
        self, grad_in, grad_loss, coords, anchors, weight, state, basis, hidden_shape, hidden_dtype, gram_coef
    ):
        return self._backward(
            grad_in, coords, anchors, weight, state, grad_loss, basis, hidden_shape, hidden_dtype, dz_given=False
        )

    def project_backward(self, grad_coords, basis, hidden_shape, hidden_dtype):
        return self._backward(
            None, grad_coords, None, None, None, None, basis, hidden_shape, hidden_dtype, dz_given=True
        )
