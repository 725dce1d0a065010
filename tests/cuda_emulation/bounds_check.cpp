// Runs the emulated csrc kernels on exactly-sized heap buffers, for -fsanitize=address:
// any read or write outside hidden, grad_in, B^T, anchors, weights, Z, state, partials or
// grad_out aborts with a report.  Values are checked by the Python tests; this checks bounds.
//
//   g++ -std=c++20 -O1 -g -pthread -ffp-contract=off -fsanitize=address,undefined
//       -Icsrc -Itests/cuda_emulation -isystem $CUDA_HOME/include tests/cuda_emulation/bounds_check.cpp
//   ./a.out          # a quick set of shapes (the test suite runs this)
//   ./a.out full     # more shapes (a few minutes)
#define REFUSALGUARD_HOST_EMULATION 1
#include "cuda_host_emulation.h"

#include "refusalguard_penalty.cu"

#include <array>
#include <cstdio>
#include <string>
#include <vector>
#include <memory>
#include <random>

using namespace refusalguard;

template <typename T>
std::unique_ptr<T[]> filled(int64_t n, std::mt19937& rng) {
  std::unique_ptr<T[]> p(new T[n]);
  std::normal_distribution<float> dist;
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(dist(rng));
  return p;
}

template <typename T>
int run_case(int64_t rows, int64_t d, int k, int layout, bool gram, bool weighted, std::mt19937& rng) {
  // layout 0: contiguous (N, d); 1: rows `pad` elements apart; 2: transposed 3-D (rows/4, 4, d) of a (4, rows/4, d)
  const int64_t pad = layout == 1 ? 8 : 0;
  const int64_t stride = d + pad;
  const int64_t elems = rows * stride - pad;  // ends exactly at the last element of the last row
  RowLayout lay;
  lay.stride_col = 1;
  if (layout == 2) {
    lay.n1 = 4;
    lay.stride0 = d;
    lay.stride1 = (rows / 4) * d;
  } else {
    lay.n1 = 1;
    lay.stride0 = stride;
  }
  auto hidden = filled<T>(elems, rng);
  auto grad_in = filled<T>(elems, rng);
  lay.data = hidden.get();
  auto basis_t = filled<float>(static_cast<int64_t>(k) * d, rng);
  auto anchors = filled<float>(rows * k, rng);
  std::unique_ptr<float[]> weight(new float[rows]);
  for (int64_t i = 0; i < rows; ++i) weight[i] = static_cast<float>(i % 3);
  std::unique_ptr<float[]> coords(new float[rows * k]);
  const int blocks = forward_num_blocks(rows, k);
  const int width = part_width(k, gram);
  std::unique_ptr<float[]> partials(new float[static_cast<int64_t>(blocks) * width]);
  std::unique_ptr<float[]> sums(new float[width]), state(new float[width]);
  std::unique_ptr<float> loss(new float), grad_loss(new float(0.5f));
  Dtype dtype = sizeof(T) == 4 ? Dtype::kFloat32 : (std::is_same_v<T, __half> ? Dtype::kFloat16 : Dtype::kBFloat16);

  ForwardArgs f;
  f.hidden = lay;
  f.dtype = dtype;
  f.rows = rows;
  f.d = d;
  f.k = k;
  f.basis_t = basis_t.get();
  f.coords = coords.get();
  f.num_blocks = blocks;
  f.anchors = anchors.get();
  f.weight = weighted ? weight.get() : nullptr;
  f.gram_coef = gram ? 0.5f : 0.0f;
  f.gram = gram;
  f.partials = partials.get();
  f.sums = sums.get();
  f.loss = loss.get();
  f.state = state.get();
  if (launch_project(f, nullptr) != cudaSuccess || launch_loss_forward(f, nullptr) != cudaSuccess) return 1;

  std::unique_ptr<T[]> out(new T[rows * d]);
  BackwardArgs b;
  b.grad_in = lay;
  b.grad_in.data = grad_in.get();
  b.dtype = dtype;
  b.grad_out = out.get();
  b.rows = rows;
  b.d = d;
  b.k = k;
  b.basis_t = basis_t.get();
  b.coords = coords.get();
  b.anchors = anchors.get();
  b.weight = f.weight;
  b.state = state.get();
  b.grad_loss = grad_loss.get();
  b.gram = gram;
  if (launch_backward(b, nullptr) != cudaSuccess) return 1;
  b.dz_given = true;
  b.grad_in.data = nullptr;
  if (launch_backward(b, nullptr) != cudaSuccess) return 1;
  return 0;
}

int main(int argc, char** argv) {
  const bool full = argc > 1 && std::string(argv[1]) == "full";
  std::mt19937 rng(0);
  refusalguard_emulation::sm_count = 1;
  int failures = 0;
  const std::vector<std::array<int64_t, 2>> shapes =
      full ? std::vector<std::array<int64_t, 2>>{{1, 7}, {4, 1001}, {132, 257}, {72, 4099}}
           : std::vector<std::array<int64_t, 2>>{{1, 7}, {132, 201}};
  const std::vector<int> ks = full ? std::vector<int>{1, 9, 40, 64} : std::vector<int>{3, 40};
  for (const auto& s : shapes) {
    for (int k : ks) {
      if (k > s[1]) continue;
      for (int layout = 0; layout < 3; ++layout) {
        if (layout == 2 && s[0] % 4 != 0) continue;
        const bool gram = (k + layout) % 2 == 0;
        failures += run_case<float>(s[0], s[1], k, layout, gram, layout != 1, rng);
        failures += run_case<__nv_bfloat16>(s[0], s[1], k, layout, !gram, layout == 1, rng);
        failures += run_case<__half>(s[0], s[1], k, layout, gram, true, rng);
      }
    }
  }
  std::printf("bounds check: %s\n", failures == 0 ? "ok" : "launch errors");
  return failures == 0 ? 0 : 1;
}
