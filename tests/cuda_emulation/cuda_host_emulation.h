// Runs csrc/refusalguard_penalty.cu's kernels on CPU threads, for machines without a GPU.
//
// Each CUDA block runs as blockDim.x std::threads sharing one std::barrier
// (__syncthreads) and the kernel's function-static __shared__ arrays; blocks run one
// after another.  Float arithmetic is the kernels' own: fmaf is a fused multiply-add
// on the host too, and the harness is built with -ffp-contract=off so no other product
// is fused.  This checks indexing, masking, tails, barriers and reduction order -- not
// timing, occupancy or memory coalescing, which only a GPU run can show.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <thread>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace refusalguard_emulation {

inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline thread_local dim3 grid_dim;
inline thread_local dim3 block_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline int sm_count = 1;
inline long launches = 0;

template <typename... Params, typename... Args>
void run(void (*kernel)(Params...), dim3 grid, dim3 block, const Args&... args) {
  ++launches;
  const unsigned threads = block.x;  // the kernels are 1-D
  for (unsigned b = 0; b < grid.x; ++b) {
    std::barrier<> barrier(threads);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t, b] {
        thread_idx = dim3(t);
        block_idx = dim3(b);
        grid_dim = grid;
        block_dim = block;
        block_barrier = &barrier;
        kernel(args...);
      });
    }
    for (auto& th : pool) th.join();
  }
}

inline cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t device_attribute(int* value, cudaDeviceAttr, int) {
  *value = sm_count;
  return cudaSuccess;
}

inline float ldg(const float* p) { return *p; }

inline cudaError_t last_error() { return cudaSuccess; }

}  // namespace refusalguard_emulation

#define threadIdx (refusalguard_emulation::thread_idx)
#define blockIdx (refusalguard_emulation::block_idx)
#define gridDim (refusalguard_emulation::grid_dim)
#define blockDim (refusalguard_emulation::block_dim)
#define __syncthreads() (refusalguard_emulation::block_barrier->arrive_and_wait())
#define __fmul_rn(a, b) (static_cast<float>(a) * static_cast<float>(b))
#define __fadd_rn(a, b) (static_cast<float>(a) + static_cast<float>(b))
#define __fsub_rn(a, b) (static_cast<float>(a) - static_cast<float>(b))
#define __ldg(p) refusalguard_emulation::ldg(p)
#define cudaGetDevice(p) refusalguard_emulation::get_device(p)
#define cudaDeviceGetAttribute(v, a, d) refusalguard_emulation::device_attribute(v, a, d)
#define cudaGetLastError() refusalguard_emulation::last_error()
