// torch.library bindings for the CUDA penalty kernels: check, allocate, launch on the
// current stream.  The autograd and torch.compile wiring lives in Python
// (refusalguard_kernels/ops/penalty.py); these ops are its "cuda" backend.
//
//   refusalguard_cuda::project(hidden, basis, poison) -> coords
//   refusalguard_cuda::loss_forward(hidden, basis, anchors, weight, drift_coef, gram_coef, poison)
//       -> (coords, loss, state)
//   refusalguard_cuda::loss_backward(grad_in, grad_loss, coords, anchors, weight, state, basis,
//                                    hidden_shape, hidden_dtype, poison) -> grad_hidden
//   refusalguard_cuda::project_backward(grad_coords, basis, hidden_shape, hidden_dtype, poison)
//       -> grad_hidden
//
// `hidden` / `grad_in` are N rows of d: a 2-D tensor with any strides, or a 3-D tensor
// with any strides (e.g. a transposed [seq, batch, d] activation), read in place.
// `poison` fills every output and workspace with NaN before the kernels run (tests use
// it to prove that every element is written).

#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "refusalguard_penalty.h"

// `import refusalguard_kernels._cuda` registers the ops below; the module itself is empty.
extern "C" PyObject* PyInit__cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda", nullptr, -1, nullptr,
                                           nullptr,         nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}

namespace refusalguard {
namespace {

constexpr const char* kWho = "refusalguard_cuda: ";

Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, kWho, "hidden states must be float32, float16 or bfloat16; got ", t,
                  ". Use backend='torch' for other dtypes.");
  }
  return Dtype::kFloat32;
}

struct Rows {
  RowLayout layout;
  int64_t rows;
  int64_t d;
};

// A 2-D tensor is N = size(0) rows; a 3-D tensor N = size(0) * size(1) rows, row r at
// (r / size(1)) * stride(0) + (r % size(1)) * stride(1).  Nothing is copied.
Rows rows_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, kWho, name, " must be a 2-D (N, d) or 3-D (a, b, d) view; got shape ",
              t.sizes(), ". Flatten it with refusalguard_kernels.ops.layout.row_layout(t).tensor.");
  Rows r;
  r.layout.data = t.data_ptr();
  r.d = t.size(-1);
  r.layout.stride_col = t.stride(-1);
  if (t.dim() == 2) {
    r.rows = t.size(0);
    r.layout.n1 = 1;
    r.layout.stride0 = t.stride(0);
    r.layout.stride1 = 0;
  } else {
    r.rows = t.size(0) * t.size(1);
    r.layout.n1 = t.size(1);
    r.layout.stride0 = t.stride(0);
    r.layout.stride1 = t.stride(1);
  }
  TORCH_CHECK(r.rows >= 1, kWho, name, " has no rows (shape ", t.sizes(), "); pass at least one token");
  TORCH_CHECK(r.d >= 1, kWho, name, " has an empty last dimension (shape ", t.sizes(), ")");
  return r;
}

void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), kWho, name, " must be a CUDA tensor; got one on ", t.device(),
              ". Move it with .to('cuda') or use backend='torch'.");
  TORCH_CHECK(t.device() == device, kWho, name, " is on ", t.device(), " but hidden is on ", device,
              "; put every input on the same GPU.");
}

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Device& device) {
  check_cuda(t, name, device);
  TORCH_CHECK(t.scalar_type() == at::kFloat, kWho, name, " must be float32; got ", t.scalar_type(),
              " (the functional API converts it: call refusalguard_kernels.geometry_loss/guard/project).");
  TORCH_CHECK(t.sizes() == shape, kWho, name, " must have shape ", shape, "; got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), kWho, name, " must be contiguous; call .contiguous() first");
}

// (d, k) fp32 basis -> B^T as a contiguous (k, d) tensor, the layout both kernels stage.
at::Tensor basis_transposed(const at::Tensor& basis, int64_t d, const at::Device& device) {
  check_cuda(basis, "basis", device);
  TORCH_CHECK(basis.dim() == 2, kWho, "basis must be 2-D (d, k); got shape ", basis.sizes());
  TORCH_CHECK(basis.size(0) == d, kWho, "basis has ", basis.size(0), " rows but hidden has d = ", d,
              "; the basis must come from a model with the same hidden size");
  TORCH_CHECK(basis.size(1) >= 1 && basis.size(1) <= kMaxK, kWho, "basis must have 1 to ", kMaxK,
              " columns (k); got k = ", basis.size(1));
  TORCH_CHECK(basis.scalar_type() == at::kFloat, kWho, "basis must be float32; got ", basis.scalar_type(),
              " (orthonormalize_basis returns float32)");
  return basis.t().contiguous();
}

at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options, bool poison) {
  if (poison) return at::full(shape, std::numeric_limits<double>::quiet_NaN(), options);
  return at::empty(shape, options);
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, kWho, what, " failed: ", cudaGetErrorString(err));
}

ForwardArgs forward_args(const at::Tensor& hidden, const at::Tensor& basis_t, const Rows& r, const at::Tensor& coords) {
  ForwardArgs a;
  a.hidden = r.layout;
  a.dtype = to_dtype(hidden.scalar_type());
  a.rows = r.rows;
  a.d = r.d;
  a.k = static_cast<int>(basis_t.size(0));
  a.basis_t = basis_t.data_ptr<float>();
  a.coords = coords.data_ptr<float>();
  a.num_blocks = forward_num_blocks(r.rows, a.k);
  return a;
}

// ---------------------------------------------------------------- ops

at::Tensor project(const at::Tensor& hidden, const at::Tensor& basis, bool poison) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  check_cuda(hidden, "hidden", hidden.device());
  const Rows r = rows_of(hidden, "hidden");
  to_dtype(hidden.scalar_type());
  const at::Tensor basis_t = basis_transposed(basis, r.d, hidden.device());
  const int64_t k = basis_t.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor coords = new_output({r.rows, k}, f32, poison);
  ForwardArgs a = forward_args(hidden, basis_t, r, coords);
  check_launch(launch_project(a, c10::cuda::getCurrentCUDAStream().stream()), "project");
  return coords;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward(const at::Tensor& hidden, const at::Tensor& basis,
                                                            const at::Tensor& anchors,
                                                            const std::optional<at::Tensor>& weight,
                                                            double drift_coef, double gram_coef, bool poison) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  check_cuda(hidden, "hidden", hidden.device());
  const Rows r = rows_of(hidden, "hidden");
  to_dtype(hidden.scalar_type());
  const at::Tensor basis_t = basis_transposed(basis, r.d, hidden.device());
  const int64_t k = basis_t.size(0);
  check_f32(anchors, "anchors", {r.rows, k}, hidden.device());
  if (weight.has_value()) check_f32(*weight, "weight", {r.rows}, hidden.device());
  TORCH_CHECK(std::isfinite(drift_coef) && drift_coef >= 0 && std::isfinite(gram_coef) && gram_coef >= 0, kWho,
              "drift_coef and gram_coef must be finite and >= 0; got ", drift_coef, " and ", gram_coef);

  const bool gram = gram_coef != 0.0;
  const int width = part_width(static_cast<int>(k), gram);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor coords = new_output({r.rows, k}, f32, poison);
  at::Tensor loss = new_output({}, f32, poison);
  at::Tensor state = new_output({width}, f32, poison);
  ForwardArgs a = forward_args(hidden, basis_t, r, coords);
  at::Tensor partials = new_output({a.num_blocks, width}, f32, poison);
  at::Tensor sums = new_output({width}, f32, poison);
  a.anchors = anchors.data_ptr<float>();
  a.weight = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  a.drift_coef = static_cast<float>(drift_coef);
  a.gram_coef = static_cast<float>(gram_coef);
  a.gram = gram;
  a.partials = partials.data_ptr<float>();
  a.sums = sums.data_ptr<float>();
  a.loss = loss.data_ptr<float>();
  a.state = state.data_ptr<float>();
  check_launch(launch_loss_forward(a, c10::cuda::getCurrentCUDAStream().stream()), "loss_forward");
  return {coords, loss, state};
}

// Shared by both backward ops: grad_out (hidden_shape, hidden_dtype) = grad_in + dZ B^T.
at::Tensor backward_common(const std::optional<at::Tensor>& grad_in_opt, const at::Tensor& coords,
                           const at::Tensor& basis, at::IntArrayRef hidden_shape, at::ScalarType hidden_dtype,
                           bool poison, BackwardArgs& a) {
  const at::Device device = coords.device();
  check_cuda(coords, "coords", device);
  TORCH_CHECK(!hidden_shape.empty(), kWho, "hidden_shape must have at least one dimension");
  const int64_t d = hidden_shape.back();
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < hidden_shape.size(); ++i) rows *= hidden_shape[i];
  TORCH_CHECK(rows >= 1 && d >= 1, kWho, "hidden_shape ", hidden_shape, " has no elements");
  a.dtype = to_dtype(hidden_dtype);
  const at::Tensor basis_t = basis_transposed(basis, d, device);
  const int64_t k = basis_t.size(0);
  check_f32(coords, "coords", {rows, k}, device);

  at::Tensor grad_in;  // keeps a converted copy alive through the launch
  if (grad_in_opt.has_value()) {
    grad_in = *grad_in_opt;
    check_cuda(grad_in, "grad_in", device);
    // Autograd hands over the output's dtype; anything else is rounded to it first.
    if (grad_in.scalar_type() != hidden_dtype) grad_in = grad_in.to(hidden_dtype);
    const Rows g = rows_of(grad_in, "grad_in");
    TORCH_CHECK(g.rows == rows && g.d == d, kWho, "grad_in has ", g.rows, " rows of ", g.d,
                " but hidden_shape ", hidden_shape, " has ", rows, " rows of ", d);
    a.grad_in = g.layout;
  }
  at::Tensor out = new_output(hidden_shape, coords.options().dtype(hidden_dtype), poison);
  a.grad_out = out.data_ptr();
  a.rows = rows;
  a.d = d;
  a.k = static_cast<int>(k);
  a.basis_t = basis_t.data_ptr<float>();
  a.coords = coords.data_ptr<float>();
  check_launch(launch_backward(a, c10::cuda::getCurrentCUDAStream().stream()), "backward");
  return out;
}

at::Tensor loss_backward(const std::optional<at::Tensor>& grad_in, const at::Tensor& grad_loss,
                         const at::Tensor& coords, const at::Tensor& anchors,
                         const std::optional<at::Tensor>& weight, const at::Tensor& state, const at::Tensor& basis,
                         at::IntArrayRef hidden_shape, at::ScalarType hidden_dtype, bool poison) {
  const c10::cuda::CUDAGuard guard(coords.device());
  const at::Device device = coords.device();
  TORCH_CHECK(coords.dim() == 2, kWho, "coords must be (N, k); got shape ", coords.sizes());
  const int64_t rows = coords.size(0);
  const int64_t k = coords.size(1);
  check_f32(anchors, "anchors", {rows, k}, device);
  if (weight.has_value()) check_f32(*weight, "weight", {rows}, device);
  check_cuda(state, "state", device);
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.dim() == 1 && state.is_contiguous() &&
                  (state.numel() == 2 || state.numel() == 2 + k * k),
              kWho, "state must be the float32 (2,) or (2 + k*k,) tensor loss_forward returned; got ",
              state.scalar_type(), " ", state.sizes());
  check_cuda(grad_loss, "grad_loss", device);
  TORCH_CHECK(grad_loss.numel() == 1, kWho, "grad_loss must hold one value; got shape ", grad_loss.sizes());
  // Read on the device by the kernel (never .item()): CUDA-graph safe.
  const at::Tensor grad_loss32 = grad_loss.to(at::kFloat).contiguous();

  BackwardArgs a;
  a.dz_given = false;
  a.anchors = anchors.data_ptr<float>();
  a.weight = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  a.state = state.data_ptr<float>();
  a.grad_loss = grad_loss32.data_ptr<float>();
  a.gram = state.numel() == 2 + k * k;
  return backward_common(grad_in, coords, basis, hidden_shape, hidden_dtype, poison, a);
}

at::Tensor project_backward(const at::Tensor& grad_coords, const at::Tensor& basis, at::IntArrayRef hidden_shape,
                            at::ScalarType hidden_dtype, bool poison) {
  const c10::cuda::CUDAGuard guard(grad_coords.device());
  BackwardArgs a;
  a.dz_given = true;
  return backward_common(std::nullopt, grad_coords, basis, hidden_shape, hidden_dtype, poison, a);
}

}  // namespace
}  // namespace refusalguard

TORCH_LIBRARY(refusalguard_cuda, m) {
  m.def("project(Tensor hidden, Tensor basis, bool poison=False) -> Tensor");
  m.def(
      "loss_forward(Tensor hidden, Tensor basis, Tensor anchors, Tensor? weight, float drift_coef, "
      "float gram_coef, bool poison=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "loss_backward(Tensor? grad_in, Tensor grad_loss, Tensor coords, Tensor anchors, Tensor? weight, "
      "Tensor state, Tensor basis, int[] hidden_shape, ScalarType hidden_dtype, bool poison=False) -> Tensor");
  m.def(
      "project_backward(Tensor grad_coords, Tensor basis, int[] hidden_shape, ScalarType hidden_dtype, "
      "bool poison=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(refusalguard_cuda, CUDA, m) {
  m.impl("project", &refusalguard::project);
  m.impl("loss_forward", &refusalguard::loss_forward);
  m.impl("loss_backward", &refusalguard::loss_backward);
  m.impl("project_backward", &refusalguard::project_backward);
}
