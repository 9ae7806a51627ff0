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
//                         first use (step count == 0), the rule's coefficients (Adam's bias
//                         corrections, Adagrad's lr decay); its last row: clip coefficient
//                         (fused_lr.backends.reference.clip_coef), 1/grad_scale
//                         (torch.amp.GradScaler.unscale_), go (found_inf unset)
//   processed_grad,
//   common_steps          fused_lr.backends.reference (processed_grad, ReferenceBackend.update): steps 0-5
//   sgd_element,          the reference_rule of fused_lr.optim.sgd.FusedSGD,
//   adam_element,         fused_lr.optim.adam.FusedAdam,
//   rmsprop_element,      fused_lr.optim.rmsprop.FusedRMSprop
//   adagrad_element       and fused_lr.optim.adagrad.FusedAdagrad (docs/step.md, "Beyond SGD"), each
//                         torch op's rounding kept (one rounding per op, scalars rounded to the math
//                         type first, as torch rounds a Python number for a tensor of that dtype)
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fused_lr_layout.h"

#if defined(__CUDACC__)
#define FLR_HD __host__ __device__ __forceinline__
#define FLR_HD_CALL inline __host__ __device__ __noinline__
#define FLR_UNROLL _Pragma("unroll")
#else
#define FLR_HD inline
#define FLR_HD_CALL inline
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
  void* norm;             // the step's global gradient norm; null when it was not computed
  bool norm_is_double;
  // the norm's per-block partial sums when prepare is to finish it (sqrt of their sum, written to
  // *norm before any row reads it); null when *norm is already final
  const double* partials;
  int64_t n_partials;
  bool clip_by_norm;      // global-norm clipping at max_norm (else the norm only feeds the rate)
  double max_norm;
  double rate_power;      // the gradient-norm rate (N + rate_eps)^-rate_power; power 0: off
  double rate_eps;
  const float* grad_scale;  // null without a GradScaler
  const float* found_inf;   // null: the step is never skipped
  double* scratch;          // (n_tensors + 1, COEF_COLS), written here
  int64_t program;          // the rule's coefficient program (fused_lr/core/layout.py, program)
};

// The rule's coefficients of one tensor into out[C_LR] and out[C0..C4] by its coefficient program
// (fused_lr/core/layout.py, program: the optimizer declares it), from its group's rule columns r
// (fused_lr/optim/*.py rule_row), the scheduled lr and the tensor's step count before this update
// (t = step + 1 after it). In float64, as the reference computes its Python scalars; the update
// rounds each to the math type, as torch rounds a Python number for a tensor. SQRT_BIAS is the
// reference's (1 - b^t) ** 0.5 as sqrt: correctly rounded on host and device alike. A kind without
// a formula here gives NaN, never another kind's value.
// A call on the device: inlined into prepare_row, its pow calls made ptxas spill around the
// schedule's (nvcc -Xptxas -v).
FLR_HD_CALL void rule_coefs(int64_t program, const double* r, double lr, double step, double* out) {
  constexpr int64_t SLOT = (int64_t{1} << L::PROGRAM_BITS) - 1;
  const double t = step + 1.0;
  const int64_t lr_code = program & SLOT;
  const double rl = r[lr_code & 7];
  switch (lr_code >> 3) {
    case L::LRK_PLAIN: out[L::C_LR] = lr; break;
    case L::LRK_BIAS: out[L::C_LR] = lr / (1.0 - pow(rl, t)); break;
    case L::LRK_DECAY: out[L::C_LR] = lr / (1.0 + step * rl); break;  // step = t - 1 earlier updates
    default: out[L::C_LR] = NAN;
  }
  for (int i = 0; i < L::RULE_COLS; ++i) {
    const int64_t code = (program >> (L::PROGRAM_BITS * (i + 1))) & SLOT;
    const double rj = r[code & 7];
    double c;
    switch (code >> 3) {
      case L::CK_ZERO: c = 0.0; break;
      case L::CK_COPY: c = rj; break;
      case L::CK_ONE_MINUS: c = 1.0 - rj; break;
      case L::CK_SQRT_BIAS: c = sqrt(1.0 - pow(rj, t)); break;
      default: c = NAN;
    }
    out[L::C_C0 + i] = c;
  }
}

// Scratch row t: tensor t's scalars for this step; row n_tensors: the step-wide ones. Reads the
// clocks and step counts without changing them (increment_row advances them once every row has
// read them).
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
  const double step = static_cast<double>(*reinterpret_cast<const float*>(row[L::T_STEP]));
  out[L::C_DECAY] = 1.0 - lr * h[L::H_WEIGHT_DECAY];  // with the scheduled lr, whatever the rule
  out[L::C_INIT] = step == 0.0 ? 1.0 : 0.0;
  rule_coefs(a.program, h + L::H_R0, lr, step, out);
}

// In prepare, once every row has been prepared (the update reads only the scratch): tensor i's
// step count and group i's clock + 1, unless the step was skipped.
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

// Independent 16-byte loads in flight per array and thread, for a loop over ARRAYS arrays: two
// for 4- and 8-byte types over at most three arrays (the norm; SGD, RMSprop without momentum or
// centering, Adagrad); one for 2-byte types, whose eight elements a pack widens to float already
// fill the registers, and for four or five arrays (Adam, RMSprop with momentum or centering):
// their four or five loads are about as many in flight as SGD's six, and two packs of each spill
// float64 registers under two blocks per SM (nvcc -Xptxas -v).
template <typename T, int ARRAYS>
struct Unroll {
  static constexpr int value = sizeof(T) >= 4 && ARRAYS <= 3 ? 2 : 1;
};

// ---------------------------------------------------------------------------- per element
// docs/step.md steps 0-5 for one tensor's elements in the math type M, every scalar rounded to M
// as torch rounds a Python number for a tensor of that dtype.
template <typename M>
struct Common {
  M inv_scale, clip_value, coef, decay_mul, wd;
  bool maximize, has_clip_value, decoupled, coupled;
};

// What the norm pass needs: unscale and value clipping (maximize flips a sign, and value clipping
// is symmetric: neither changes a square).
template <typename M>
FLR_HD Common<M> norm_common(const float* grad_scale, bool has_clip_value, double clip_value) {
  Common<M> c{};
  c.inv_scale = M(inv_scale_of(grad_scale));
  c.has_clip_value = has_clip_value;
  c.clip_value = M(clip_value);
  return c;
}

// A tensor's steps 0-5 from its scratch row, the step-wide row and its group's hyper row.
template <typename M>
FLR_HD Common<M> common_coefs(const double* coef_row, const double* wide, const double* hyper_row,
                              bool has_clip_value, double clip_value) {
  Common<M> c;
  const int flags = static_cast<int>(hyper_row[L::H_FLAGS]);
  const double wd = hyper_row[L::H_WEIGHT_DECAY];
  c.inv_scale = M(wide[L::W_INV_SCALE]);
  c.clip_value = M(clip_value);
  c.coef = M(wide[L::W_CLIP_COEF]);
  c.decay_mul = M(coef_row[L::C_DECAY]);
  c.wd = M(wd);
  c.maximize = (flags & L::F_MAXIMIZE) != 0;
  c.has_clip_value = has_clip_value;
  c.decoupled = wd != 0.0 && (flags & L::F_DECOUPLED) != 0;
  c.coupled = wd != 0.0 && (flags & L::F_DECOUPLED) == 0;
  return c;
}

// docs/step.md steps 0-2: unscale, maximize, value clipping (NaN passes through, as torch.clamp).
template <typename M>
FLR_HD M processed_grad(M g, const Common<M>& c) {
  g = g * c.inv_scale;
  if (c.maximize) g = -g;
  if (c.has_clip_value) g = g < -c.clip_value ? -c.clip_value : (g > c.clip_value ? c.clip_value : g);
  return g;
}

// Steps 0-5: the gradient the rule sees (times the clip coefficient, 1 when global-norm clipping
// is off: a multiplication by 1 is exact; plus wd x p for coupled decay), p decayed when decoupled.
template <typename M>
FLR_HD M common_steps(M& p, M g, const Common<M>& c) {
  g = processed_grad(g, c) * c.coef;
  if (c.decoupled) p = p * c.decay_mul;
  if (c.coupled) g = g + c.wd * p;
  return g;
}

FLR_HD float root(float x) { return sqrtf(x); }
FLR_HD double root(double x) { return sqrt(x); }

// torch.lerp(a, b, w): two formulas, chosen by the weight as torch chooses them.
template <typename M>
FLR_HD M lerp(M a, M b, M w) {
  return (w < M(0) ? -w : w) < M(0.5) ? a + w * (b - a) : b - (b - a) * (M(1) - w);
}

// torch.maximum(a, b): NaN when either is, else std::max(a, b).
template <typename M>
FLR_HD M maximum(M a, M b) {
  return a < b || b != b ? b : a;
}

// Steps 6-7 of each rule on one element, g the output of common_steps. Each rule's scalars come
// from the prepare stage (rule_coefs), rounded to M.

// SGD: momentum b <- g on first use, else mu b + (1 - dampening) g; direction g + mu b with
// nesterov, else b; without momentum g.
template <typename M>
struct SgdCoefs {
  M neg_lr, momentum, one_minus_damp;
  bool first, nesterov;
};

template <typename M>
FLR_HD SgdCoefs<M> sgd_coefs(const double* coef_row, int flags) {
  const double* c = coef_row + L::C_C0;
  return {M(-coef_row[L::C_LR]), M(c[0]), M(c[1]), coef_row[L::C_INIT] != 0.0, (flags & L::F_NESTEROV) != 0};
}

template <typename M, bool MOMENTUM>
FLR_HD void sgd_element(M& p, M g, M& b, const SgdCoefs<M>& c) {
  M d = g;
  if (MOMENTUM) {
    b = c.first ? g : b * c.momentum + c.one_minus_damp * g;
    d = c.nesterov ? g + c.momentum * b : b;
  }
  p = p + c.neg_lr * d;
}

// Adam: m <- lerp(m, g, 1 - b1), v <- b2 v + (1 - b2) g^2, amsgrad vmax <- max(vmax, v) used for v,
// p <- p - step m / (sqrt(v) / sqrt(1 - b2^t) + eps), step = lr / (1 - b1^t).
template <typename M>
struct AdamCoefs {
  M neg_step, w1, b2, w2, bc2, eps;
};

template <typename M>
FLR_HD AdamCoefs<M> adam_coefs(const double* coef_row) {
  const double* c = coef_row + L::C_C0;
  return {M(-coef_row[L::C_LR]), M(c[0]), M(c[1]), M(c[2]), M(c[3]), M(c[4])};
}

template <typename M, bool AMSGRAD>
FLR_HD void adam_element(M& p, M g, M& m, M& v, M& vmax, const AdamCoefs<M>& c) {
  m = lerp(m, g, c.w1);
  v = v * c.b2 + c.w2 * g * g;
  M u = v;
  if (AMSGRAD) u = vmax = maximum(vmax, v);
  p = p + c.neg_step * m / (root(u) / c.bc2 + c.eps);
}

// RMSprop: s <- alpha s + (1 - alpha) g^2; centered c <- lerp(c, g, 1 - alpha) and
// d = sqrt(s - c^2) + eps, else d = sqrt(s) + eps; momentum b <- mu b + g / d and p <- p - lr b,
// else p <- p - lr g / d.
template <typename M>
struct RmspropCoefs {
  M neg_lr, alpha, w, eps, momentum;
};

template <typename M>
FLR_HD RmspropCoefs<M> rmsprop_coefs(const double* coef_row) {
  const double* c = coef_row + L::C_C0;
  return {M(-coef_row[L::C_LR]), M(c[0]), M(c[1]), M(c[2]), M(c[3])};
}

template <typename M, bool MOMENTUM, bool CENTERED>
FLR_HD void rmsprop_element(M& p, M g, M& s, M& b, M& c, const RmspropCoefs<M>& k) {
  s = s * k.alpha + k.w * g * g;
  M d;
  if (CENTERED) {
    c = lerp(c, g, k.w);
    d = root(s + -c * c) + k.eps;
  } else {
    d = root(s) + k.eps;
  }
  if (MOMENTUM) {
    b = b * k.momentum + g / d;
    p = p + k.neg_lr * b;
  } else {
    p = p + k.neg_lr * g / d;
  }
}

// Adagrad: s <- s + g^2, p <- p - clr g / (sqrt(s) + eps), clr = lr / (1 + (t - 1) lr_decay).
template <typename M>
struct AdagradCoefs {
  M neg_lr, eps;
};

template <typename M>
FLR_HD AdagradCoefs<M> adagrad_coefs(const double* coef_row) {
  return {M(-coef_row[L::C_LR]), M(coef_row[L::C_C0])};
}

template <typename M>
FLR_HD void adagrad_element(M& p, M g, M& s, const AdagradCoefs<M>& k) {
  s = s + g * g;
  p = p + k.neg_lr * g / (root(s) + k.eps);
}

// ---------------------------------------------------------------------------- rules
// A rule as update_thread drives it: STATES state arrays (the row's STATE0... columns, in the
// rule's declaration order: fused_lr/optim/*.py state_names), whether their values are read, and
// steps 0-7 on one element with s[0..STATES) its state values. The variant (momentum, amsgrad,
// centered) is a template parameter, chosen once per block (update_block), never per element.
template <typename M, bool MOMENTUM>
struct SgdRule {
  static constexpr int STATES = MOMENTUM ? 1 : 0;
  Common<M> common;
  SgdCoefs<M> c;
  FLR_HD bool reads_states() const { return !c.first; }  // a first use overwrites the buffer unread
  FLR_HD void operator()(M& p, M g, M* s) const {
    g = common_steps(p, g, common);
    sgd_element<M, MOMENTUM>(p, g, s[0], c);
  }
};

template <typename M, bool AMSGRAD>
struct AdamRule {  // exp_avg, exp_avg_sq, max_exp_avg_sq with amsgrad
  static constexpr int STATES = AMSGRAD ? 3 : 2;
  Common<M> common;
  AdamCoefs<M> c;
  FLR_HD bool reads_states() const { return true; }
  FLR_HD void operator()(M& p, M g, M* s) const {
    g = common_steps(p, g, common);
    adam_element<M, AMSGRAD>(p, g, s[0], s[1], s[AMSGRAD ? 2 : 1], c);
  }
};

template <typename M, bool MOMENTUM, bool CENTERED>
struct RmspropRule {  // square_avg, then momentum_buffer with momentum, then grad_avg when centered
  static constexpr int STATES = 1 + int{MOMENTUM} + int{CENTERED};
  Common<M> common;
  RmspropCoefs<M> c;
  FLR_HD bool reads_states() const { return true; }
  FLR_HD void operator()(M& p, M g, M* s) const {
    g = common_steps(p, g, common);
    rmsprop_element<M, MOMENTUM, CENTERED>(p, g, s[0], s[MOMENTUM ? 1 : 0], s[CENTERED ? STATES - 1 : 0], c);
  }
};

template <typename M>
struct AdagradRule {  // sum
  static constexpr int STATES = 1;
  Common<M> common;
  AdagradCoefs<M> c;
  FLR_HD bool reads_states() const { return true; }
  FLR_HD void operator()(M& p, M g, M* s) const {
    g = common_steps(p, g, common);
    adagrad_element(p, g, s[0], c);
  }
};

// ---------------------------------------------------------------------------- per thread
// Thread `tid` of `threads` takes elements tid, tid + threads, ... of [begin, end): in 16-byte
// packs when `aligned` (a chunk starts on a pack boundary, as CHUNK is a multiple of every
// pack size), then one by one for the tail that does not fill a pack.

// Sum of squares of the processed gradients this thread takes, in float64.
template <typename T>
FLR_HD double norm_thread(const T* __restrict__ g, int64_t begin, int64_t end, bool aligned, int tid, int threads,
                          const Common<typename MathOf<T>::type>& c) {
  using M = typename MathOf<T>::type;
  using P = Pack<T>;
  constexpr int UNROLL = Unroll<T, 1>::value;
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

// The arrays of one row's update: the parameter, its gradient and its state tensors.
template <typename T>
struct Arrays {
  T* p;
  const T* g;
  T* s[L::MAX_STATES];
};

// One element through T's memory: read into M, the rule, each value rounded once to T. s: the
// element's Rule::STATES state values (zeros where the rule reads none).
template <typename T, typename Rule>
FLR_HD void rule_element(T& p, T g, T* s, const Rule& rule) {
  using M = typename MathOf<T>::type;
  constexpr int NS = Rule::STATES;
  M sm[NS > 0 ? NS : 1];
  FLR_UNROLL
  for (int k = 0; k < NS; ++k) sm[k] = static_cast<M>(s[k]);
  M pm = static_cast<M>(p);
  rule(pm, static_cast<M>(g), sm);
  p = T(pm);
  FLR_UNROLL
  for (int k = 0; k < NS; ++k) s[k] = T(sm[k]);
}

// The update of the elements this thread takes.
template <typename T, typename Rule>
FLR_HD void update_thread(const Arrays<T>& x, int64_t begin, int64_t end, bool aligned, int tid, int threads,
                          const Rule& rule) {
  using P = Pack<T>;
  constexpr int NS = Rule::STATES, NSA = NS > 0 ? NS : 1;
  constexpr int UNROLL = Unroll<T, 2 + NS>::value;
  const bool read = rule.reads_states();
  int64_t tail = begin;
  if (aligned) {
    // a block's chunk holds fewer than 2^31 packs: 32-bit indices leave registers to the math
    const int n = static_cast<int>((end - begin) / P::size);
    P* pp = reinterpret_cast<P*>(x.p + begin);
    const P* gp = reinterpret_cast<const P*>(x.g + begin);
    P* sp[NSA] = {};
    FLR_UNROLL
    for (int k = 0; k < NS; ++k) sp[k] = reinterpret_cast<P*>(x.s[k] + begin);
    for (int k0 = tid; k0 < n; k0 += threads * UNROLL) {
      P pv[UNROLL], gv[UNROLL], sv[UNROLL][NSA] = {};
      FLR_UNROLL
      for (int u = 0; u < UNROLL; ++u) {
        const int i = k0 + u * threads;
        if (i >= n) continue;
        pv[u] = load_pack(pp + i);
        gv[u] = load_pack(gp + i);
        FLR_UNROLL
        for (int k = 0; k < NS; ++k) {
          if (read) sv[u][k] = load_pack(sp[k] + i);
        }
      }
      FLR_UNROLL
      for (int u = 0; u < UNROLL; ++u) {
        const int i = k0 + u * threads;
        if (i >= n) continue;
        FLR_UNROLL
        for (int j = 0; j < P::size; ++j) {
          T s[NSA];
          FLR_UNROLL
          for (int k = 0; k < NS; ++k) s[k] = sv[u][k].v[j];
          rule_element(pv[u].v[j], gv[u].v[j], s, rule);
          FLR_UNROLL
          for (int k = 0; k < NS; ++k) sv[u][k].v[j] = s[k];
        }
        store_pack(pp + i, pv[u]);
        FLR_UNROLL
        for (int k = 0; k < NS; ++k) store_pack(sp[k] + i, sv[u][k]);
      }
    }
    tail = begin + n * P::size;
  }
  for (int64_t i = tail + tid; i < end; i += threads) {
    T s[NSA] = {};
    FLR_UNROLL
    for (int k = 0; k < NS; ++k) {
      if (read) s[k] = x.s[k][i];
    }
    rule_element(x.p[i], x.g[i], s, rule);
    FLR_UNROLL
    for (int k = 0; k < NS; ++k) x.s[k][i] = s[k];
  }
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
  const auto c = norm_common<typename MathOf<T>::type>(a.grad_scale, a.has_clip_value, a.clip_value);
  return norm_thread(reinterpret_cast<const T*>(row[L::T_GRAD]), r.begin, r.end, (row[L::T_GRAD] & 15) == 0, tid,
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

// ---------------------------------------------------------------------------- updates
// A thread's share of one block, and the rule variant to run on it: run(rule), or either(v, ...),
// which runs Rule<M, v> (the variant is a template argument, chosen once per block).
template <typename T>
struct Share {
  Arrays<T> x;
  int64_t begin, end;
  bool aligned;
  int tid, threads;
  template <typename R>
  FLR_HD void run(const R& rule) const {
    update_thread(x, begin, end, aligned, tid, threads, rule);
  }
  template <template <typename, bool> class Rule, typename M, typename C>
  FLR_HD void either(bool v, const Common<M>& common, const C& c) const {
    if (v) run(Rule<M, true>{common, c});
    else run(Rule<M, false>{common, c});
  }
};

// Each rule as update_block drives it, named for its RULES name (capitalised): its scalars from
// the scratch row k, its variant from the row's flags and coefficients, then the thread's share.
// FLR_RULES (generated from fused_lr/core/layout.py RULES) lists them, so the dispatch below
// names no rule.
struct Sgd {  // with or without momentum
  template <typename T, typename M>
  FLR_HD static void update(const Share<T>& s, const Common<M>& common, const double* k, int flags) {
    s.template either<SgdRule>(k[L::C_C0] != 0.0, common, sgd_coefs<M>(k, flags));
  }
};

struct Adam {  // with or without amsgrad
  template <typename T, typename M>
  FLR_HD static void update(const Share<T>& s, const Common<M>& common, const double* k, int flags) {
    s.template either<AdamRule>((flags & L::F_AMSGRAD) != 0, common, adam_coefs<M>(k));
  }
};

struct Rmsprop {  // momentum and centered, each on or off
  template <typename T, typename M>
  FLR_HD static void update(const Share<T>& s, const Common<M>& common, const double* k, int flags) {
    const RmspropCoefs<M> c = rmsprop_coefs<M>(k);
    const bool momentum = k[L::C_C0 + 3] > 0.0, centered = (flags & L::F_CENTERED) != 0;
    if (momentum && centered) s.run(RmspropRule<M, true, true>{common, c});
    else if (momentum) s.run(RmspropRule<M, true, false>{common, c});
    else if (centered) s.run(RmspropRule<M, false, true>{common, c});
    else s.run(RmspropRule<M, false, false>{common, c});
  }
};

struct Adagrad {  // one variant
  template <typename T, typename M>
  FLR_HD static void update(const Share<T>& s, const Common<M>& common, const double* k, int) {
    s.run(AdagradRule<M>{common, adagrad_coefs<M>(k)});
  }
};

// Thread tid's share of block `block` of the update with rule Rule (one of the updates above).
template <typename T, typename Rule>
FLR_HD void update_block(const UpdateArgs& a, int64_t block, int64_t chunk, int tid, int threads) {
  using M = typename MathOf<T>::type;
  const double* wide = a.scratch + a.n_tensors * L::COEF_COLS;
  if (wide[L::W_GO] == 0.0) return;  // found_inf: the step changes nothing
  const Range r = block_range(a.table, a.blocks, block, chunk);
  const int64_t* row = a.table + r.row * L::TENSOR_COLS;
  const double* k = a.scratch + r.row * L::COEF_COLS;
  const double* h = a.hyper + row[L::T_GROUP] * L::HYPER_COLS;
  const int flags = static_cast<int>(h[L::H_FLAGS]);
  const Common<M> common = common_coefs<M>(k, wide, h, a.has_clip_value, a.clip_value);
  Share<T> s;
  s.x.p = reinterpret_cast<T*>(row[L::T_PARAM]);
  s.x.g = reinterpret_cast<const T*>(row[L::T_GRAD]);
  for (int j = 0; j < L::MAX_STATES; ++j) s.x.s[j] = reinterpret_cast<T*>(row[L::T_STATE0 + j]);
  s.begin = r.begin;
  s.end = r.end;
  // T_ALIGNED covers the parameter and state; the gradient's address moves every step
  s.aligned = row[L::T_ALIGNED] != 0 && (row[L::T_GRAD] & 15) == 0;
  s.tid = tid;
  s.threads = threads;
  Rule::template update<T, M>(s, common, k, flags);
}

// Host side: f(Rule{}) for the update of a known rule code, and whether the code was known.
template <typename F>
bool with_rule(int rule, F&& f) {
  switch (rule) {
#define FLR_RULE_CASE(code, Name) \
  case code:                      \
    f(Name{});                    \
    return true;
    FLR_RULES(FLR_RULE_CASE)
#undef FLR_RULE_CASE
    default:
      return false;
  }
}

}  // namespace flr
