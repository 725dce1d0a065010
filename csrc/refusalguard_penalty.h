// Plain-CUDA launchers for the refusal-subspace penalty (no torch headers).
//
// Contract (see refusalguard_kernels/reference.py): H is N x d (fp32, fp16 or bf16,
// any row layout below), B is d x k (fp32, passed transposed as B^T, k x d
// contiguous), A is N x k fp32, w is N fp32 or null (all ones).
//
//   Z = H B (fp32 FMA accumulation)        W = sum_t w_t
//   L = drift_coef / W * sum_t w_t ||Z_t - A_t||^2 + gram_coef * ||(1/W) sum_t w_t (Z_t Z_t^T - A_t A_t^T)||_F^2
//   dL/dZ_t = w_t (c1 (Z_t - A_t) + c2 (G - G_A) Z_t),  c1 = 2 drift_coef / W,  c2 = 4 gram_coef / W
//   dL/dH   = dL/dZ B^T                    (W == 0: loss 0, every gradient 0)
//
// Every launcher is asynchronous on the given stream, reads nothing back to the host
// and returns the launch status.  Results are bitwise reproducible run to run: no
// atomics, every sum in a fixed order that depends only on (N, d, k, dtype, device).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace refusalguard {

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxK = 64;

// N rows of a (..., d) tensor read in place: row r starts at element
// (r / n1) * stride0 + (r % n1) * stride1 of `data`; columns are stride_col apart.
// A 2-D view is n1 = 1 (stride1 unused); a transposed 3-D activation uses all three.
struct RowLayout {
  const void* data = nullptr;
  int64_t n1 = 1;
  int64_t stride0 = 0;
  int64_t stride1 = 0;
  int64_t stride_col = 1;
};

struct ForwardArgs {
  RowLayout hidden;
  Dtype dtype = Dtype::kFloat32;
  int64_t rows = 0;                // N >= 1
  int64_t d = 0;                   // >= 1
  int k = 0;                       // 1..kMaxK
  const float* basis_t = nullptr;  // (k, d) contiguous: B^T
  float* coords = nullptr;         // out (N, k)
  int num_blocks = 0;              // forward_num_blocks(N, k)
  // Loss only (ignored by launch_project):
  const float* anchors = nullptr;  // (N, k) contiguous
  const float* weight = nullptr;   // (N,) contiguous, or nullptr for all ones
  float drift_coef = 1.0f;
  float gram_coef = 0.0f;
  bool gram = false;               // gram term on (gram_coef != 0): partials and state carry k x k more
  float* partials = nullptr;       // workspace (num_blocks, part_width(k, gram))
  float* sums = nullptr;           // workspace (part_width)
  float* loss = nullptr;           // out ()
  float* state = nullptr;          // out (part_width): [2 drift_coef / W, 4 gram_coef / W, (G - G_A) k x k]
};

struct BackwardArgs {
  RowLayout grad_in;               // grad_in.data == nullptr: no incoming gradient
  Dtype dtype = Dtype::kFloat32;   // of grad_in and grad_out
  void* grad_out = nullptr;        // out (N, d) contiguous
  int64_t rows = 0;
  int64_t d = 0;
  int k = 0;
  const float* basis_t = nullptr;  // (k, d) contiguous
  // dz_given: coords holds dL/dZ itself (project's backward); grad_out = grad_in + dZ B^T.
  // Otherwise coords is the saved Z and grad_out = grad_in + s * dL/dZ B^T with s = *grad_loss.
  bool dz_given = false;
  const float* coords = nullptr;     // (N, k)
  const float* anchors = nullptr;    // (N, k)            (loss only)
  const float* weight = nullptr;     // (N,) or nullptr   (loss only)
  const float* state = nullptr;      // forward's state   (loss only)
  const float* grad_loss = nullptr;  // one fp32 on the device (loss only)
  bool gram = false;                 // state carries the k x k block
};

// Number of row-blocks the forward runs (and rows of the partials workspace);
// depends only on N and the current device, so reductions are reproducible.
int forward_num_blocks(int64_t rows, int k);
int part_width(int k, bool gram);

cudaError_t launch_project(const ForwardArgs& args, cudaStream_t stream);
cudaError_t launch_loss_forward(const ForwardArgs& args, cudaStream_t stream);
cudaError_t launch_backward(const BackwardArgs& args, cudaStream_t stream);

}  // namespace refusalguard
