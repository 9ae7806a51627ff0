// The fused step's kernels over a plan's device tables (fused_lr_layout.h): the gradient norm
// (per-block partial sums, then one block sums them in a fixed order: the same result every run),
// prepare (a thread per tensor computes its scalars once per step into a scratch table), the
// update (a block per chunk of CUDA_CHUNK elements, 16-byte loads where the row is aligned, no
// schedule math; one kernel per rule and dtype, so no element branches on the rule), and the
// increment of step counts and group clocks. Every per-step value (norm,
// grad_scale, found_inf, clocks, step counts, tensor lrs) is read on the device, so a step never
// synchronises and can be captured in a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "launch.h"

namespace flr {
namespace {

constexpr int BLOCK = static_cast<int>(L::CUDA_BLOCK);
constexpr int64_t CHUNK = L::CUDA_CHUNK;
constexpr int SMALL_BLOCK = 256;  // prepare and increment: a thread per tensor or group
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

// One block: the square root of the sum of all partials, in a fixed order, into *norm.
__global__ void __launch_bounds__(BLOCK) norm_finish_kernel(const double* partials, int64_t n, void* norm,
                                                            bool norm_is_double) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += BLOCK) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const double r = sqrt(acc);
    if (norm_is_double) *static_cast<double*>(norm) = r;
    else *static_cast<float*>(norm) = static_cast<float>(r);
  }
}

__global__ void __launch_bounds__(SMALL_BLOCK) prepare_kernel(PrepareArgs a, int rule) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * SMALL_BLOCK + threadIdx.x;
  if (t <= a.n_tensors) prepare_row(a, rule, t);
}

// Two blocks of BLOCK threads per SM: at most 64 registers a thread, which every rule's update
// fits without spilling (nvcc -Xptxas -v).
template <typename T, int RULE>
__global__ void __launch_bounds__(BLOCK, 2) update_kernel(UpdateArgs a, int64_t first_block) {
  update_block<T, RULE>(a, first_block + blockIdx.x, CHUNK, threadIdx.x, BLOCK);
}

__global__ void __launch_bounds__(SMALL_BLOCK) increment_kernel(const int64_t* table, int64_t n_tensors,
                                                                float* clocks, int64_t n_groups,
                                                                const double* scratch) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * SMALL_BLOCK + threadIdx.x;
  increment_row(table, n_tensors, clocks, n_groups, scratch, i);
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

unsigned grid_for(int64_t n) { return static_cast<unsigned>((n + SMALL_BLOCK - 1) / SMALL_BLOCK); }

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
  norm_finish_kernel<<<1, BLOCK, 0, st>>>(n.partials, n.n_blocks, n.norm, n.norm_is_double);
  return check("norm kernels");
}

std::string launch_step(const StepLaunch& s, int device, void* stream) {
  if (!with_rule(s.rule, [](auto) {})) return "unsupported rule code " + std::to_string(s.rule);
  std::string bad = check_buckets(s.buckets);
  if (!bad.empty()) return bad;
  const DeviceGuard guard(device);
  if (!guard.error().empty()) return guard.error();
  const auto st = static_cast<cudaStream_t>(stream);
  const int64_t n_tensors = s.prepare.n_tensors;
  prepare_kernel<<<grid_for(n_tensors + 1), SMALL_BLOCK, 0, st>>>(s.prepare, s.rule);
  for (const Bucket& b : s.buckets) {
    if (b.n_blocks == 0) continue;
    with_rule(s.rule, [&](auto rule) {
      dispatch(b.dtype, [&](auto tag) {
        update_kernel<decltype(tag), decltype(rule)::value>
            <<<static_cast<unsigned>(b.n_blocks), BLOCK, 0, st>>>(s.update, b.first_block);
      });
    });
  }
  const int64_t rows = n_tensors > s.n_groups ? n_tensors : s.n_groups;
  if (rows > 0) {
    increment_kernel<<<grid_for(rows), SMALL_BLOCK, 0, st>>>(s.prepare.table, n_tensors, s.clocks, s.n_groups,
                                                             s.prepare.scratch);
  }
  return check("step kernels");
}

}  // namespace flr
