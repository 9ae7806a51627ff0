// A host twin of the launches in kernels.cu, for tests/test_cuda_host.py: the same arguments as
// fused_lr._cuda (C ABI, loaded with ctypes), the same chunk walk (one "block" per chunk,
// locate_tensor + chunk_range) and the same per-element functions of fused_lr_math.h, run
// sequentially on CPU memory. It lets CI drive cuda_backend.CudaBackend end to end (tables,
// offsets, buckets, pointers) without a GPU. float32 and float64 only.
#include <math.h>
#include <stdint.h>

#include "../fused_lr_math.h"

namespace {

enum { DT_FLOAT32 = 0, DT_FLOAT64 = 1 };  // csrc/launch.h

struct Chunk {
  const int64_t* row;
  int64_t begin, end;
};

Chunk chunk_of(const int64_t* table, int n_tensors, int64_t chunk, int64_t chunk_size) {
  Chunk c;
  c.row = table + static_cast<int64_t>(flr::locate_tensor(table, n_tensors, chunk)) * flr::TABLE_COLS;
  flr::chunk_range(c.row, chunk, chunk_size, &c.begin, &c.end);
  return c;
}

float inv_scale_of(const float* grad_scale) { return grad_scale ? flr::unscale_factor(*grad_scale) : 1.0f; }

template <typename T>
void norm_partials(const int64_t* table, int n_tensors, int64_t n_chunks, int64_t chunk_size,
                   const float* grad_scale, const flr::StepArgs& s, double* partials) {
  flr::Coefs<T> c{};
  c.inv_scale = T(inv_scale_of(grad_scale));
  c.has_clip_value = s.has_clip_value;
  c.clip_value = T(s.clip_value);
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    const Chunk ch = chunk_of(table, n_tensors, chunk, chunk_size);
    const T* g = reinterpret_cast<const T*>(ch.row[flr::T_GRAD]);
    double acc = 0.0;
    for (int64_t i = ch.begin; i < ch.end; ++i) {
      const double x = flr::processed_grad(g[i], c);
      acc += x * x;
    }
    partials[chunk] = acc;
  }
}

template <typename T>
void update(const int64_t* table, int n_tensors, int64_t n_chunks, int64_t chunk_size, const double* sched,
            const double* hyper, const void* norm, const float* grad_scale, const flr::StepArgs& s) {
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    const Chunk ch = chunk_of(table, n_tensors, chunk, chunk_size);
    const int64_t group = ch.row[flr::T_GROUP];
    double n = 0.0;
    if (s.has_norm) n = s.norm_is_double ? *static_cast<const double*>(norm) : *static_cast<const float*>(norm);
    const float k = *reinterpret_cast<const float*>(ch.row[flr::T_STEP]);
    const auto c = flr::make_coefs<T>(hyper + group * flr::HYPER_COLS, sched + group * flr::MAX_SEGMENTS * flr::ROW,
                                      k, ch.row[flr::T_FRESH] != 0, inv_scale_of(grad_scale), n, s);
    T* p = reinterpret_cast<T*>(ch.row[flr::T_PARAM]);
    const T* g = reinterpret_cast<const T*>(ch.row[flr::T_GRAD]);
    T* b = reinterpret_cast<T*>(ch.row[flr::T_BUF]);
    for (int64_t i = ch.begin; i < ch.end; ++i) {
      T bv = c.has_momentum && !c.init_buf ? b[i] : T(0);
      flr::update_element(p[i], g[i], bv, c);
      if (c.has_momentum) b[i] = bv;
    }
  }
}

flr::StepArgs args(int has_norm, double max_norm, int norm_is_double, int has_clip_value, double clip_value) {
  flr::StepArgs s;
  s.has_norm = has_norm != 0;
  s.max_norm = max_norm;
  s.norm_is_double = norm_is_double != 0;
  s.has_clip_value = has_clip_value != 0;
  s.clip_value = clip_value;
  return s;
}

}  // namespace

extern "C" {

// Each returns 0, or -1 for a dtype the twin does not handle.
int flr_norm_partials(int dtype, const int64_t* table, int n_tensors, int64_t n_chunks, int64_t chunk_size,
                      const float* grad_scale, int has_clip_value, double clip_value, double* partials) {
  const auto s = args(0, 0.0, 0, has_clip_value, clip_value);
  if (dtype == DT_FLOAT32) norm_partials<float>(table, n_tensors, n_chunks, chunk_size, grad_scale, s, partials);
  else if (dtype == DT_FLOAT64) norm_partials<double>(table, n_tensors, n_chunks, chunk_size, grad_scale, s, partials);
  else return -1;
  return 0;
}

int flr_norm_finish(const double* partials, int64_t n, void* norm, int norm_is_double) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += partials[i];
  if (norm_is_double) *static_cast<double*>(norm) = sqrt(acc);
  else *static_cast<float*>(norm) = static_cast<float>(sqrt(acc));
  return 0;
}

int flr_update(int dtype, const int64_t* table, int n_tensors, int64_t n_chunks, int64_t chunk_size,
               const double* sched, const double* hyper, const void* norm, int norm_is_double, double max_norm,
               int has_clip_value, double clip_value, const float* grad_scale, const float* found_inf) {
  if (found_inf && *found_inf != 0.0f) return 0;
  const auto s = args(norm != nullptr, max_norm, norm_is_double, has_clip_value, clip_value);
  if (dtype == DT_FLOAT32) update<float>(table, n_tensors, n_chunks, chunk_size, sched, hyper, norm, grad_scale, s);
  else if (dtype == DT_FLOAT64) update<double>(table, n_tensors, n_chunks, chunk_size, sched, hyper, norm, grad_scale, s);
  else return -1;
  return 0;
}

int flr_increment_steps(const int64_t* table, int n_tensors, const float* found_inf) {
  if (found_inf && *found_inf != 0.0f) return 0;
  for (int i = 0; i < n_tensors; ++i) *reinterpret_cast<float*>(table[i * flr::TABLE_COLS + flr::T_STEP]) += 1.0f;
  return 0;
}

}  // extern "C"
