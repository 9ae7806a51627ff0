// fused_lr._cuda: the kernels of kernels.cu behind a torch-free interface. Tensors arrive as
// raw device addresses and the stream as the integer torch.cuda.Stream.cuda_stream, so one
// build serves every torch version (no libtorch ABI involved).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "launch.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void raise_if(const std::string& err) {
  if (!err.empty()) throw std::runtime_error("fused_lr._cuda: " + err);
}

flr::TensorTable tensor_table(uintptr_t table, int n_tensors, int64_t n_chunks, int64_t chunk_size) {
  if (n_tensors < 0 || n_chunks < 0 || n_chunks >= (int64_t{1} << 31) || chunk_size <= 0)
    throw std::invalid_argument("fused_lr._cuda: bad tensor table shape");
  return {ptr<const int64_t>(table), n_tensors, n_chunks, chunk_size};
}

flr::StepArgs step_args(bool has_norm, double max_norm, bool norm_is_double, bool has_clip_value,
                        double clip_value) {
  return {max_norm, clip_value, has_norm, norm_is_double, has_clip_value};
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fused_lr CUDA kernels (raw device pointers; see fused_lr/cuda_backend.py)";
  m.attr("TABLE_COLS") = static_cast<int>(flr::TABLE_COLS);
  m.attr("HYPER_COLS") = static_cast<int>(flr::HYPER_COLS);

  // (count, "") or (0, why): this module's own CUDA runtime may not work where torch's does
  // (e.g. a driver older than the toolkit it was built with).
  m.def("probe", [] {
    int count = 0;
    std::string err = flr::device_count(&count);
    return py::make_tuple(count, err);
  });

  m.def("set_device", [](int device) { raise_if(flr::set_device(device)); }, py::arg("device"));

  m.def(
      "norm_partials",
      [](int dtype, uintptr_t table, int n_tensors, int64_t n_chunks, int64_t chunk_size, uintptr_t grad_scale,
         bool has_clip_value, double clip_value, uintptr_t partials, uintptr_t stream) {
        const auto t = tensor_table(table, n_tensors, n_chunks, chunk_size);
        const auto s = step_args(false, 0.0, false, has_clip_value, clip_value);
        raise_if(flr::launch_norm_partials(dtype, t, ptr<const float>(grad_scale), s, ptr<double>(partials),
                                           ptr<void>(stream)));
      },
      py::arg("dtype"), py::arg("table"), py::arg("n_tensors"), py::arg("n_chunks"), py::arg("chunk_size"),
      py::arg("grad_scale"), py::arg("has_clip_value"), py::arg("clip_value"), py::arg("partials"),
      py::arg("stream"));

  m.def(
      "norm_finish",
      [](uintptr_t partials, int64_t n, uintptr_t norm, bool norm_is_double, uintptr_t stream) {
        raise_if(flr::launch_norm_finish(ptr<const double>(partials), n, ptr<void>(norm), norm_is_double,
                                         ptr<void>(stream)));
      },
      py::arg("partials"), py::arg("n"), py::arg("norm"), py::arg("norm_is_double"), py::arg("stream"));

  m.def(
      "update",
      [](int dtype, uintptr_t table, int n_tensors, int64_t n_chunks, int64_t chunk_size, uintptr_t sched,
         uintptr_t hyper, uintptr_t norm, bool norm_is_double, double max_norm, bool has_clip_value,
         double clip_value, uintptr_t grad_scale, uintptr_t found_inf, uintptr_t stream) {
        const auto t = tensor_table(table, n_tensors, n_chunks, chunk_size);
        const auto s = step_args(norm != 0, max_norm, norm_is_double, has_clip_value, clip_value);
        raise_if(flr::launch_update(dtype, t, ptr<const double>(sched), ptr<const double>(hyper),
                                    ptr<const void>(norm), ptr<const float>(grad_scale),
                                    ptr<const float>(found_inf), s, ptr<void>(stream)));
      },
      py::arg("dtype"), py::arg("table"), py::arg("n_tensors"), py::arg("n_chunks"), py::arg("chunk_size"),
      py::arg("sched"), py::arg("hyper"), py::arg("norm"), py::arg("norm_is_double"), py::arg("max_norm"),
      py::arg("has_clip_value"), py::arg("clip_value"), py::arg("grad_scale"), py::arg("found_inf"),
      py::arg("stream"));

  m.def(
      "increment_steps",
      [](uintptr_t table, int n_tensors, uintptr_t found_inf, uintptr_t stream) {
        raise_if(flr::launch_increment_steps(ptr<const int64_t>(table), n_tensors, ptr<const float>(found_inf),
                                             ptr<void>(stream)));
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("found_inf"), py::arg("stream"));
}
