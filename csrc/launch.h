// The host-side entry points of kernels.cu. Plain C++ types only (streams as void*), so that
// bindings.cpp compiles without CUDA headers. Each returns an empty string on success, else
// the CUDA error; none of them synchronises.
#pragma once

#include <stdint.h>

#include <string>

#include "fused_lr_math.h"

namespace flr {

// dtype codes shared with fused_lr/cuda_backend.py
enum DType : int { DT_FLOAT32 = 0, DT_FLOAT64 = 1, DT_FLOAT16 = 2, DT_BFLOAT16 = 3 };

// A device table of tensors of one dtype (rows: TableCol) and its chunking.
struct TensorTable {
  const int64_t* table;
  int n_tensors;
  int64_t n_chunks;
  int64_t chunk_size;
};

std::string device_count(int* count);
std::string set_device(int device);
std::string launch_norm_partials(int dtype, const TensorTable& t, const float* grad_scale, const StepArgs& s,
                                 double* partials, void* stream);
std::string launch_norm_finish(const double* partials, int64_t n, void* norm, bool norm_is_double, void* stream);
std::string launch_update(int dtype, const TensorTable& t, const double* sched, const double* hyper,
                          const void* norm, const float* grad_scale, const float* found_inf, const StepArgs& s,
                          void* stream);
std::string launch_increment_steps(const int64_t* table, int n_tensors, const float* found_inf, void* stream);

}  // namespace flr
