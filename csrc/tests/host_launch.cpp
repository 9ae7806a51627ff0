// A host twin of the launches in kernels.cu, for tests/test_cuda_host.py: fused_lr._cuda's norm and
// step behind a C ABI (loaded with ctypes), running the kernels' own per-thread functions of
// fused_lr_math.h (prepare_row, increment_row, norm_block, update_block) for every block and thread
// in turn on CPU memory, and summing a block's threads in the order kernels.cu's block_sum does.
// It lets CI drive fused_lr.backends.cuda.CudaBackend end to end (tables, blocks, buckets,
// scratch, alignment paths) without a GPU. The chunk and block sizes are arguments here, so tests
// can make tensors span many blocks and threads loop; float32 and float64 only.
#include <stdint.h>

#include <vector>

#include "../launch.h"

namespace {

int64_t g_launches = 0;  // kernels kernels.cu would have launched (flr_launches)

// kernels.cu's block_sum: each warp's 32 values by shuffle-down halving, then the warps' sums
// likewise (zeros past the last warp), as lane 0 sees them.
double warp_sum(double* lanes) {
  for (int off = 16; off > 0; off /= 2) {
    for (int l = 0; l < off; ++l) lanes[l] += lanes[l + off];
  }
  return lanes[0];
}

double block_sum(std::vector<double> v) {
  v.resize((v.size() + 31) / 32 * 32, 0.0);
  std::vector<double> warps(32, 0.0);
  for (size_t w = 0; w < v.size() / 32; ++w) warps[w] = warp_sum(&v[32 * w]);
  return warp_sum(warps.data());
}

template <typename F>
bool dispatch(int dtype, F&& f) {
  if (dtype == flr::DT_FLOAT32) f(float{});
  else if (dtype == flr::DT_FLOAT64) f(double{});
  else return false;
  return true;
}

std::vector<flr::Bucket> buckets(const int* dtypes, const int64_t* first_blocks, const int64_t* n_blocks, int n) {
  std::vector<flr::Bucket> out;
  for (int i = 0; i < n; ++i) out.push_back({dtypes[i], first_blocks[i], n_blocks[i]});
  return out;
}

// kernels.cu's finish_norm, with `threads` threads
void finish_norm(const double* partials, int64_t n, void* norm, bool norm_is_double, int threads) {
  std::vector<double> acc(threads, 0.0);
  for (int tid = 0; tid < threads; ++tid) {
    for (int64_t i = tid; i < n; i += threads) acc[tid] += partials[i];
  }
  const double r = sqrt(block_sum(acc));
  if (norm_is_double) *static_cast<double*>(norm) = r;
  else *static_cast<float*>(norm) = static_cast<float>(r);
}

// launch_norm of kernels.cu
int norm(const flr::NormLaunch& n, int64_t chunk, int threads) {
  for (const flr::Bucket& b : n.buckets) {
    if (b.n_blocks == 0) continue;
    ++g_launches;
    const bool known = dispatch(b.dtype, [&](auto tag) {
      for (int64_t block = b.first_block; block < b.first_block + b.n_blocks; ++block) {
        std::vector<double> acc(threads);
        for (int tid = 0; tid < threads; ++tid) acc[tid] = flr::norm_block<decltype(tag)>(n.args, block, chunk, tid, threads);
        n.partials[block] = block_sum(acc);
      }
    });
    if (!known) return -1;
  }
  if (n.finish) {
    ++g_launches;
    finish_norm(n.partials, n.n_blocks, n.norm, n.norm_is_double, threads);
  }
  return 0;
}

// launch_step of kernels.cu
int step(const flr::StepLaunch& s, int64_t chunk, int threads) {
  if (!flr::with_rule(s.rule, [](auto) {})) return -2;
  if (s.prepare.partials != nullptr && s.prepare.norm == nullptr) return -3;
  for (const flr::Bucket& b : s.buckets) {
    if (b.dtype != flr::DT_FLOAT32 && b.dtype != flr::DT_FLOAT64) return -1;
  }
  // prepare_kernel: the norm, every row, then the step counts and clocks
  ++g_launches;
  const flr::PrepareArgs& a = s.prepare;
  if (a.partials != nullptr) finish_norm(a.partials, a.n_partials, a.norm, a.norm_is_double, threads);
  for (int64_t t = 0; t <= a.n_tensors; ++t) flr::prepare_row(a, t);
  const int64_t rows = a.n_tensors > s.n_groups ? a.n_tensors : s.n_groups;
  for (int64_t i = 0; i < rows; ++i) flr::increment_row(a.table, a.n_tensors, s.clocks, s.n_groups, a.scratch, i);
  for (const flr::Bucket& b : s.buckets) {
    if (b.n_blocks == 0) continue;
    ++g_launches;
    flr::with_rule(s.rule, [&](auto rule) {
      dispatch(b.dtype, [&](auto tag) {
        for (int64_t block = b.first_block; block < b.first_block + b.n_blocks; ++block) {
          for (int tid = 0; tid < threads; ++tid)
            flr::update_block<decltype(tag), decltype(rule)>(s.update, block, chunk, tid, threads);
        }
      });
    });
  }
  return 0;
}

}  // namespace

extern "C" {

// The kernel launches kernels.cu would have made so far.
int64_t flr_launches() { return g_launches; }

// The torch name of a dtype code (fused_lr._cuda's DTYPES), null past the last.
const char* flr_dtype_name(int code) { return code >= 0 && code < flr::DT_COUNT ? flr::DTYPE_NAMES[code] : nullptr; }

// fused_lr._cuda.norm without device and stream, plus the chunk and block sizes. Returns 0, or
// -1 for a dtype the twin does not handle.
int flr_norm(const int64_t* table, const int32_t* blocks, const int* dtypes, const int64_t* first_blocks,
             const int64_t* n_blocks, int n_buckets, int64_t total_blocks, const float* grad_scale, int has_clip_value,
             double clip_value, double* partials, void* norm_out, int norm_is_double, int finish, int64_t chunk,
             int threads) {
  flr::NormLaunch n;
  n.args = {table, blocks, grad_scale, has_clip_value != 0, clip_value};
  n.buckets = buckets(dtypes, first_blocks, n_blocks, n_buckets);
  n.n_blocks = total_blocks;
  n.partials = partials;
  n.norm = norm_out;
  n.norm_is_double = norm_is_double != 0;
  n.finish = finish != 0;
  return norm(n, chunk, threads);
}

// fused_lr._cuda.step likewise. Returns 0, -1 for a dtype the twin does not handle, -2 for an
// unknown rule, -3 for norm partials without a norm.
int flr_step(int rule, int64_t program, const int64_t* table, const int32_t* blocks, int64_t n_tensors, const int* dtypes,
             const int64_t* first_blocks, const int64_t* n_blocks, int n_buckets, const double* hyper,
             const double* sched, const int64_t* lr32, const int64_t* lr64, float* clocks, int64_t n_groups,
             double* scratch, void* norm, int norm_is_double, const double* partials, int64_t n_partials,
             int clip_by_norm, double max_norm,
             double rate_power, double rate_eps, const float* grad_scale, const float* found_inf, int has_clip_value,
             double clip_value, int64_t chunk, int threads) {
  flr::StepLaunch s;
  s.rule = rule;
  s.prepare = {table,     n_tensors, hyper,           sched,      lr32,              lr64,
               clocks,    norm,      norm_is_double != 0, partials, n_partials, clip_by_norm != 0,
               max_norm,  rate_power, rate_eps,        grad_scale, found_inf,         scratch,
               program};
  s.update = {table, blocks, n_tensors, hyper, scratch, has_clip_value != 0, clip_value};
  s.buckets = buckets(dtypes, first_blocks, n_blocks, n_buckets);
  s.clocks = clocks;
  s.n_groups = n_groups;
  return step(s, chunk, threads);
}

}  // extern "C"
