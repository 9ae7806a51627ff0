// The host-side entry points of kernels.cu. Plain C++ types only (streams as void*), so that
// bindings.cpp and the host twin (csrc/tests/host_launch.cpp) compile without CUDA headers.
// Each launch returns an empty string on success, else the error; none of them synchronises.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include "fused_lr_math.h"

namespace flr {

// Element types of the kernels; fused_lr._cuda exports them by torch name (DTYPES).
enum DType : int { DT_FLOAT32 = 0, DT_FLOAT64, DT_FLOAT16, DT_BFLOAT16, DT_COUNT };
constexpr const char* DTYPE_NAMES[DT_COUNT] = {"float32", "float64", "float16", "bfloat16"};

// One dtype bucket's launch: blocks [first_block, first_block + n_blocks) of the plan, all of
// one element type.
struct Bucket {
  int dtype;
  int64_t first_block;
  int64_t n_blocks;
};

// The gradient norm: per bucket a block per chunk writes partials[block]; with `finish`, one
// block then sums them all into *norm (float32 or float64). Without it the step's prepare does
// that sum (StepLaunch: prepare.partials), one launch less when nothing reads the norm in between.
struct NormLaunch {
  NormArgs args;
  std::vector<Bucket> buckets;
  int64_t n_blocks;  // of every bucket together: the partials to sum
  double* partials;
  void* norm;
  bool norm_is_double;
  bool finish;
};

// The update, per dtype bucket one launch after a single-block prepare: it finishes the norm when
// given its partials, writes every row's scalars, then advances the step counts and clocks (the
// update reads only the scratch). Launches: 1 + buckets, sharing prepare.scratch in stream order.
struct StepLaunch {
  int rule;
  PrepareArgs prepare;
  UpdateArgs update;
  std::vector<Bucket> buckets;
  float* clocks;  // prepare.clocks, advanced by prepare once every row has read them
  int64_t n_groups;
};

std::string device_count(int* count);
// `device` < 0: launch on the current device; else on that device, restored afterwards.
std::string launch_norm(const NormLaunch& n, int device, void* stream);
std::string launch_step(const StepLaunch& s, int device, void* stream);

}  // namespace flr
