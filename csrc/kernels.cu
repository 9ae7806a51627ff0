// The fused step's kernels over a plan's device tables (fused_lr_layout.h): the gradient norm's
// per-block partial sums; prepare, one block that sums them in a fixed order (the same result every
// run), computes every tensor's scalars once per step into a scratch table, then advances the step
// counts and group clocks; and the update (a block per chunk of CUDA_CHUNK elements, 16-byte loads
// where the row is aligned, no schedule math; one kernel per rule and dtype, so no element branches
// on the rule). Three launches for one dtype bucket. Every per-step value (norm, grad_scale,
// found_inf, clocks, step counts, tensor lrs) is read on the device, so a step never synchronises
// and can be captured in a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "launch.h"

namespace flr {
namespace {

constexpr int BLOCK = static_cast<int>(L::CUDA_BLOCK);
constexpr int64_t CHUNK = L::CUDA_CHUNK;
static_assert(BLOCK % 32 == 0 && BLOCK / 32 <= 32, "block_sum sums at most 32 warps");

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

template <typename T>
__global__ void __launch_bounds__(BLOCK) norm_kernel(NormArgs a, int64_t first_block, double* partials) {
  const int64_t block = first_block + blockIdx.x;
  const double acc = block_sum(norm_block<T>(a, block, CHUNK, threadIdx.x, BLOCK));
  if (threadIdx.x == 0) partials[block] = acc;
}

// The square root of the sum of all partials, in a fixed order, into *norm by thread 0; a whole
// block calls it.
__device__ void finish_norm(const double* partials, int64_t n, void* norm, bool norm_is_double) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += BLOCK) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const double r = sqrt(acc);
    if (norm_is_double) *static_cast<double*>(norm) = r;
    else *static_cast<float*>(norm) = static_cast<float>(r);
  }
}

// One block: the norm, when the host reads it before the step (error_if_nonfinite, or an all-reduce).
__global__ void __launch_bounds__(BLOCK) norm_finish_kernel(const double* partials, int64_t n, void* norm,
                                                            bool norm_is_double) {
  finish_norm(partials, n, norm, norm_is_double);
}

// One block: the norm when the step finishes it (then visible to every thread), every row's scalars,
// then (every row read) the step counts and clocks advanced.
__global__ void __launch_bounds__(BLOCK) prepare_kernel(PrepareArgs a, float* clocks, int64_t n_groups) {
  if (a.partials != nullptr) {
    finish_norm(a.partials, a.n_partials, a.norm, a.norm_is_double);
    __syncthreads();
  }
  for (int64_t t = threadIdx.x; t <= a.n_tensors; t += BLOCK) prepare_row(a, t);
  __syncthreads();
  const int64_t rows = a.n_tensors > n_groups ? a.n_tensors : n_groups;
  for (int64_t i = threadIdx.x; i < rows; i += BLOCK) increment_row(a.table, a.n_tensors, clocks, n_groups, a.scratch, i);
}

// Two blocks of BLOCK threads per SM: at most 64 registers a thread, which every rule's update
// fits without spilling (nvcc -Xptxas -v).
template <typename T, typename Rule>
__global__ void __launch_bounds__(BLOCK, 2) update_kernel(UpdateArgs a, int64_t first_block) {
  update_block<T, Rule>(a, first_block + blockIdx.x, CHUNK, threadIdx.x, BLOCK);
}

std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

std::string check(const char* what) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : cuda_error(what, err);
}

// Makes `device` current for the launches (device < 0: leave it) and restores the caller's
// device, which torch shares (both runtimes use the device's primary context).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (device < 0) return;
    cudaError_t err = cudaGetDevice(&previous_);
    if (err == cudaSuccess && previous_ != device) err = cudaSetDevice(device);
    else previous_ = -1;
    if (err != cudaSuccess) error_ = cuda_error("cudaSetDevice", err);
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  const std::string& error() const { return error_; }

 private:
  int previous_ = -1;
  std::string error_;
};

// dtype: a code check_buckets accepted.
template <typename F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case DT_FLOAT32: f(float{}); break;
    case DT_FLOAT64: f(double{}); break;
    case DT_FLOAT16: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

// Checked before the first launch, so a bad bucket leaves the step undone rather than half done.
std::string check_buckets(const std::vector<Bucket>& buckets) {
  for (const Bucket& b : buckets) {
    if (b.dtype < 0 || b.dtype >= DT_COUNT) return "unsupported dtype code " + std::to_string(b.dtype);
    if (b.n_blocks < 0 || b.n_blocks >= (int64_t{1} << 31)) return "bad block count " + std::to_string(b.n_blocks);
  }
  return {};
}

}  // namespace

std::string device_count(int* count) {
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err == cudaSuccess) return {};
  *count = 0;
  return cuda_error("cudaGetDeviceCount", err);
}

std::string launch_norm(const NormLaunch& n, int device, void* stream) {
  std::string bad = check_buckets(n.buckets);
  if (!bad.empty()) return bad;
  const DeviceGuard guard(device);
  if (!guard.error().empty()) return guard.error();
  const auto st = static_cast<cudaStream_t>(stream);
  for (const Bucket& b : n.buckets) {
    if (b.n_blocks == 0) continue;
    dispatch(b.dtype, [&](auto tag) {
      norm_kernel<decltype(tag)><<<static_cast<unsigned>(b.n_blocks), BLOCK, 0, st>>>(n.args, b.first_block,
                                                                                     n.partials);
    });
  }
  if (n.finish) norm_finish_kernel<<<1, BLOCK, 0, st>>>(n.partials, n.n_blocks, n.norm, n.norm_is_double);
  return check("norm kernels");
}

std::string launch_step(const StepLaunch& s, int device, void* stream) {
  if (!with_rule(s.rule, [](auto) {})) return "unsupported rule code " + std::to_string(s.rule);
  if (s.prepare.partials != nullptr && s.prepare.norm == nullptr) return "norm partials without a norm to finish";
  std::string bad = check_buckets(s.buckets);
  if (!bad.empty()) return bad;
  const DeviceGuard guard(device);
  if (!guard.error().empty()) return guard.error();
  const auto st = static_cast<cudaStream_t>(stream);
  prepare_kernel<<<1, BLOCK, 0, st>>>(s.prepare, s.clocks, s.n_groups);
  for (const Bucket& b : s.buckets) {
    if (b.n_blocks == 0) continue;
    with_rule(s.rule, [&](auto rule) {
      dispatch(b.dtype, [&](auto tag) {
        update_kernel<decltype(tag), decltype(rule)>
            <<<static_cast<unsigned>(b.n_blocks), BLOCK, 0, st>>>(s.update, b.first_block);
      });
    });
  }
  return check("step kernels");
}

}  // namespace flr
