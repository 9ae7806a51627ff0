// The fused step's math and each thread's share of the work, as __host__ __device__ functions
// shared by the CUDA kernels (kernels.cu) and the host twins (csrc/tests/), so that CI without a
// GPU runs the very code the kernels run, against the Python reference (tests/test_cuda_host.py).
//
// Table columns, flag bits, rule and schedule-kind codes, NORM_EPS and the chunk and block sizes
// come from fused_lr_layout.h, which the build generates from fused_lr/core/layout.py
// (docs/step.md, "Kernel layout"); nothing here restates them.
//
// Mirrors, operation for operation:
//   eval_table            fused_lr.schedules.eval_table
//   prepare_row           the per-tensor scalars of docs/step.md: lr = base lr x schedule(group clock)
//                         x the gradient-norm rate, decoupled decay factor, the momentum buffer's
//                         first use (step count == 0); its last row: clip coefficient
//                         (fused_lr.backends.reference.clip_coef), 1/grad_scale
//                         (torch.amp.GradScaler.unscale_), go (found_inf unset)
//   processed_grad,
//   sgd_element           fused_lr.backends.reference (processed_grad, ReferenceBackend.update) with
//                         fused_lr.optim.sgd.FusedSGD.reference_rule
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fused_lr_layout.h"

#if defined(__CUDACC__)
#define FLR_HD __host__ __device__ __forceinline__
#define FLR_UNROLL _Pragma("unroll")
#else
#define FLR_HD inline
#define FLR_UNROLL
#endif

namespace flr {
namespace L = layout;

static_assert(L::COEF_COLS - L::C_C0 >= L::RULE_COLS, "a rule's coefficients must fit the scratch row");
static_assert(L::CUDA_CHUNK % 8 == 0, "chunks must start on 16-byte boundaries for every dtype");

// ---------------------------------------------------------------------------- schedule tables
constexpr double PI = 3.141592653589793;  // math.pi

// Python's min(a, b): a unless b < a.
FLR_HD double py_min(double a, double b) { return b < a ? b : a; }

FLR_HD double cosine_factor(double m, double t, double period) {
  return m + (1.0 - m) * (1.0 + cos(PI * t / period)) / 2.0;
}

// The schedule factor at step k (without any host_scale). An unknown kind gives NaN, where
// Python raises: the table builder never emits one, and NaN makes a corrupt table visible.
FLR_HD double eval_table(const double* table, double k) {
  int row = 0;
  for (int i = 0; i < L::MAX_SEGMENTS; ++i) {
    if (table[i * L::SEGMENT_COLS] <= k) row = i;
  }
  const double* r = table + row * L::SEGMENT_COLS;
  const double start = r[0];
  const int kind = static_cast<int>(r[1]);
  const double* p = r + 2;
  double t = k - start;
  switch (kind) {
    case L::K_CONST:
      return p[0];
    case L::K_STEP:
      return pow(p[1], floor(t / p[0]));
    case L::K_EXP:
      return pow(p[0], t);
    case L::K_LINEAR:
      return p[0] + (p[1] - p[0]) * py_min(t, p[2]) / p[2];
    case L::K_POLY:
      return p[2] + (1.0 - p[2]) * pow(1.0 - py_min(t, p[0]) / p[0], p[1]);
    case L::K_COSINE:
      return cosine_factor(p[1], py_min(t, p[0]), p[0]);
    case L::K_COSINE_RESTARTS: {
      double length = p[0];
      if (p[1] == 1.0) {
        t = fmod(t, length);
      } else {
        while (t >= length) {
          t -= length;
          length *= p[1];
        }
      }
      return cosine_factor(p[2], t, length);
    }
    case L::K_CYCLIC: {
      const double size = p[1] + p[2];
      const double ratio = p[1] / size;
      const double cycle = floor(1.0 + t / size);
      const double x = 1.0 + t / size - cycle;
      const double scale = x <= ratio ? x / ratio : (x - 1.0) / (ratio - 1.0);
      const int mode = static_cast<int>(p[3]);
      const double amp = mode == 0 ? 1.0 : (mode == 1 ? pow(0.5, cycle - 1.0) : pow(p[4], t));
      return 1.0 + (p[0] - 1.0) * scale * amp;
    }
    case L::K_ONECYCLE: {
      t = py_min(t, p[0] - 1.0);
      const double up_end = p[1] * p[0] - 1.0;
      const double low = 1.0 / p[2], fin = 1.0 / (p[2] * p[3]);
      double pct, a, b;
      if (t <= up_end) {
        pct = t / up_end; a = low; b = 1.0;
      } else {
        pct = (t - up_end) / (p[0] - 1.0 - up_end); a = 1.0; b = fin;
      }
      if (p[4] == 0.0) return b + (a - b) / 2.0 * (cos(PI * pct) + 1.0);
      return (b - a) * pct + a;
    }
    case L::K_INVTIME:
      return pow(1.0 + p[0] * t / p[1], -p[2]);
    case L::K_INVSQRT:
      return t < p[0] ? t / p[0] : sqrt(p[0] / t);
    case L::K_POWERLAW:
      return pow(p[0], pow(py_min(t, p[2]) / p[2], p[1]));
    default:
      return NAN;
  }
}

// ---------------------------------------------------------------------------- step-wide scalars
// GradScaler's reciprocal: computed in float64, then rounded to float32.
FLR_HD float unscale_factor(float grad_scale) { return static_cast<float>(1.0 / static_cast<double>(grad_scale)); }

FLR_HD float inv_scale_of(const float* grad_scale) {
  return grad_scale == nullptr ? 1.0f : unscale_factor(*grad_scale);
}

// clip_grad_norm_'s coefficient in the norm's dtype N: (1/(N + NORM_EPS)) * C, clamped at 1
// (torch evaluates C / tensor as reciprocal times C); NaN passes through as in torch.clamp.
template <typename N>
FLR_HD N clip_coef(N norm, double max_norm) {
  const N c = (N(1) / (norm + N(L::NORM_EPS))) * N(max_norm);
  return c > N(1) ? N(1) : c;
}

// ---------------------------------------------------------------------------- prepare
// What the prepare stage reads (device addresses in the kernels, host ones in the twin).
struct PrepareArgs {
  const int64_t* table;   // (n_tensors, TENSOR_COLS)
  int64_t n_tensors;
  const double* hyper;    // (G, HYPER_COLS)
  const double* sched;    // (G, MAX_SEGMENTS, SEGMENT_COLS)
  const int64_t* lr32;    // (G,): address of the group's float32 lr tensor, 0 for none
  const int64_t* lr64;    // (G,): likewise for float64 lr tensors
  const float* clocks;    // (G,): each group's schedule position k
  const void* norm;       // the step's global gradient norm; null when it was not computed
  bool norm_is_double;
  bool clip_by_norm;      // global-norm clipping at max_norm (else the norm only feeds the rate)
  double max_norm;
  double rate_power;      // the gradient-norm rate (N + rate_eps)^-rate_power; power 0: off
  double rate_eps;
  const float* grad_scale;  // null without a GradScaler
  const float* found_inf;   // null: the step is never skipped
  double* scratch;          // (n_tensors + 1, COEF_COLS), written here
};

// Scratch row t: tensor t's scalars for this step; row n_tensors: the step-wide ones. Reads the
// clocks and step counts without changing them (the increment stage advances them once every
// update has run).
FLR_HD void prepare_row(const PrepareArgs& a, int64_t t) {
  double* out = a.scratch + t * L::COEF_COLS;
  if (t == a.n_tensors) {
    double coef = 1.0;
    if (a.norm != nullptr && a.clip_by_norm) {
      coef = a.norm_is_double ? clip_coef<double>(*static_cast<const double*>(a.norm), a.max_norm)
                              : static_cast<double>(clip_coef<float>(*static_cast<const float*>(a.norm), a.max_norm));
    }
    out[L::W_CLIP_COEF] = coef;
    out[L::W_INV_SCALE] = static_cast<double>(inv_scale_of(a.grad_scale));
    out[L::W_GO] = a.found_inf != nullptr && *a.found_inf != 0.0f ? 0.0 : 1.0;
    return;
  }
  const int64_t* row = a.table + t * L::TENSOR_COLS;
  const int64_t g = row[L::T_GROUP];
  const double* h = a.hyper + g * L::HYPER_COLS;
  double base = h[L::H_LR];  // the kernel lr: base lr x host scale, or the host scale of a tensor lr
  if (a.lr32[g] != 0) base *= static_cast<double>(*reinterpret_cast<const float*>(a.lr32[g]));
  if (a.lr64[g] != 0) base *= *reinterpret_cast<const double*>(a.lr64[g]);
  double rate = 1.0;
  if (a.norm != nullptr && a.rate_power != 0.0) {
    const double n = a.norm_is_double ? *static_cast<const double*>(a.norm)
                                      : static_cast<double>(*static_cast<const float*>(a.norm));
    rate = pow(n + a.rate_eps, -a.rate_power);
  }
  const double lr = base * eval_table(a.sched + g * L::MAX_SEGMENTS * L::SEGMENT_COLS,
                                      static_cast<double>(a.clocks[g])) * rate;
  out[L::C_LR] = lr;
  out[L::C_DECAY] = 1.0 - lr * h[L::H_WEIGHT_DECAY];
  out[L::C_INIT] = *reinterpret_cast<const float*>(row[L::T_STEP]) == 0.0f ? 1.0 : 0.0;
  // SGD's coefficients do not depend on the step: its hyper columns as they are
  for (int j = 0; j < L::RULE_COLS; ++j) out[L::C_C0 + j] = h[L::H_R0 + j];
}

// After every update of the step (stream order): tensor i's step count and group i's clock + 1,
// unless the step was skipped.
FLR_HD void increment_row(const int64_t* table, int64_t n_tensors, float* clocks, int64_t n_groups,
                          const double* scratch, int64_t i) {
  if (scratch[n_tensors * L::COEF_COLS + L::W_GO] == 0.0) return;
  if (i < n_tensors) *reinterpret_cast<float*>(table[i * L::TENSOR_COLS + L::T_STEP]) += 1.0f;
  if (i < n_groups) clocks[i] += 1.0f;
}

// ---------------------------------------------------------------------------- blocks
// Block `block` (numbered across every dtype bucket) covers elements [begin, end) of row `row`:
// chunk (block - first chunk of the row) of CHUNK elements. `blocks` maps blocks to rows (built
// on the host once per plan), so no thread searches for its tensor.
struct Range {
  int64_t row, begin, end;
};

FLR_HD Range block_range(const int64_t* table, const int32_t* blocks, int64_t block, int64_t chunk) {
  Range r;
  r.row = blocks[block];
  const int64_t* row = table + r.row * L::TENSOR_COLS;
  r.begin = (block - row[L::T_FIRST_CHUNK]) * chunk;
  const int64_t stop = r.begin + chunk;
  r.end = stop < row[L::T_NUMEL] ? stop : row[L::T_NUMEL];
  return r;
}

// 16 bytes of T: one vector load or store where the row's addresses are 16-byte aligned.
template <typename T>
struct alignas(16) Pack {
  static constexpr int size = 16 / sizeof(T);
  T v[size];
};

// 16-byte loads and stores as global-memory instructions (the table's addresses are generic
// pointers to the compiler); L2-cached only: each element is touched once per step.
template <typename T>
FLR_HD Pack<T> load_pack(const Pack<T>* p) {
#if defined(__CUDA_ARCH__)
  const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(p));
  Pack<T> out;
  memcpy(&out, &raw, sizeof out);
  return out;
#else
  return *p;
#endif
}

template <typename T>
FLR_HD void store_pack(Pack<T>* p, const Pack<T>& v) {
#if defined(__CUDA_ARCH__)
  uint4 raw;
  memcpy(&raw, &v, sizeof raw);
  __stcg(reinterpret_cast<uint4*>(p), raw);
#else
  *p = v;
#endif
}

// Math type of an element type: float for float32/bfloat16/float16, double for float64.
template <typename T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };

// Independent 16-byte loads in flight per array and thread: two for 4- and 8-byte types; one for
// 2-byte types, whose eight elements a pack widens to float already fill the registers.
template <typename T>
struct Unroll {
  static constexpr int value = sizeof(T) >= 4 ? 2 : 1;
};

// ---------------------------------------------------------------------------- per element
// Everything one tensor's elements need, in the math type M, rounded as torch rounds a Python
// scalar for a tensor of that dtype.
template <typename M>
struct Coefs {
  M inv_scale, clip_value, coef, decay_mul, wd, momentum, one_minus_damp, neg_lr;
  bool maximize, has_clip_value, decoupled, coupled, has_momentum, init_buf, nesterov;
};

// What the norm pass needs: unscale and value clipping (maximize flips a sign, and value clipping
// is symmetric: neither changes a square).
template <typename M>
FLR_HD Coefs<M> norm_coefs(const float* grad_scale, bool has_clip_value, double clip_value) {
  Coefs<M> c{};
  c.inv_scale = M(inv_scale_of(grad_scale));
  c.has_clip_value = has_clip_value;
  c.clip_value = M(clip_value);
  return c;
}

// A tensor's coefficients for SGD from its scratch row, the step-wide row and its group's hyper row.
template <typename M>
FLR_HD Coefs<M> sgd_coefs(const double* coef_row, const double* wide, const double* hyper_row, bool has_clip_value,
                          double clip_value) {
  Coefs<M> c;
  const int flags = static_cast<int>(hyper_row[L::H_FLAGS]);
  const double wd = hyper_row[L::H_WEIGHT_DECAY], mom = coef_row[L::C_C0];
  c.inv_scale = M(wide[L::W_INV_SCALE]);
  c.maximize = (flags & L::F_MAXIMIZE) != 0;
  c.has_clip_value = has_clip_value;
  c.clip_value = M(clip_value);
  c.coef = M(wide[L::W_CLIP_COEF]);
  c.decoupled = wd != 0.0 && (flags & L::F_DECOUPLED) != 0;
  c.coupled = wd != 0.0 && (flags & L::F_DECOUPLED) == 0;
  c.decay_mul = M(coef_row[L::C_DECAY]);
  c.wd = M(wd);
  c.has_momentum = mom != 0.0;
  c.init_buf = coef_row[L::C_INIT] != 0.0;
  c.nesterov = (flags & L::F_NESTEROV) != 0;
  c.momentum = M(mom);
  c.one_minus_damp = M(coef_row[L::C_C0 + 1]);
  c.neg_lr = M(-coef_row[L::C_LR]);
  return c;
}

// docs/step.md steps 0-2: unscale, maximize, value clipping (NaN passes through, as torch.clamp).
template <typename M>
FLR_HD M processed_grad(M g, const Coefs<M>& c) {
  g = g * c.inv_scale;
  if (c.maximize) g = -g;
  if (c.has_clip_value) g = g < -c.clip_value ? -c.clip_value : (g > c.clip_value ? c.clip_value : g);
  return g;
}

// docs/step.md steps 0-7 for one element with the SGD rule: updates p and (with momentum) buf.
// The clip coefficient is 1 when global-norm clipping is off (a multiplication by 1 is exact).
template <typename M>
FLR_HD void sgd_element(M& p, M g, M& buf, const Coefs<M>& c) {
  g = processed_grad(g, c) * c.coef;
  if (c.decoupled) p = p * c.decay_mul;
  if (c.coupled) g = g + c.wd * p;
  M d = g;
  if (c.has_momentum) {
    buf = c.init_buf ? g : buf * c.momentum + c.one_minus_damp * g;
    d = c.nesterov ? g + c.momentum * buf : buf;
  }
  p = p + c.neg_lr * d;
}

// ---------------------------------------------------------------------------- per thread
// Thread `tid` of `threads` takes elements tid, tid + threads, ... of [begin, end): in 16-byte
// packs when `aligned` (a chunk starts on a pack boundary, as CHUNK is a multiple of every
// pack size), then one by one for the tail that does not fill a pack.

// Sum of squares of the processed gradients this thread takes, in float64.
template <typename T>
FLR_HD double norm_thread(const T* __restrict__ g, int64_t begin, int64_t end, bool aligned, int tid, int threads,
                          const Coefs<typename MathOf<T>::type>& c) {
  using M = typename MathOf<T>::type;
  using P = Pack<T>;
  constexpr int UNROLL = Unroll<T>::value;
  double acc = 0.0;
  int64_t tail = begin;
  if (aligned) {
    const int64_t n = (end - begin) / P::size;
    const P* gp = reinterpret_cast<const P*>(g + begin);
    for (int64_t k0 = tid; k0 < n; k0 += int64_t{threads} * UNROLL) {
      P gv[UNROLL];
      FLR_UNROLL
      for (int u = 0; u < UNROLL; ++u) {
        if (k0 + u * threads < n) gv[u] = load_pack(gp + k0 + u * threads);
      }
      FLR_UNROLL
      for (int u = 0; u < UNROLL; ++u) {
        if (k0 + u * threads >= n) continue;
        FLR_UNROLL
        for (int j = 0; j < P::size; ++j) {
          const double x = static_cast<double>(processed_grad(static_cast<M>(gv[u].v[j]), c));
          acc += x * x;
        }
      }
    }
    tail = begin + n * P::size;
  }
  for (int64_t i = tail + tid; i < end; i += threads) {
    const double x = static_cast<double>(processed_grad(static_cast<M>(g[i]), c));
    acc += x * x;
  }
  return acc;
}

// One element of the update through T's memory: read, sgd_element in M, write back.
template <typename T>
FLR_HD void sgd_stored(T& p, T g, T& b, const Coefs<typename MathOf<T>::type>& c) {
  using M = typename MathOf<T>::type;
  M pm = static_cast<M>(p);
  M bm = c.has_momentum && !c.init_buf ? static_cast<M>(b) : M(0);
  sgd_element(pm, static_cast<M>(g), bm, c);
  p = T(pm);
  if (c.has_momentum) b = T(bm);
}

// The SGD update of the elements this thread takes (b: the momentum buffer, unused without momentum).
template <typename T>
FLR_HD void sgd_thread(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ b, int64_t begin, int64_t end,
                       bool aligned, int tid, int threads, const Coefs<typename MathOf<T>::type>& c) {
  using P = Pack<T>;
  constexpr int UNROLL = Unroll<T>::value;
  const bool read_b = c.has_momentum && !c.init_buf;  // a first use overwrites the buffer unread
  int64_t tail = begin;
  if (aligned) {
    const int64_t n = (end - begin) / P::size;
    P* pp = reinterpret_cast<P*>(p + begin);
    const P* gp = reinterpret_cast<const P*>(g + begin);
    P* bp = c.has_momentum ? reinterpret_cast<P*>(b + begin) : nullptr;
    for (int64_t k0 = tid; k0 < n; k0 += int64_t{threads} * UNROLL) {
      P pv[UNROLL], gv[UNROLL], bv[UNROLL] = {};
      FLR_UNROLL
      for (int u = 0; u < UNROLL; ++u) {
        const int64_t k = k0 + u * threads;
        if (k >= n) continue;
        pv[u] = load_pack(pp + k);
        gv[u] = load_pack(gp + k);
        if (read_b) bv[u] = load_pack(bp + k);
      }
      FLR_UNROLL
      for (int u = 0; u < UNROLL; ++u) {
        const int64_t k = k0 + u * threads;
        if (k >= n) continue;
        FLR_UNROLL
        for (int j = 0; j < P::size; ++j) sgd_stored(pv[u].v[j], gv[u].v[j], bv[u].v[j], c);
        store_pack(pp + k, pv[u]);
        if (c.has_momentum) store_pack(bp + k, bv[u]);
      }
    }
    tail = begin + n * P::size;
  }
  T unused{};
  for (int64_t i = tail + tid; i < end; i += threads) sgd_stored(p[i], g[i], c.has_momentum ? b[i] : unused, c);
}


// ---------------------------------------------------------------------------- per block
// Everything one thread of a kernel block does, so the kernels and the host twin run the same
// code: the kernel calls these with its thread index, the twin with every index in turn.

// What the norm pass reads.
struct NormArgs {
  const int64_t* table;
  const int32_t* blocks;
  const float* grad_scale;  // null without a GradScaler
  bool has_clip_value;
  double clip_value;
};

// Thread tid's sum of squares for block `block` (the block then sums its threads').
template <typename T>
FLR_HD double norm_block(const NormArgs& a, int64_t block, int64_t chunk, int tid, int threads) {
  const Range r = block_range(a.table, a.blocks, block, chunk);
  const int64_t* row = a.table + r.row * L::TENSOR_COLS;
  const auto c = norm_coefs<typename MathOf<T>::type>(a.grad_scale, a.has_clip_value, a.clip_value);
  return norm_thread(reinterpret_cast<const T*>(row[L::T_GRAD]), r.begin, r.end, row[L::T_ALIGNED] != 0, tid,
                     threads, c);
}

// What the update reads: the prepare stage's scratch instead of any schedule math.
struct UpdateArgs {
  const int64_t* table;
  const int32_t* blocks;
  int64_t n_tensors;
  const double* hyper;
  const double* scratch;
  bool has_clip_value;
  double clip_value;
};

// Thread tid's share of block `block` of the SGD update.
template <typename T>
FLR_HD void sgd_block(const UpdateArgs& a, int64_t block, int64_t chunk, int tid, int threads) {
  const double* wide = a.scratch + a.n_tensors * L::COEF_COLS;
  if (wide[L::W_GO] == 0.0) return;  // found_inf: the step changes nothing
  const Range r = block_range(a.table, a.blocks, block, chunk);
  const int64_t* row = a.table + r.row * L::TENSOR_COLS;
  const auto c = sgd_coefs<typename MathOf<T>::type>(a.scratch + r.row * L::COEF_COLS, wide,
                                                      a.hyper + row[L::T_GROUP] * L::HYPER_COLS, a.has_clip_value,
                                                      a.clip_value);
  sgd_thread(reinterpret_cast<T*>(row[L::T_PARAM]), reinterpret_cast<const T*>(row[L::T_GRAD]),
             reinterpret_cast<T*>(row[L::T_STATE0]), r.begin, r.end, row[L::T_ALIGNED] != 0, tid, threads, c);
}

}  // namespace flr
