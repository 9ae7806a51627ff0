// fused_lr._cuda: the kernels of kernels.cu behind a torch-free interface. Tensors arrive as
// raw device addresses and the stream as the integer torch hands out for it, so one build serves
// every torch version (no libtorch ABI involved). fused_lr/backends/cuda.py drives it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "launch.h"

namespace py = pybind11;

namespace {

// The header this module was compiled with, as generated from fused_lr/core/layout.py: the
// backend compares it with the installed layout.py to tell a stale build.
const char LAYOUT_HEADER[] =
#include "fused_lr_layout_text.inc"
    ;

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void raise_if(const std::string& err) {
  if (!err.empty()) throw std::runtime_error("fused_lr._cuda: " + err);
}

std::vector<flr::Bucket> buckets(const std::vector<int>& dtypes, const std::vector<int64_t>& first_blocks,
                                 const std::vector<int64_t>& n_blocks) {
  if (dtypes.size() != first_blocks.size() || dtypes.size() != n_blocks.size())
    throw std::invalid_argument("fused_lr._cuda: dtypes, first_blocks and n_blocks differ in length");
  std::vector<flr::Bucket> out;
  for (size_t i = 0; i < dtypes.size(); ++i) out.push_back({dtypes[i], first_blocks[i], n_blocks[i]});
  return out;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fused_lr CUDA kernels (raw device addresses; driven by fused_lr/backends/cuda.py)";
  m.attr("LAYOUT_HEADER") = py::str(LAYOUT_HEADER);
  py::dict dtypes;
  for (int code = 0; code < flr::DT_COUNT; ++code) dtypes[flr::DTYPE_NAMES[code]] = code;
  m.attr("DTYPES") = dtypes;

  // (count, "") or (0, why): this module's own CUDA runtime may not work where torch's does
  // (e.g. a driver older than the toolkit it was built with).
  m.def("probe", [] {
    int count = 0;
    std::string err = flr::device_count(&count);
    return py::make_tuple(count, err);
  });

  m.def(
      "norm",
      [](uintptr_t table, uintptr_t blocks, const std::vector<int>& dtypes, const std::vector<int64_t>& first_blocks,
         const std::vector<int64_t>& n_blocks, int64_t total_blocks, uintptr_t grad_scale, bool has_clip_value,
         double clip_value, uintptr_t partials, uintptr_t norm, bool norm_is_double, bool finish, int device,
         uintptr_t stream) {
        flr::NormLaunch n;
        n.args = {ptr<const int64_t>(table), ptr<const int32_t>(blocks), ptr<const float>(grad_scale), has_clip_value,
                  clip_value};
        n.buckets = buckets(dtypes, first_blocks, n_blocks);
        n.n_blocks = total_blocks;
        n.partials = ptr<double>(partials);
        n.norm = ptr<void>(norm);
        n.norm_is_double = norm_is_double;
        n.finish = finish;
        raise_if(flr::launch_norm(n, device, ptr<void>(stream)));
      },
      py::arg("table"), py::arg("blocks"), py::arg("dtypes"), py::arg("first_blocks"), py::arg("n_blocks"),
      py::arg("total_blocks"), py::arg("grad_scale"), py::arg("has_clip_value"), py::arg("clip_value"),
      py::arg("partials"), py::arg("norm"), py::arg("norm_is_double"), py::arg("finish"), py::arg("device"),
      py::arg("stream"));

  m.def(
      "step",
      [](int rule, int64_t program, uintptr_t table, uintptr_t blocks, int64_t n_tensors, const std::vector<int>& dtypes,
         const std::vector<int64_t>& first_blocks, const std::vector<int64_t>& n_blocks, uintptr_t hyper,
         uintptr_t sched, uintptr_t lr32, uintptr_t lr64, uintptr_t clocks, int64_t n_groups, uintptr_t scratch,
         uintptr_t norm, bool norm_is_double, uintptr_t partials, int64_t n_partials, bool clip_by_norm, double max_norm, double rate_power,
         double rate_eps, uintptr_t grad_scale, uintptr_t found_inf, bool has_clip_value, double clip_value,
         int device, uintptr_t stream) {
        flr::StepLaunch s;
        s.rule = rule;
        s.prepare = {ptr<const int64_t>(table), n_tensors, ptr<const double>(hyper), ptr<const double>(sched),
                     ptr<const int64_t>(lr32), ptr<const int64_t>(lr64), ptr<const float>(clocks),
                     ptr<void>(norm), norm_is_double, ptr<const double>(partials), n_partials, clip_by_norm, max_norm, rate_power, rate_eps,
                     ptr<const float>(grad_scale), ptr<const float>(found_inf), ptr<double>(scratch), program};
        s.update = {ptr<const int64_t>(table), ptr<const int32_t>(blocks), n_tensors, ptr<const double>(hyper),
                    ptr<const double>(scratch), has_clip_value, clip_value};
        s.buckets = buckets(dtypes, first_blocks, n_blocks);
        s.clocks = ptr<float>(clocks);
        s.n_groups = n_groups;
        raise_if(flr::launch_step(s, device, ptr<void>(stream)));
      },
      py::arg("rule"), py::arg("program"), py::arg("table"), py::arg("blocks"), py::arg("n_tensors"), py::arg("dtypes"),
      py::arg("first_blocks"), py::arg("n_blocks"), py::arg("hyper"), py::arg("sched"), py::arg("lr32"),
      py::arg("lr64"), py::arg("clocks"), py::arg("n_groups"), py::arg("scratch"), py::arg("norm"),
      py::arg("norm_is_double"), py::arg("partials"), py::arg("n_partials"), py::arg("clip_by_norm"), py::arg("max_norm"), py::arg("rate_power"),
      py::arg("rate_eps"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("has_clip_value"),
      py::arg("clip_value"), py::arg("device"), py::arg("stream"));
}
