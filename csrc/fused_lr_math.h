// The per-element math of the fused step, shared by the CUDA kernels (kernels.cu) and the host
// test (csrc/tests/host_math.cpp, driven by tests/test_cuda_host.py), so that CI without a GPU
// still checks every formula against the Python reference.
//
// Everything here mirrors Python operation for operation:
//   eval_table       fused_lr.schedules.eval_table
//   make_coefs,
//   processed_grad,
//   update_element   fused_lr.reference (ReferenceBackend.update / processed_grad / clip_coef)
//   locate_tensor,
//   chunk_range      the chunk numbering cuda_backend.chunk_layout builds
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FLR_HD __host__ __device__ __forceinline__
#else
#define FLR_HD inline
#endif

namespace flr {

// ---------------------------------------------------------------------------- schedule tables
// Layout and kind codes: fused_lr/schedules.py (MAX_SEGMENTS rows of [start, kind, p0..p5]).
constexpr int MAX_SEGMENTS = 16;
constexpr int ROW = 8;
enum Kind : int {
  CONST = 0, STEP, EXP, LINEAR, POLY, COSINE, COSINE_RESTARTS, CYCLIC, ONECYCLE, INVTIME, INVSQRT, POWERLAW
};
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
  for (int i = 0; i < MAX_SEGMENTS; ++i) {
    if (table[i * ROW] <= k) row = i;
  }
  const double* r = table + row * ROW;
  const double start = r[0];
  const int kind = static_cast<int>(r[1]);
  const double* p = r + 2;
  double t = k - start;
  switch (kind) {
    case CONST:
      return p[0];
    case STEP:
      return pow(p[1], floor(t / p[0]));
    case EXP:
      return pow(p[0], t);
    case LINEAR:
      return p[0] + (p[1] - p[0]) * py_min(t, p[2]) / p[2];
    case POLY:
      return p[2] + (1.0 - p[2]) * pow(1.0 - py_min(t, p[0]) / p[0], p[1]);
    case COSINE:
      return cosine_factor(p[1], py_min(t, p[0]), p[0]);
    case COSINE_RESTARTS: {
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
    case CYCLIC: {
      const double size = p[1] + p[2];
      const double ratio = p[1] / size;
      const double cycle = floor(1.0 + t / size);
      const double x = 1.0 + t / size - cycle;
      const double scale = x <= ratio ? x / ratio : (x - 1.0) / (ratio - 1.0);
      const int mode = static_cast<int>(p[3]);
      const double amp = mode == 0 ? 1.0 : (mode == 1 ? pow(0.5, cycle - 1.0) : pow(p[4], t));
      return 1.0 + (p[0] - 1.0) * scale * amp;
    }
    case ONECYCLE: {
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
    case INVTIME:
      return pow(1.0 + p[0] * t / p[1], -p[2]);
    case INVSQRT:
      return t < p[0] ? t / p[0] : sqrt(p[0] / t);
    case POWERLAW:
      return pow(p[0], pow(py_min(t, p[2]) / p[2], p[1]));
    default:
      return NAN;
  }
}

// ---------------------------------------------------------------------------- per-group hyper-parameters
// One row of float64 per param group, written by cuda_backend.py.
enum HyperCol : int { H_KERNEL_LR = 0, H_MOMENTUM, H_DAMPENING, H_WEIGHT_DECAY, H_FLAGS, HYPER_COLS = 8 };
enum GroupFlag : int { G_NESTEROV = 1, G_DECOUPLED = 2, G_MAXIMIZE = 4 };

// Optimizer-wide settings of one step (kernel arguments).
struct StepArgs {
  double max_norm;     // used when has_norm
  double clip_value;   // used when has_clip_value
  bool has_norm;       // global-norm clipping on: a norm pointer is given
  bool norm_is_double;
  bool has_clip_value;
};

// Everything one tensor's elements need, in the math type M (float for f32/bf16/fp16).
template <typename M>
struct Coefs {
  M inv_scale;  // 1/grad_scale as GradScaler.unscale_ rounds it, 1 without a scaler
  M clip_value;
  M coef;       // global-norm clip coefficient
  M decay_mul;  // decoupled decay factor 1 - lr*wd
  M wd;
  M momentum;
  M one_minus_damp;
  M neg_lr;
  bool maximize, has_clip_value, has_coef, decoupled, coupled, has_momentum, init_buf, nesterov;
};

// GradScaler's reciprocal: computed in float64, then rounded to float32.
FLR_HD float unscale_factor(float grad_scale) { return static_cast<float>(1.0 / static_cast<double>(grad_scale)); }

// clip_grad_norm_'s coefficient in the norm's dtype N: (1/(N + 1e-6)) * C, clamped at 1
// (torch evaluates C / tensor as reciprocal times C); NaN passes through as in torch.clamp.
template <typename N>
FLR_HD N clip_coef(N norm, double max_norm) {
  const N c = (N(1) / (norm + N(1e-6))) * N(max_norm);
  return c > N(1) ? N(1) : c;
}

// Per-tensor coefficients. hyper: the group's row; table: its schedule table; k: the tensor's
// step count; fresh: its momentum buffer was just created; inv_scale: unscale_factor(..) or 1;
// norm: the global norm (read as double; rounded back to float when norm_is_double is false).
template <typename M>
FLR_HD Coefs<M> make_coefs(const double* hyper, const double* table, float k, bool fresh, float inv_scale,
                           double norm, const StepArgs& s) {
  Coefs<M> c;
  const int flags = static_cast<int>(hyper[H_FLAGS]);
  const double lr = hyper[H_KERNEL_LR] * eval_table(table, static_cast<double>(k));
  const double wd = hyper[H_WEIGHT_DECAY], mom = hyper[H_MOMENTUM];
  c.inv_scale = M(inv_scale);
  c.maximize = (flags & G_MAXIMIZE) != 0;
  c.has_clip_value = s.has_clip_value;
  c.clip_value = M(s.clip_value);
  c.has_coef = s.has_norm;
  c.coef = s.norm_is_double ? M(clip_coef<double>(norm, s.max_norm))
                            : M(clip_coef<float>(static_cast<float>(norm), s.max_norm));
  c.decoupled = wd != 0.0 && (flags & G_DECOUPLED) != 0;
  c.coupled = wd != 0.0 && (flags & G_DECOUPLED) == 0;
  c.decay_mul = M(1.0 - lr * wd);
  c.wd = M(wd);
  c.has_momentum = mom != 0.0;
  c.init_buf = k == 0.0f || fresh;
  c.nesterov = (flags & G_NESTEROV) != 0;
  c.momentum = M(mom);
  c.one_minus_damp = M(1.0 - hyper[H_DAMPENING]);
  c.neg_lr = M(-lr);
  return c;
}

// SPEC steps 0-2: unscale, maximize, value clipping (NaN passes through, as torch.clamp).
template <typename M>
FLR_HD M processed_grad(M g, const Coefs<M>& c) {
  g = g * c.inv_scale;
  if (c.maximize) g = -g;
  if (c.has_clip_value) g = g < -c.clip_value ? -c.clip_value : (g > c.clip_value ? c.clip_value : g);
  return g;
}

// SPEC steps 0-7 for one element: updates p and (with momentum) buf in place.
template <typename M>
FLR_HD void update_element(M& p, M g, M& buf, const Coefs<M>& c) {
  g = processed_grad(g, c);
  if (c.has_coef) g = g * c.coef;
  if (c.decoupled) p = p * c.decay_mul;
  if (c.coupled) g = g + c.wd * p;
  M d = g;
  if (c.has_momentum) {
    buf = c.init_buf ? g : buf * c.momentum + c.one_minus_damp * g;
    d = c.nesterov ? g + c.momentum * buf : buf;
  }
  p = p + c.neg_lr * d;
}

// ---------------------------------------------------------------------------- tensor table and chunks
// One int64 row per tensor, written by cuda_backend.py. Tensor i owns the consecutive chunks
// [first_chunk(i), first_chunk(i) + ceil(numel/chunk_size)); every chunk is one thread block.
enum TableCol : int { T_PARAM = 0, T_GRAD, T_BUF, T_STEP, T_NUMEL, T_FIRST_CHUNK, T_GROUP, T_FRESH, TABLE_COLS = 8 };

// The tensor owning `chunk`: the last row with first_chunk <= chunk. Empty tensors share their
// first_chunk with the next row, so the search passes over them.
FLR_HD int locate_tensor(const int64_t* table, int n_tensors, int64_t chunk) {
  int lo = 0, hi = n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[static_cast<int64_t>(mid) * TABLE_COLS + T_FIRST_CHUNK] <= chunk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Element range [begin, end) of `chunk` within the tensor at `row`.
FLR_HD void chunk_range(const int64_t* row, int64_t chunk, int64_t chunk_size, int64_t* begin, int64_t* end) {
  *begin = (chunk - row[T_FIRST_CHUNK]) * chunk_size;
  const int64_t stop = *begin + chunk_size;
  *end = stop < row[T_NUMEL] ? stop : row[T_NUMEL];
}

}  // namespace flr
