// The fused step's kernels: multi-tensor apply over a device table of tensors (one thread block
// per chunk, so one launch covers every tensor of a dtype), a deterministic global L2 norm, the
// fused update, and the step-counter increment. No host synchronisation anywhere: every
// per-step value (norm, grad_scale, found_inf, step counts) is read on the device, so a step
// can be captured in a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "fused_lr_math.h"
#include "launch.h"

namespace flr {
namespace {

constexpr int BLOCK = 512;
constexpr int ILP = 4;  // independent loads in flight per thread

template <typename T> struct MathType { using type = float; };
template <> struct MathType<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename MathType<T>::type load(const T* p) { return *p; }
template <> __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T> __device__ __forceinline__ void store(T* p, typename MathType<T>::type v) { *p = v; }
template <> __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
template <> __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ bool skipped(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

__device__ __forceinline__ float inv_scale_of(const float* grad_scale) {
  return grad_scale == nullptr ? 1.0f : unscale_factor(*grad_scale);
}

// Sum of v over the block, in a fixed order (same result on every run), valid in thread 0.
__device__ double block_sum(double v) {
  __shared__ double warp_sums[BLOCK / 32];
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < BLOCK / 32 ? warp_sums[lane] : 0.0;
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

// The coefficients the norm pass needs: unscale and value clipping (maximize is a sign flip
// and value clipping is symmetric, so neither changes a square).
template <typename M>
__device__ Coefs<M> norm_coefs(float inv_scale, const StepArgs& s) {
  Coefs<M> c{};
  c.inv_scale = M(inv_scale);
  c.has_clip_value = s.has_clip_value;
  c.clip_value = M(s.clip_value);
  return c;
}

// Block b writes the sum of squares of chunk b's processed gradients to partials[b].
template <typename T>
__global__ void __launch_bounds__(BLOCK)
norm_partials_kernel(const int64_t* table, int n_tensors, int64_t chunk_size, const float* grad_scale,
                     StepArgs s, double* partials) {
  using M = typename MathType<T>::type;
  const int64_t chunk = blockIdx.x;
  const int64_t* row = table + static_cast<int64_t>(locate_tensor(table, n_tensors, chunk)) * TABLE_COLS;
  int64_t begin, end;
  chunk_range(row, chunk, chunk_size, &begin, &end);
  const T* g = reinterpret_cast<const T*>(row[T_GRAD]);
  const Coefs<M> c = norm_coefs<M>(inv_scale_of(grad_scale), s);
  double acc = 0.0;
  // unrolled so several loads are in flight; the order of the additions is unchanged
#pragma unroll ILP
  for (int64_t i = begin + threadIdx.x; i < end; i += BLOCK) {
    const double x = static_cast<double>(processed_grad(load(g + i), c));
    acc += x * x;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[chunk] = acc;
}

// One block: the square root of the sum of all partials, in a fixed order, into *norm.
__global__ void __launch_bounds__(BLOCK)
norm_finish_kernel(const double* partials, int64_t n, void* norm, bool norm_is_double) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += BLOCK) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const double r = sqrt(acc);
    if (norm_is_double) *static_cast<double*>(norm) = r;
    else *static_cast<float*>(norm) = static_cast<float>(r);
  }
}

template <typename T>
__global__ void __launch_bounds__(BLOCK)
update_kernel(const int64_t* table, int n_tensors, int64_t chunk_size, const double* sched, const double* hyper,
              const void* norm, const float* grad_scale, const float* found_inf, StepArgs s) {
  using M = typename MathType<T>::type;
  if (skipped(found_inf)) return;
  const int64_t chunk = blockIdx.x;
  const int64_t* row = table + static_cast<int64_t>(locate_tensor(table, n_tensors, chunk)) * TABLE_COLS;
  int64_t begin, end;
  chunk_range(row, chunk, chunk_size, &begin, &end);

  // The schedule costs a few pow/cos in float64: evaluate it once per block, not per thread.
  __shared__ Coefs<M> shared_coefs;
  if (threadIdx.x == 0) {
    const int64_t group = row[T_GROUP];
    double n = 0.0;
    if (s.has_norm) n = s.norm_is_double ? *static_cast<const double*>(norm) : *static_cast<const float*>(norm);
    const float k = *reinterpret_cast<const float*>(row[T_STEP]);
    shared_coefs = make_coefs<M>(hyper + group * HYPER_COLS, sched + group * MAX_SEGMENTS * ROW, k,
                                 row[T_FRESH] != 0, inv_scale_of(grad_scale), n, s);
  }
  __syncthreads();
  const Coefs<M> c = shared_coefs;

  T* p = reinterpret_cast<T*>(row[T_PARAM]);
  const T* g = reinterpret_cast<const T*>(row[T_GRAD]);
  T* b = reinterpret_cast<T*>(row[T_BUF]);  // null without momentum
  for (int64_t base = begin + threadIdx.x; base < end; base += static_cast<int64_t>(BLOCK) * ILP) {
    M pv[ILP], gv[ILP], bv[ILP];
#pragma unroll
    for (int j = 0; j < ILP; ++j) {
      const int64_t i = base + j * BLOCK;
      if (i < end) {
        pv[j] = load(p + i);
        gv[j] = load(g + i);
        bv[j] = c.has_momentum && !c.init_buf ? load(b + i) : M(0);
      }
    }
#pragma unroll
    for (int j = 0; j < ILP; ++j) {
      const int64_t i = base + j * BLOCK;
      if (i < end) {
        update_element(pv[j], gv[j], bv[j], c);
        store(p + i, pv[j]);
        if (c.has_momentum) store(b + i, bv[j]);
      }
    }
  }
}

// After the update (stream order): every block of a tensor has read the old count by then.
__global__ void increment_steps_kernel(const int64_t* table, int n_tensors, const float* found_inf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n_tensors || skipped(found_inf)) return;
  *reinterpret_cast<float*>(table[static_cast<int64_t>(i) * TABLE_COLS + T_STEP]) += 1.0f;
}

std::string check(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return {};
  return std::string(what) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

template <typename F>
std::string dispatch(int dtype, F&& f) {
  switch (dtype) {
    case DT_FLOAT32: f(float{}); return {};
    case DT_FLOAT64: f(double{}); return {};
    case DT_FLOAT16: f(__half{}); return {};
    case DT_BFLOAT16: f(__nv_bfloat16{}); return {};
    default: return "unsupported dtype code " + std::to_string(dtype);
  }
}

}  // namespace

std::string device_count(int* count) {
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err == cudaSuccess) return {};
  *count = 0;
  return std::string("cudaGetDeviceCount: ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

std::string set_device(int device) {
  const cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) return {};
  return std::string("cudaSetDevice: ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

std::string launch_norm_partials(int dtype, const TensorTable& t, const float* grad_scale, const StepArgs& s,
                                 double* partials, void* stream) {
  if (t.n_chunks == 0) return {};
  const auto st = static_cast<cudaStream_t>(stream);
  std::string err = dispatch(dtype, [&](auto tag) {
    norm_partials_kernel<decltype(tag)>
        <<<t.n_chunks, BLOCK, 0, st>>>(t.table, t.n_tensors, t.chunk_size, grad_scale, s, partials);
  });
  return err.empty() ? check("norm_partials_kernel") : err;
}

std::string launch_norm_finish(const double* partials, int64_t n, void* norm, bool norm_is_double, void* stream) {
  norm_finish_kernel<<<1, BLOCK, 0, static_cast<cudaStream_t>(stream)>>>(partials, n, norm, norm_is_double);
  return check("norm_finish_kernel");
}

std::string launch_update(int dtype, const TensorTable& t, const double* sched, const double* hyper,
                          const void* norm, const float* grad_scale, const float* found_inf, const StepArgs& s,
                          void* stream) {
  if (t.n_chunks == 0) return {};
  const auto st = static_cast<cudaStream_t>(stream);
  std::string err = dispatch(dtype, [&](auto tag) {
    update_kernel<decltype(tag)><<<t.n_chunks, BLOCK, 0, st>>>(t.table, t.n_tensors, t.chunk_size, sched, hyper,
                                                                norm, grad_scale, found_inf, s);
  });
  return err.empty() ? check("update_kernel") : err;
}

std::string launch_increment_steps(const int64_t* table, int n_tensors, const float* found_inf, void* stream) {
  if (n_tensors == 0) return {};
  constexpr int threads = 256;
  increment_steps_kernel<<<(n_tensors + threads - 1) / threads, threads, 0, static_cast<cudaStream_t>(stream)>>>(
      table, n_tensors, found_inf);
  return check("increment_steps_kernel");
}

}  // namespace flr
