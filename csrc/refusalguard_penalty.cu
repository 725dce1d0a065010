// CUDA kernels for the refusal-subspace penalty: plain CUDA, no torch headers, so
// `nvcc -c` checks this file on machines without a GPU or a CUDA build of torch.
//
// Two passes over the N x d data, as in the Triton backend:
//   forward  : one read of H -> Z (N x k) and per-block partial sums of W, the drift
//              term and the gram difference; a fixed-order reduction writes loss + state.
//   backward : one read of grad_in, one write of grad_out = grad_in + s * dL/dZ B^T,
//              with dL/dZ rebuilt per row tile from the saved Z, A, w and state.
//
// Precision: every product is an fp32 FMA (`fmaf`), for all hidden dtypes: half
// inputs are exact in fp32, the basis stays fp32, so there is no tf32 or half
// rounding of the basis.  The order of every accumulation is fixed by the code
// (never by scheduling), so results are bitwise reproducible, and `project` and the
// loss forward share the exact same Z arithmetic (one kernel template).
//
// Both GEMM-like loops are register-tiled SIMT loops over shared-memory tiles (fp32
// CUDA-core FMAs, no tensor cores): the basis tile is reused by a whole block of rows
// (128 forward, 64 when k > 32; 64 backward), so B is read from L2 once per row block,
// and H / grad are read once from HBM with 16-byte vectors where alignment allows (a
// masked scalar path otherwise).  Per element of H the forward does kp FMAs (kp = k
// padded to 8, 16, 32 or 64) and the backward k: memory-bound for small k, FMA-bound
// towards k = 64.
//
// No atomics anywhere; no host synchronisation (grad_loss is read on the device), so
// the launches can be captured in a CUDA graph.

#include "refusalguard_penalty.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace refusalguard {
namespace {

constexpr int kThreads = 256;

// ------------------------------------------------------------------ dtype helpers

template <typename T>
struct Num;

template <>
struct Num<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

template <>
struct Num<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// One 16-byte vector of T: the unit of every vectorized global load and store.
template <typename T>
union Pack {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  uint4 raw;
  T v[kVec];
};

__device__ __forceinline__ int64_t row_offset(int64_t row, int64_t n1, int64_t stride0, int64_t stride1) {
  if (n1 == 1) return row * stride0;
  return (row / n1) * stride0 + (row % n1) * stride1;
}

// Loads the VEC elements of `row_ptr` starting at column `col`: one 16-byte load when
// the caller has checked that rows and columns are 16-byte aligned (`vec`) and the
// whole vector is inside the row; element by element, zero past column d, otherwise.
template <typename T>
__device__ __forceinline__ void load_pack(Pack<T>& out, const T* __restrict__ row_ptr, int64_t col, int64_t d,
                                          int64_t stride_col, bool vec) {
  constexpr int VEC = Pack<T>::kVec;
  if (vec && col + VEC <= d) {
    out.raw = *reinterpret_cast<const uint4*>(row_ptr + col);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      out.v[v] = (col + v < d) ? row_ptr[(col + v) * stride_col] : Num<T>::from_float(0.0f);
    }
  }
}

// ------------------------------------------------------------------ forward

struct FwdParams {
  const void* hidden;
  int64_t n1, stride0, stride1, stride_col;
  int64_t rows, d;
  int k;
  bool vec;   // 16-byte loads allowed (column stride 1, aligned base and row strides)
  bool gram;  // accumulate the gram partials (loss only)
  const float* basis_t;
  float* coords;
  const float* anchors;
  const float* weight;
  float* partials;
  int part_width;
};

// Tiling of the forward for a padded k of KP (8, 16, 32 or 64).  Thread t owns
// rows tr + m * TR (m < RM) and coordinates tk + n * TK (n < KN) of a ROWS-row tile,
// i.e. an RM x KN block of Z in registers, strided so that its shared-memory reads
// are bank-conflict free.
template <int KP>
struct FwdShape {
  static constexpr int TK = KP < 16 ? KP : 16;  // threads along k
  static constexpr int KN = KP / TK;            // coordinates per thread
  static constexpr int TR = kThreads / TK;      // threads along rows
  static constexpr int ROWS = KP == 64 ? 64 : 128;  // rows per tile (64 keeps k = 64 at 16 accumulators)
  static constexpr int RM = ROWS / TR;          // rows per thread
  static constexpr int TD = 32;                 // columns per step of the d loop
  static constexpr int LD = TD + 4;             // padded smem row: LD = 4 (mod 32) words
  static constexpr int BQ = KP * TD / kThreads;                     // B^T tile floats per thread
  static constexpr int GQ = (KP * KP + kThreads - 1) / kThreads;    // gram entries per thread
  static_assert(RM * TR == ROWS && KN * TK == KP, "tile must cover the block");
  static_assert(BQ * kThreads == KP * TD, "B^T tile must split evenly");
};

// Z_t = sum_j H_tj B_j for the ROWS-row tiles this block visits (grid-stride), with
// one fp32 FMA chain per (t, c) in increasing j -- the same chain in project and in the
// loss, so anchors made with project() give Z == A bitwise.  With LOSS the block also
// accumulates, over its rows,
//   W_p     = sum_t w_t
//   drift_p = sum_t w_t ||Z_t - A_t||^2
//   D_p     = sum_t (w_t Z_t) Z_t^T - (w_t A_t) A_t^T     (k x k, when gram)
// and writes them to partials[blockIdx.x] = [W_p, drift_p, D_p (row-major k x k)].
// D is built from explicitly rounded products (__fmul_rn, no FMA contraction) with the
// same op sequence for Z and A, so Z == A gives D == 0 exactly.
template <typename T, int KP, bool LOSS>
__global__ void __launch_bounds__(kThreads, 2) penalty_fwd_kernel(const FwdParams p) {
  using S = FwdShape<KP>;
  constexpr int VEC = Pack<T>::kVec;     // elements per 16-byte vector: 4 (fp32) or 8 (half)
  constexpr int VPR = S::TD / VEC;       // vectors per row per d step
  constexpr int HQ = S::ROWS * VPR / kThreads;  // H vectors per thread per d step
  static_assert(HQ * kThreads == S::ROWS * VPR, "H tile must split evenly");
  static_assert(2 * S::TR * KP + S::TR <= S::ROWS * S::LD, "gram scratch must fit in the H tile");
  static_assert(2 * kThreads <= S::ROWS * S::LD, "reduction scratch must fit in the H tile");

  __shared__ __align__(16) float hs[S::ROWS * S::LD];  // H tile, fp32, [row][col]
  __shared__ __align__(16) float bs[KP * S::LD];       // B^T tile, [coord][col], zero for coord >= k
  __shared__ float gram_s[LOSS ? KP * KP : 1];         // this block's D, entry e owned by thread e % 256

  const T* __restrict__ H = static_cast<const T*>(p.hidden);
  const float* __restrict__ Bt = p.basis_t;
  const int t = threadIdx.x;
  const int tk = t % S::TK;
  const int tr = t / S::TK;
  const int64_t tiles = (p.rows + S::ROWS - 1) / S::ROWS;

  float w_part = 0.0f;
  float drift_part = 0.0f;
  if (LOSS && p.gram) {
#pragma unroll
    for (int q = 0; q < S::GQ; ++q) {
      const int e = t + q * kThreads;
      if (e < KP * KP) gram_s[e] = 0.0f;
    }
  }

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * S::ROWS;

    // The rows this thread loads stay the same for the whole d loop.
    int64_t hoff[HQ];
    bool hval[HQ];
#pragma unroll
    for (int q = 0; q < HQ; ++q) {
      const int64_t row = row0 + (t + q * kThreads) / VPR;
      hval[q] = row < p.rows;
      hoff[q] = hval[q] ? row_offset(row, p.n1, p.stride0, p.stride1) : 0;
    }

    Pack<T> hreg[HQ];
    float breg[S::BQ];
    // Global -> registers for the d step starting at column d0 (the next step's loads
    // are in flight while the current step computes from shared memory).
    auto load_step = [&](int64_t d0) {
#pragma unroll
      for (int q = 0; q < HQ; ++q) {
        const int vj = (t + q * kThreads) % VPR;
        if (hval[q]) {
          load_pack(hreg[q], H + hoff[q], d0 + vj * VEC, p.d, p.stride_col, p.vec);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) hreg[q].v[v] = Num<T>::from_float(0.0f);
        }
      }
#pragma unroll
      for (int q = 0; q < S::BQ; ++q) {
        const int e = t + q * kThreads;
        const int c = e / S::TD;
        const int jj = e % S::TD;
        breg[q] = (c < p.k && d0 + jj < p.d) ? Bt[static_cast<int64_t>(c) * p.d + d0 + jj] : 0.0f;
      }
    };

    float acc[S::RM][S::KN];
#pragma unroll
    for (int m = 0; m < S::RM; ++m) {
#pragma unroll
      for (int n = 0; n < S::KN; ++n) acc[m][n] = 0.0f;
    }

    load_step(0);
    for (int64_t d0 = 0; d0 < p.d; d0 += S::TD) {
      __syncthreads();  // the previous step (or tile epilogue) is done with hs / bs
#pragma unroll
      for (int q = 0; q < HQ; ++q) {
        const int i = t + q * kThreads;
        float* dst = hs + (i / VPR) * S::LD + (i % VPR) * VEC;
#pragma unroll
        for (int v4 = 0; v4 < VEC / 4; ++v4) {
          *reinterpret_cast<float4*>(dst + 4 * v4) =
              make_float4(Num<T>::to_float(hreg[q].v[4 * v4 + 0]), Num<T>::to_float(hreg[q].v[4 * v4 + 1]),
                          Num<T>::to_float(hreg[q].v[4 * v4 + 2]), Num<T>::to_float(hreg[q].v[4 * v4 + 3]));
        }
      }
#pragma unroll
      for (int q = 0; q < S::BQ; ++q) {
        const int e = t + q * kThreads;
        bs[(e / S::TD) * S::LD + e % S::TD] = breg[q];
      }
      __syncthreads();
      if (d0 + S::TD < p.d) load_step(d0 + S::TD);

#pragma unroll
      for (int j = 0; j < S::TD; j += 4) {
        float4 b[S::KN];
#pragma unroll
        for (int n = 0; n < S::KN; ++n) b[n] = *reinterpret_cast<const float4*>(bs + (tk + n * S::TK) * S::LD + j);
#pragma unroll
        for (int m = 0; m < S::RM; ++m) {
          const float4 h = *reinterpret_cast<const float4*>(hs + (tr + m * S::TR) * S::LD + j);
#pragma unroll
          for (int n = 0; n < S::KN; ++n) {
            acc[m][n] = fmaf(h.x, b[n].x, acc[m][n]);
            acc[m][n] = fmaf(h.y, b[n].y, acc[m][n]);
            acc[m][n] = fmaf(h.z, b[n].z, acc[m][n]);
            acc[m][n] = fmaf(h.w, b[n].w, acc[m][n]);
          }
        }
      }
    }

    // ---- epilogue: Z out, and the loss partials of this tile
    if (!LOSS) {
#pragma unroll
      for (int m = 0; m < S::RM; ++m) {
        const int64_t row = row0 + tr + m * S::TR;
        if (row < p.rows) {
#pragma unroll
          for (int n = 0; n < S::KN; ++n) {
            const int c = tk + n * S::TK;
            if (c < p.k) p.coords[row * p.k + c] = acc[m][n];
          }
        }
      }
    } else {
      float* zc = hs;                   // [TR][KP]  Z of one row chunk
      float* ac = hs + S::TR * KP;      // [TR][KP]  A of the chunk
      float* wc = hs + 2 * S::TR * KP;  // [TR]      w of the chunk
#pragma unroll
      for (int m = 0; m < S::RM; ++m) {
        const int64_t row = row0 + tr + m * S::TR;
        const bool valid = row < p.rows;
        const float w = valid ? (p.weight != nullptr ? p.weight[row] : 1.0f) : 0.0f;
        if (tk == 0) w_part += w;
        float sq = 0.0f;
#pragma unroll
        for (int n = 0; n < S::KN; ++n) {
          const int c = tk + n * S::TK;
          if (valid && c < p.k) {
            p.coords[row * p.k + c] = acc[m][n];
            const float diff = acc[m][n] - p.anchors[row * p.k + c];
            sq = fmaf(diff, diff, sq);
          }
        }
        drift_part = fmaf(w, sq, drift_part);

        if (p.gram) {  // uniform across the block: the barriers below are safe
          // Chunk m = tile rows m*TR .. m*TR+TR-1, one per tr.
          __syncthreads();  // the d loop (or the previous chunk) is done with hs
#pragma unroll
          for (int n = 0; n < S::KN; ++n) {
            const int c = tk + n * S::TK;
            const bool ok = valid && c < p.k;
            zc[tr * KP + c] = ok ? acc[m][n] : 0.0f;
            ac[tr * KP + c] = ok ? p.anchors[row * p.k + c] : 0.0f;
          }
          if (tk == 0) wc[tr] = w;
          __syncthreads();
          // q outer, r inner: one accumulator live at a time next to acc[][].
#pragma unroll 1
          for (int q = 0; q < S::GQ; ++q) {
            const int e = t + q * kThreads;
            if (e < KP * KP) {
              const int i = e / KP;
              const int jc = e % KP;
              float g = gram_s[e];  // owned by this thread: no barrier needed
              for (int r = 0; r < S::TR; ++r) {
                const float wr = wc[r];
                const float pz = __fmul_rn(__fmul_rn(wr, zc[r * KP + i]), zc[r * KP + jc]);
                const float pa = __fmul_rn(__fmul_rn(wr, ac[r * KP + i]), ac[r * KP + jc]);
                g = __fadd_rn(g, __fsub_rn(pz, pa));
              }
              gram_s[e] = g;
            }
          }
        }
      }
    }
  }

  if (LOSS) {
    // Fixed-shape tree over the block's threads: the same order every run.
    __syncthreads();  // every warp is done with hs
    float* red = hs;
    red[t] = w_part;
    red[kThreads + t] = drift_part;
    __syncthreads();
#pragma unroll
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (t < s) {
        red[t] += red[t + s];
        red[kThreads + t] += red[kThreads + t + s];
      }
      __syncthreads();
    }
    float* part = p.partials + static_cast<int64_t>(blockIdx.x) * p.part_width;
    if (t == 0) {
      part[0] = red[0];
      part[1] = red[kThreads];
    }
    if (p.gram) {
#pragma unroll
      for (int q = 0; q < S::GQ; ++q) {
        const int e = t + q * kThreads;
        if (e < KP * KP) {
          const int i = e / KP;
          const int jc = e % KP;
          if (i < p.k && jc < p.k) part[2 + i * p.k + jc] = gram_s[e];  // written by this thread
        }
      }
    }
  }
}

// sums[e] = sum_{p = 0}^{P-1} partials[p][e], p in increasing order (deterministic).
__global__ void __launch_bounds__(kThreads) penalty_reduce_partials_kernel(const float* __restrict__ partials,
                                                                           int num_partials, int width,
                                                                           float* __restrict__ sums) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= width) return;
  float s = 0.0f;
  for (int q = 0; q < num_partials; ++q) s += partials[static_cast<int64_t>(q) * width + e];
  sums[e] = s;
}

// One block.  With W = sums[0], drift = sums[1], D = sums[2:] and inv = W > 0 ? 1 / W : 0:
//   loss  = drift_coef * (drift * inv) + gram_coef * ||D * inv||_F^2      (0 when W == 0)
//   state = [2 drift_coef inv, 4 gram_coef inv, D * inv]                  (D * inv = G - G_A)
__global__ void __launch_bounds__(kThreads) penalty_finalize_kernel(const float* __restrict__ sums, int width,
                                                                    float drift_coef, float gram_coef,
                                                                    float* __restrict__ loss,
                                                                    float* __restrict__ state) {
  __shared__ float red[kThreads];
  const int t = threadIdx.x;
  const float total_w = sums[0];
  const float inv_w = total_w > 0.0f ? 1.0f / total_w : 0.0f;
  float sq = 0.0f;
  for (int e = 2 + t; e < width; e += kThreads) {
    const float gd = sums[e] * inv_w;
    state[e] = gd;
    sq = fmaf(gd, gd, sq);
  }
  red[t] = sq;
  __syncthreads();
#pragma unroll
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s) red[t] += red[t + s];
    __syncthreads();
  }
  if (t == 0) {
    *loss = drift_coef * (sums[1] * inv_w) + gram_coef * red[0];
    state[0] = 2.0f * drift_coef * inv_w;
    state[1] = 4.0f * gram_coef * inv_w;
  }
}

// ------------------------------------------------------------------ backward

struct BwdParams {
  const void* grad_in;  // nullptr: none
  int64_t n1, stride0, stride1, stride_col;
  bool vec_in;   // 16-byte loads of grad_in allowed
  void* grad_out;
  bool vec_out;  // 16-byte stores of grad_out allowed
  int64_t rows, d;
  int k;
  const float* basis_t;
  bool dz_given;
  bool gram;
  const float* coords;
  const float* anchors;
  const float* weight;
  const float* state;
  const float* grad_loss;
};

// Tiling of the backward: thread t owns rows tr*RM .. tr*RM+RM-1 of a 64-row tile and
// the CN contiguous columns tc*CN .. of each TD-column step (one 16-byte vector).
template <typename T>
struct BwdShape {
  static constexpr int CN = Pack<T>::kVec;  // columns per thread: 4 (fp32) or 8 (half)
  static constexpr int TC = 16;             // threads along columns
  static constexpr int TD = TC * CN;        // columns per step: 64 or 128
  static constexpr int TR = kThreads / TC;  // threads along rows
  static constexpr int RM = 4;              // rows per thread
  static constexpr int ROWS = TR * RM;      // 64 rows per tile
  static constexpr int ZLD = kMaxK + 1;     // padded Z row in the dz phase (conflict-free column reads)
  static constexpr int BS = kMaxK * TD > ROWS * ZLD ? kMaxK * TD : ROWS * ZLD;
  static constexpr int DQ = kMaxK * ROWS / kThreads;  // dZ entries per thread (at k = kMaxK)
  static_assert(RM == 4, "the dZ read is one float4 per coordinate");
};

// GOUT_t = GIN_t + dZ_t B^T for the 64-row tiles this block visits, where
//   dZ_t = Z_t                                               (dz_given: project's backward)
//   dZ_t = s w_t (c1 (Z_t - A_t) + c2 Z_t (G - G_A))         (otherwise)
// with c1 = state[0], c2 = state[1], G - G_A = state[2:] and s = *grad_loss read on the
// device.  dZ is built once per tile in shared memory ([coord][row]); then for each
// TD-column step the B^T tile is staged in shared memory and every output element is
// one fp32 FMA chain over the coordinates in increasing order, rounded once to T.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) penalty_bwd_kernel(const BwdParams p) {
  using S = BwdShape<T>;
  __shared__ __align__(16) float dzs[kMaxK * S::ROWS];  // dZ tile [coord][row]
  __shared__ __align__(16) float bs[S::BS];             // B^T tile [coord][col]; Z tile [row][ZLD] in the dz phase

  const T* __restrict__ gin = static_cast<const T*>(p.grad_in);
  T* __restrict__ out = static_cast<T*>(p.grad_out);
  const float* __restrict__ Bt = p.basis_t;
  const int t = threadIdx.x;
  const int tc = t % S::TC;
  const int tr = t / S::TC;
  const int k = p.k;
  const bool has_grad_in = gin != nullptr;

  float c1 = 0.0f, c2 = 0.0f, s = 0.0f;
  if (!p.dz_given) {
    c1 = p.state[0];
    c2 = p.state[1];
    s = *p.grad_loss;
  }

  const int64_t tiles = (p.rows + S::ROWS - 1) / S::ROWS;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * S::ROWS;
    __syncthreads();  // the previous tile is done with dzs / bs

    // ---- dZ for the tile's rows, straight into dzs[c * ROWS + r]: entry e = t + 256 q is
    // (c, r) = divmod(e, ROWS), so a warp shares c and walks 32 consecutive rows.
    if (p.dz_given) {
#pragma unroll 4
      for (int q = 0; q < S::DQ; ++q) {
        const int e = t + q * kThreads;
        const int c = e / S::ROWS;
        const int64_t row = row0 + e % S::ROWS;
        if (c < k) dzs[e] = row < p.rows ? p.coords[row * k + c] : 0.0f;
      }
    } else {
      // The tile's Z rows (contiguous in coords) -> bs as [r][ZLD].
      for (int e = t; e < S::ROWS * k; e += kThreads) {
        const int r = e / k;
        const int c = e % k;
        bs[r * S::ZLD + c] = (row0 + r < p.rows) ? p.coords[row0 * k + e] : 0.0f;
      }
      __syncthreads();
      const float* __restrict__ gram_diff = p.state + 2;  // (G - G_A)[j][c]: warp-uniform reads, L1-cached
#pragma unroll 1
      for (int q = 0; q < S::DQ; ++q) {
        const int e = t + q * kThreads;
        const int c = e / S::ROWS;
        if (c >= k) break;  // c grows with q
        const int r = e % S::ROWS;
        const int64_t row = row0 + r;
        float v = 0.0f;
        if (row < p.rows) {
          const float w = p.weight != nullptr ? p.weight[row] : 1.0f;
          float dz = c1 * (bs[r * S::ZLD + c] - p.anchors[row * k + c]);
          if (p.gram) {
            float mz = 0.0f;  // (Z_t (G - G_A))_c
            for (int j = 0; j < k; ++j) mz = fmaf(bs[r * S::ZLD + j], __ldg(gram_diff + j * k + c), mz);
            dz = fmaf(c2, mz, dz);
          }
          v = dz * (w * s);
        }
        dzs[e] = v;
      }
    }

    // ---- grad_out = grad_in + dZ B^T, TD columns per step
    int64_t goff[S::RM];
    bool rval[S::RM];
#pragma unroll
    for (int m = 0; m < S::RM; ++m) {
      const int64_t row = row0 + tr * S::RM + m;
      rval[m] = row < p.rows;
      goff[m] = (has_grad_in && rval[m]) ? row_offset(row, p.n1, p.stride0, p.stride1) : 0;
    }
    for (int64_t d0 = 0; d0 < p.d; d0 += S::TD) {
      const int64_t col0 = d0 + tc * S::CN;
      Pack<T> g[S::RM];  // grad_in, loaded before the barrier so its latency overlaps
#pragma unroll
      for (int m = 0; m < S::RM; ++m) {
        if (has_grad_in && rval[m]) {
          load_pack(g[m], gin + goff[m], col0, p.d, p.stride_col, p.vec_in);
        } else {
#pragma unroll
          for (int v = 0; v < S::CN; ++v) g[m].v[v] = Num<T>::from_float(0.0f);
        }
      }
      __syncthreads();  // dzs is written; the previous step is done with bs
      for (int e = t; e < k * S::TD; e += kThreads) {
        const int c = e / S::TD;
        const int jj = e % S::TD;
        bs[e] = (d0 + jj < p.d) ? Bt[static_cast<int64_t>(c) * p.d + d0 + jj] : 0.0f;  // e = c * TD + jj
      }
      __syncthreads();

      float acc[S::RM][S::CN];
#pragma unroll
      for (int m = 0; m < S::RM; ++m) {
#pragma unroll
        for (int n = 0; n < S::CN; ++n) acc[m][n] = 0.0f;
      }
#pragma unroll 2
      for (int c = 0; c < k; ++c) {
        const float4 dz4 = *reinterpret_cast<const float4*>(dzs + c * S::ROWS + tr * S::RM);
        const float dz[4] = {dz4.x, dz4.y, dz4.z, dz4.w};
        float b[S::CN];
#pragma unroll
        for (int v4 = 0; v4 < S::CN / 4; ++v4) {
          const float4 b4 = *reinterpret_cast<const float4*>(bs + c * S::TD + tc * S::CN + 4 * v4);
          b[4 * v4 + 0] = b4.x;
          b[4 * v4 + 1] = b4.y;
          b[4 * v4 + 2] = b4.z;
          b[4 * v4 + 3] = b4.w;
        }
#pragma unroll
        for (int m = 0; m < S::RM; ++m) {
#pragma unroll
          for (int n = 0; n < S::CN; ++n) acc[m][n] = fmaf(dz[m], b[n], acc[m][n]);
        }
      }

#pragma unroll
      for (int m = 0; m < S::RM; ++m) {
        if (!rval[m]) continue;
        T* orow = out + (row0 + tr * S::RM + m) * p.d;
        Pack<T> o;
#pragma unroll
        for (int n = 0; n < S::CN; ++n) {
          const float gi = has_grad_in ? Num<T>::to_float(g[m].v[n]) : 0.0f;
          o.v[n] = Num<T>::from_float(acc[m][n] + gi);
        }
        if (p.vec_out && col0 + S::CN <= p.d) {
          *reinterpret_cast<uint4*>(orow + col0) = o.raw;
        } else {
#pragma unroll
          for (int n = 0; n < S::CN; ++n) {
            if (col0 + n < p.d) orow[col0 + n] = o.v[n];
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------ host side

// Every launch goes through here.  REFUSALGUARD_HOST_EMULATION is defined only by the
// CPU test harness (tests/cuda_emulation/), which runs the same kernels on host threads.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, cudaStream_t stream, const Args&... args) {
#ifdef REFUSALGUARD_HOST_EMULATION
  (void)stream;
  refusalguard_emulation::run(kernel, grid, dim3(kThreads), args...);
#else
  kernel<<<grid, kThreads, 0, stream>>>(args...);
#endif
}

int sm_count() {
  int device = 0;
  int sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    cudaGetLastError();  // clear: the caller's launch reports any real problem
    return 1;
  }
  return sms;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
bool aligned16(const void* ptr, int64_t n1, int64_t stride0, int64_t stride1, int64_t stride_col) {
  constexpr int64_t vec = 16 / sizeof(T);
  return stride_col == 1 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && stride0 % vec == 0 &&
         (n1 == 1 || stride1 % vec == 0);
}

template <typename T, bool LOSS>
cudaError_t launch_fwd_typed(const ForwardArgs& a, cudaStream_t stream) {
  FwdParams p{};
  p.hidden = a.hidden.data;
  p.n1 = a.hidden.n1;
  p.stride0 = a.hidden.stride0;
  p.stride1 = a.hidden.stride1;
  p.stride_col = a.hidden.stride_col;
  p.rows = a.rows;
  p.d = a.d;
  p.k = a.k;
  p.vec = aligned16<T>(a.hidden.data, a.hidden.n1, a.hidden.stride0, a.hidden.stride1, a.hidden.stride_col);
  p.gram = LOSS && a.gram;
  p.basis_t = a.basis_t;
  p.coords = a.coords;
  p.anchors = a.anchors;
  p.weight = a.weight;
  p.partials = a.partials;
  p.part_width = part_width(a.k, p.gram);
  const dim3 grid(static_cast<unsigned>(a.num_blocks));
  if (a.k <= 8) {
    launch(penalty_fwd_kernel<T, 8, LOSS>, grid, stream, p);
  } else if (a.k <= 16) {
    launch(penalty_fwd_kernel<T, 16, LOSS>, grid, stream, p);
  } else if (a.k <= 32) {
    launch(penalty_fwd_kernel<T, 32, LOSS>, grid, stream, p);
  } else {
    launch(penalty_fwd_kernel<T, 64, LOSS>, grid, stream, p);
  }
  return cudaGetLastError();
}

template <bool LOSS>
cudaError_t launch_fwd(const ForwardArgs& a, cudaStream_t stream) {
  if (a.k < 1 || a.k > kMaxK || a.rows < 1 || a.d < 1 || a.num_blocks < 1) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case Dtype::kFloat32:
      return launch_fwd_typed<float, LOSS>(a, stream);
    case Dtype::kFloat16:
      return launch_fwd_typed<__half, LOSS>(a, stream);
    case Dtype::kBFloat16:
      return launch_fwd_typed<__nv_bfloat16, LOSS>(a, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_bwd_typed(const BackwardArgs& a, cudaStream_t stream) {
  using S = BwdShape<T>;
  BwdParams p{};
  p.grad_in = a.grad_in.data;
  p.n1 = a.grad_in.n1;
  p.stride0 = a.grad_in.stride0;
  p.stride1 = a.grad_in.stride1;
  p.stride_col = a.grad_in.stride_col;
  p.vec_in = a.grad_in.data != nullptr &&
             aligned16<T>(a.grad_in.data, a.grad_in.n1, a.grad_in.stride0, a.grad_in.stride1, a.grad_in.stride_col);
  p.grad_out = a.grad_out;
  p.vec_out = aligned16<T>(a.grad_out, 1, a.d, 0, 1);  // contiguous rows of d elements
  p.rows = a.rows;
  p.d = a.d;
  p.k = a.k;
  p.basis_t = a.basis_t;
  p.dz_given = a.dz_given;
  p.gram = !a.dz_given && a.gram;
  p.coords = a.coords;
  p.anchors = a.anchors;
  p.weight = a.weight;
  p.state = a.state;
  p.grad_loss = a.grad_loss;
  const int64_t tiles = ceil_div(a.rows, S::ROWS);
  const int64_t cap = static_cast<int64_t>(sm_count()) * 16;
  const dim3 grid(static_cast<unsigned>(tiles < cap ? tiles : cap));
  launch(penalty_bwd_kernel<T>, grid, stream, p);
  return cudaGetLastError();
}

}  // namespace

int forward_num_blocks(int64_t rows, int k) {
  const int tile_rows = k > 32 ? FwdShape<64>::ROWS : FwdShape<8>::ROWS;
  static_assert(FwdShape<8>::ROWS == FwdShape<16>::ROWS && FwdShape<8>::ROWS == FwdShape<32>::ROWS, "tile rows");
  const int64_t tiles = ceil_div(rows < 1 ? 1 : rows, tile_rows);
  const int64_t cap = static_cast<int64_t>(sm_count()) * 2;  // two resident blocks per SM
  return static_cast<int>(tiles < cap ? tiles : cap);
}

int part_width(int k, bool gram) { return 2 + (gram ? k * k : 0); }

cudaError_t launch_project(const ForwardArgs& args, cudaStream_t stream) { return launch_fwd<false>(args, stream); }

cudaError_t launch_loss_forward(const ForwardArgs& args, cudaStream_t stream) {
  if (args.anchors == nullptr || args.partials == nullptr || args.sums == nullptr || args.loss == nullptr ||
      args.state == nullptr) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = launch_fwd<true>(args, stream);
  if (err != cudaSuccess) return err;
  const int width = part_width(args.k, args.gram);
  launch(penalty_reduce_partials_kernel, dim3(static_cast<unsigned>(ceil_div(width, kThreads))), stream,
         static_cast<const float*>(args.partials), args.num_blocks, width, args.sums);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  launch(penalty_finalize_kernel, dim3(1), stream, static_cast<const float*>(args.sums), width, args.drift_coef,
         args.gram_coef, args.loss, args.state);
  return cudaGetLastError();
}

cudaError_t launch_backward(const BackwardArgs& args, cudaStream_t stream) {
  if (args.k < 1 || args.k > kMaxK || args.rows < 1 || args.d < 1 || args.grad_out == nullptr ||
      args.coords == nullptr || args.basis_t == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (!args.dz_given && (args.anchors == nullptr || args.state == nullptr || args.grad_loss == nullptr)) {
    return cudaErrorInvalidValue;
  }
  switch (args.dtype) {
    case Dtype::kFloat32:
      return launch_bwd_typed<float>(args, stream);
    case Dtype::kFloat16:
      return launch_bwd_typed<__half>(args, stream);
    case Dtype::kBFloat16:
      return launch_bwd_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace refusalguard
