// C entry points over the CPU-emulated csrc kernels (see cuda_host_emulation.h), for
// ctypes.  They mirror csrc/bindings.cpp minus torch: the caller allocates and lays out.
#define REFUSALGUARD_HOST_EMULATION 1
#include "cuda_host_emulation.h"

#include "refusalguard_penalty.cu"

using refusalguard::BackwardArgs;
using refusalguard::Dtype;
using refusalguard::ForwardArgs;
using refusalguard::RowLayout;

namespace {
RowLayout layout(const void* data, int64_t n1, int64_t s0, int64_t s1, int64_t sd) {
  RowLayout l;
  l.data = data;
  l.n1 = n1;
  l.stride0 = s0;
  l.stride1 = s1;
  l.stride_col = sd;
  return l;
}
}  // namespace

extern "C" {

void rg_set_sm_count(int n) { refusalguard_emulation::sm_count = n; }
long rg_launches() { return refusalguard_emulation::launches; }
int rg_forward_num_blocks(int64_t rows, int k) { return refusalguard::forward_num_blocks(rows, k); }
int rg_part_width(int k, int gram) { return refusalguard::part_width(k, gram != 0); }

int rg_forward(int loss, const void* hidden, int dtype, int64_t rows, int64_t d, int k, int64_t n1, int64_t s0,
               int64_t s1, int64_t sd, const float* basis_t, float* coords, int num_blocks, const float* anchors,
               const float* weight, float drift_coef, float gram_coef, int gram, float* partials, float* sums,
               float* loss_out, float* state) {
  ForwardArgs a;
  a.hidden = layout(hidden, n1, s0, s1, sd);
  a.dtype = static_cast<Dtype>(dtype);
  a.rows = rows;
  a.d = d;
  a.k = k;
  a.basis_t = basis_t;
  a.coords = coords;
  a.num_blocks = num_blocks;
  a.anchors = anchors;
  a.weight = weight;
  a.drift_coef = drift_coef;
  a.gram_coef = gram_coef;
  a.gram = gram != 0;
  a.partials = partials;
  a.sums = sums;
  a.loss = loss_out;
  a.state = state;
  return static_cast<int>(loss ? refusalguard::launch_loss_forward(a, nullptr) : refusalguard::launch_project(a, nullptr));
}

int rg_backward(const void* grad_in, int64_t n1, int64_t s0, int64_t s1, int64_t sd, int dtype, void* grad_out,
                int64_t rows, int64_t d, int k, const float* basis_t, int dz_given, const float* coords,
                const float* anchors, const float* weight, const float* state, const float* grad_loss, int gram) {
  BackwardArgs a;
  a.grad_in = layout(grad_in, n1, s0, s1, sd);
  a.dtype = static_cast<Dtype>(dtype);
  a.grad_out = grad_out;
  a.rows = rows;
  a.d = d;
  a.k = k;
  a.basis_t = basis_t;
  a.dz_given = dz_given != 0;
  a.coords = coords;
  a.anchors = anchors;
  a.weight = weight;
  a.state = state;
  a.grad_loss = grad_loss;
  a.gram = gram != 0;
  return static_cast<int>(refusalguard::launch_backward(a, nullptr));
}

}  // extern "C"
