// fused_lr._meta: the compiled twin of fused_lr/core/meta.py's structure_py and grads_py.
//
// Both functions must give exactly what the Python ones give, for every input: the same bytes,
// the same lists, the same None/address decisions and the same exceptions. meta.py is the
// reference. This file reads the tensor metadata directly (tens of nanoseconds a tensor where
// Python's attribute reads take microseconds) on the inputs the optimizer passes (lists or tuples
// of lists or tuples, a dict or defaultdict of state) and hands the call, unchanged, to the Python
// function whenever a direct read could disagree with Python's attribute reads:
//
//   * an argument of another type (an iterator, a custom mapping, a list subclass, a non-iterable):
//     the Python function does the iteration and raises the TypeError itself;
//   * a TorchFunctionMode other than torch.set_default_device's is active (Python's tensor attribute
//     reads would go through it);
//   * a read of a plain tensor throws a C++ exception (e.g. the strides of a sparse tensor, the
//     sizes of a nested one): Python's read raises the translated exception;
//   * a value does not fit the int64 record (meta.py's array("q", ...) raises OverflowError);
//   * a tensor whose metaclass defines its own comparison (type(t) in _PLAIN would call it).
//
// A hand-over re-runs the whole call in Python; the only side effects it repeats are those of
// user code that the first pass already ran (an object's __class__ property that isinstance
// reads, a tensor subclass's .grad property).
//
// Headers: only ATen/core/TensorBase.h, the TorchFunctionMode state and DynamicTypes.h (for
// getTHPDtype), not torch/csrc/autograd/python_variable.h (which pulls pybind11 and the autograd
// headers: about 8 times the compile time). The Python tensor object is read through PyTensor
// below, the layout of torch's THPVariable (PyObject_HEAD, then the at::Tensor); module init
// checks that layout against a live tensor and refuses to import on any difference, and the
// module also refuses a torch other than the one it was compiled against.

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/TensorBase.h>
#include <torch/csrc/DynamicTypes.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifndef FUSED_LR_TORCH_VERSION
#error "FUSED_LR_TORCH_VERSION (torch.__version__ at build time) must be defined"
#endif

namespace {

// the record's kinds, as in fused_lr/core/meta.py
constexpr int64_t DENSE = 1, OPAQUE = 2, OTHER = 3;

// torch's Python tensor object (THPVariable): the header, then the tensor. Only the tensor is read.
struct PyTensor {
  PyObject_HEAD
  at::TensorBase cdata;
};

PyTypeObject* g_tensor_type = nullptr;  // torch.Tensor
PyTypeObject* g_param_type = nullptr;   // torch.nn.Parameter
PyTypeObject* g_defaultdict = nullptr;  // collections.defaultdict
PyObject* g_tensor = nullptr;           // torch.Tensor, for isinstance
PyTypeObject* g_device_context = nullptr;  // torch.utils._device.DeviceContext, or null
PyObject* g_grad_name = nullptr;        // "grad", interned
PyObject* g_py_structure = nullptr;     // meta.structure_py, looked up on first hand-over
PyObject* g_py_grads = nullptr;         // meta.grads_py

// A CPython call failed: its exception is set and is returned to the caller as it is.
struct PyErrSet {};
// The Python function must answer this call (see the top of the file).
struct HandOver {};

// An owned reference.
class Ref {
 public:
  explicit Ref(PyObject* o = nullptr) : o_(o) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(o_); }
  PyObject* get() const { return o_; }
  PyObject* release() {
    PyObject* o = o_;
    o_ = nullptr;
    return o;
  }

 private:
  PyObject* o_;
};

inline PyObject* check(PyObject* o) {
  if (o == nullptr) throw PyErrSet();
  return o;
}

inline const at::TensorBase& unpack(PyObject* o) {
  return reinterpret_cast<PyTensor*>(o)->cdata;
}

// `type(x) in (torch.Tensor, torch.nn.Parameter)`. The tuple's test compares with ==, which for
// types is identity unless type(x)'s metaclass brings its own comparison: then Python decides.
inline bool plain(PyTypeObject* tp) {
  if (tp == g_tensor_type || tp == g_param_type) return true;
  if (Py_TYPE(tp)->tp_richcompare != PyType_Type.tp_richcompare) throw HandOver();
  return false;
}

// `isinstance(v, torch.Tensor)`. torch.Tensor's metaclass keeps type.__instancecheck__ (checked at
// import), so a subclass is an instance and the builtin value types (whose __class__ cannot be
// redefined) are not; anything else may answer through __class__, which only Python reads.
inline bool is_tensor(PyObject* v) {
  PyTypeObject* tp = Py_TYPE(v);
  if (tp == g_tensor_type || tp == g_param_type || PyType_IsSubtype(tp, g_tensor_type)) return true;
  if (tp == &PyFloat_Type || tp == &PyLong_Type || tp == &PyBool_Type || tp == &PyUnicode_Type ||
      tp == Py_TYPE(Py_None) || tp == &PyList_Type || tp == &PyTuple_Type || tp == &PyDict_Type ||
      tp == &PyBytes_Type || tp == &PyComplex_Type)
    return false;
  int r = PyObject_IsInstance(v, g_tensor);
  if (r < 0) throw PyErrSet();
  return r != 0;
}

inline int64_t device_code(c10::DeviceType type) {
  return type == c10::DeviceType::CPU ? 0 : type == c10::DeviceType::CUDA ? 1 : 2;
}

inline int64_t as_int(const c10::SymInt& s) {
  if (auto v = s.maybe_as_int()) return *v;
  throw HandOver();  // a symbolic size: Python's record would hold a SymInt
}

// The fingerprint's int64 words. With `expected` (exact bytes), the words are compared with it as
// they come and nothing is stored while they match; at the first difference the matching prefix
// is copied from `expected` and the rest is stored. Without it, everything is stored. The words
// are stored in the bytes object that will be returned (`words`: a first guess of their number).
class Sig {
 public:
  Sig(PyObject* expected, size_t words) : guess_(8 * words) {
    if (expected != nullptr) {
      exp_ = PyBytes_AS_STRING(expected);
      exp_len_ = PyBytes_GET_SIZE(expected);
      cur_ = exp_;
      end_ = exp_ + exp_len_ / 8 * 8;
      matching_ = true;
    } else {
      reserve(0, guess_);
    }
  }
  ~Sig() { Py_XDECREF(buf_); }
  Sig(const Sig&) = delete;
  Sig& operator=(const Sig&) = delete;

  C10_ALWAYS_INLINE void put(int64_t v) {
    if (matching_) {
      if (C10_LIKELY(cur_ != end_)) {
        int64_t e;
        std::memcpy(&e, cur_, 8);
        if (C10_LIKELY(e == v)) {
          cur_ += 8;
          return;
        }
      }
    } else if (C10_LIKELY(cur_ != end_)) {
      std::memcpy(const_cast<char*>(cur_), &v, 8);
      cur_ += 8;
      return;
    }
    put_slow(v);
  }

  // id(x) or an address: meta.py's array("q", ...) refuses one at or above 2**63
  C10_ALWAYS_INLINE void put_address(const void* p) {
    auto v = reinterpret_cast<uintptr_t>(p);
    if (C10_UNLIKELY(v > static_cast<uintptr_t>(INT64_MAX))) throw HandOver();
    put(static_cast<int64_t>(v));
  }

  // None when the record equals `expected`, else the record as bytes; for an `expected` of another
  // type, `None if sig == expected else sig` as in meta.py.
  PyObject* finish(PyObject* expected) {
    if (matching_) {
      if (cur_ - exp_ == exp_len_) Py_RETURN_NONE;
      return check(PyBytes_FromStringAndSize(exp_, cur_ - exp_));
    }
    size_t used = static_cast<size_t>(cur_ - PyBytes_AS_STRING(buf_));
    if (_PyBytes_Resize(&buf_, static_cast<Py_ssize_t>(used)) < 0) throw PyErrSet();
    Ref sig(buf_);
    buf_ = nullptr;
    if (expected == nullptr || expected == Py_None) return sig.release();
    Ref eq(check(PyObject_RichCompare(sig.get(), expected, Py_EQ)));
    int same = PyObject_IsTrue(eq.get());
    if (same < 0) throw PyErrSet();
    if (same) Py_RETURN_NONE;
    return sig.release();
  }

 private:
  // the first word that differs from `expected`, or a full buffer
  C10_NOINLINE void put_slow(int64_t v) {
    if (matching_) {
      matching_ = false;
      size_t done = static_cast<size_t>(cur_ - exp_);
      reserve(0, std::max(guess_, done + done / 2 + 1024));
      std::memcpy(PyBytes_AS_STRING(buf_), exp_, done);
      cur_ = PyBytes_AS_STRING(buf_) + done;
    } else {
      size_t used = static_cast<size_t>(cur_ - PyBytes_AS_STRING(buf_));
      reserve(used, 2 * used + 1024);
    }
    put(v);
  }

  // room for `bytes` in buf_, the first `used` kept
  void reserve(size_t used, size_t bytes) {
    bytes = bytes / 8 * 8;
    if (buf_ == nullptr) {
      buf_ = check(PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(bytes)));
    } else if (_PyBytes_Resize(&buf_, static_cast<Py_ssize_t>(bytes)) < 0) {
      throw PyErrSet();
    }
    cur_ = PyBytes_AS_STRING(buf_) + used;
    end_ = PyBytes_AS_STRING(buf_) + bytes;
  }

  const char* exp_ = nullptr;
  Py_ssize_t exp_len_ = 0;
  const char* cur_ = nullptr;  // the next word: in `expected` while matching, else in buf_
  const char* end_ = nullptr;
  bool matching_ = false;
  size_t guess_;
  PyObject* buf_ = nullptr;  // a bytes object, resized to its words at the end
};

// meta._tensor
void put_tensor(Sig& sig, PyObject* v) {
  PyTypeObject* tp = Py_TYPE(v);
  sig.put_address(v);
  sig.put_address(tp);
  if (!plain(tp)) {
    sig.put(OPAQUE);
    return;
  }
  const at::TensorBase& t = unpack(v);
  if (t.layout() != c10::kStrided || t.device().type() == c10::DeviceType::Meta) {
    sig.put(OPAQUE);
    return;
  }
  sig.put(DENSE);
  sig.put_address(t.data_ptr());
  sig.put_address(torch::getTHPDtype(t.scalar_type()));
  c10::Device device = t.device();
  sig.put(device_code(device.type()));
  sig.put(device.index());  // -1 without an index, as meta.py writes None
  sig.put(t.dim());
  for (const c10::SymInt& s : t.sym_sizes()) sig.put(as_int(s));
  for (const c10::SymInt& s : t.sym_strides()) sig.put(as_int(s));
}

// meta._value
inline void put_value(Sig& sig, PyObject* v) {
  if (is_tensor(v)) {
    put_tensor(sig, v);
  } else {
    sig.put(OTHER);
    sig.put_address(v);
  }
}

inline bool is_sequence(PyObject* o) {
  return PyList_CheckExact(o) || PyTuple_CheckExact(o);
}

inline PyObject* item_at(PyObject* seq, Py_ssize_t i) {
  return PyList_CheckExact(seq) ? PyList_GET_ITEM(seq, i) : PyTuple_GET_ITEM(seq, i);
}

// `for x in seq` over an exact list or tuple: the length is read again at every step and each item
// is held while `f` runs, as Python's list iterator does.
template <typename F>
void for_each(PyObject* seq, F&& f) {
  for (Py_ssize_t i = 0; i < Py_SIZE(seq); ++i) {
    PyObject* item = item_at(seq, i);
    Py_INCREF(item);
    Ref hold(item);
    f(item);
  }
}

// `for k, v in d.items()` over a dict (or a subclass that keeps dict's items), with the checks
// of Python's dict iterator.
template <typename F>
void for_each_item(PyObject* d, F&& f) {
  Py_ssize_t pos = 0, used = PyDict_GET_SIZE(d), left = used;
  PyObject *k, *v;
  for (;;) {
    if (PyDict_GET_SIZE(d) != used) {
      PyErr_SetString(PyExc_RuntimeError, "dictionary changed size during iteration");
      throw PyErrSet();
    }
    if (!PyDict_Next(d, &pos, &k, &v)) return;
    if (left-- == 0) {
      PyErr_SetString(PyExc_RuntimeError, "dictionary keys changed during iteration");
      throw PyErrSet();
    }
    Py_INCREF(k);
    Ref hold_k(k);
    Py_INCREF(v);
    Ref hold_v(v);
    f(k, v);
  }
}

// Warming before a walk. A step's walk meets its objects cold (a forward and backward ran since the
// last one), and each tensor is a chain of dependent loads: the Python object, its TensorImpl, its
// StorageImpl, and for state an entry's dict and its keys first. Walked one tensor after another,
// every link is a cache miss waiting for the one before. These passes issue one level of the chain
// for every object at once (independent misses overlap), so the walk itself then finds each level
// in cache. Prefetches only: what the walk reads and returns is unchanged; an object that is not
// a plain tensor is not looked into.
inline void touch(const void* p) {
  __builtin_prefetch(p, 0, 3);
}

void prefetch_tensors(const std::vector<PyObject*>& objects) {
  for (PyObject* o : objects) touch(o);
  std::vector<const c10::TensorImpl*> impls;
  impls.reserve(objects.size());
  for (PyObject* o : objects) {
    PyTypeObject* tp = Py_TYPE(o);
    if (tp != g_tensor_type && tp != g_param_type) continue;
    const c10::TensorImpl* impl = unpack(o).unsafeGetTensorImpl();
    const char* bytes = reinterpret_cast<const char*>(impl);
    for (size_t line = 0; line < sizeof(c10::TensorImpl); line += 64) touch(bytes + line);
    impls.push_back(impl);
  }
  for (const c10::TensorImpl* impl : impls) {
    // unsafe_storage is inline (has_storage is virtual); null for a tensor without storage
    if (const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl()) touch(storage);
  }
}

// The objects of a list or tuple of lists or tuples (others are left to the walk).
void gather_items(PyObject* seq, std::vector<PyObject*>& out) {
  for (Py_ssize_t i = 0; i < Py_SIZE(seq); ++i) out.push_back(item_at(seq, i));
}

// The values of every entry of `state` that is a dict (the state tensors, mostly), their dicts
// warmed first.
void gather_state(PyObject* state, std::vector<PyObject*>& out) {
  std::vector<PyObject*> entries;
  Py_ssize_t pos = 0;
  PyObject *k, *v;
  while (PyDict_Next(state, &pos, &k, &v)) {
    if (PyDict_CheckExact(v)) {
      touch(v);
      entries.push_back(v);
    }
  }
  for (PyObject* d : entries) {
    const char* keys = reinterpret_cast<const char*>(reinterpret_cast<PyDictObject*>(d)->ma_keys);
    touch(keys);
    touch(keys + 64);
  }
  for (PyObject* d : entries) {
    pos = 0;
    while (PyDict_Next(d, &pos, &k, &v)) out.push_back(v);
  }
}

PyObject* python_twin(PyObject*& cache, const char* name) {
  if (cache == nullptr) {
    Ref mod(check(PyImport_ImportModule("fused_lr.core.meta")));
    cache = check(PyObject_GetAttrString(mod.get(), name));
  }
  return cache;
}

// Python's reads of a plain tensor's metadata go through the active TorchFunctionModes, which may
// change them. The one torch.set_default_device and `with torch.device(...)` push (DeviceContext)
// returns every such read unchanged; any other mode sends the call to Python.
bool modes_pass_reads_through() {
  if (!at::impl::torch_function_mode_enabled()) return true;
  if (g_device_context == nullptr) return false;
  using TLS = at::impl::PythonTorchFunctionTLS;
  for (int64_t i = 0, n = TLS::stack_len(); i < n; ++i) {
    const auto& mode = TLS::get_stack_at(i);
    if (!mode || Py_TYPE(mode->ptr(&mode->pyinterpreter())) != g_device_context) return false;
  }
  return true;
}

// Runs `body`; a hand-over or a C++ exception from torch calls the Python function instead, with
// the arguments `args` (a tuple, made only then).
template <typename F, typename A>
PyObject* run(F&& body, PyObject*& cache, const char* name, A&& args) {
  try {
    if (modes_pass_reads_through()) return body();
  } catch (const PyErrSet&) {
    return nullptr;
  } catch (...) {
    if (PyErr_Occurred()) return nullptr;
  }
  try {
    PyObject* fn = python_twin(cache, name);
    Ref tuple(check(args()));
    return PyObject_Call(fn, tuple.get(), nullptr);
  } catch (const PyErrSet&) {
    return nullptr;
  }
}

// Arguments as a def with these parameter names would take them (positional or keyword).
bool parse(const char* fname, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, const char* const* names,
           int required, int total, PyObject** out) {
  if (nargs > total) {
    if (required == total) {
      PyErr_Format(PyExc_TypeError, "%s() takes %d positional arguments but %zd were given", fname, total, nargs);
    } else {
      PyErr_Format(PyExc_TypeError, "%s() takes from %d to %d positional arguments but %zd were given", fname,
                   required, total, nargs);
    }
    return false;
  }
  for (int i = 0; i < total; ++i) out[i] = i < nargs ? args[i] : nullptr;
  Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  for (Py_ssize_t k = 0; k < nkw; ++k) {
    PyObject* key = PyTuple_GET_ITEM(kwnames, k);
    int i = 0;
    for (; i < total; ++i) {
      if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) break;
    }
    if (i == total) {
      PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fname, key);
      return false;
    }
    if (out[i] != nullptr) {
      PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname, names[i]);
      return false;
    }
    out[i] = args[nargs + k];
  }
  for (int i = 0; i < required; ++i) {
    if (out[i] == nullptr) {
      PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname, names[i]);
      return false;
    }
  }
  return true;
}

PyObject* structure(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {"param_lists", "state", "expected"};
  PyObject* a[3];
  if (!parse("structure", args, nargs, kwnames, names, 2, 3, a)) return nullptr;
  PyObject *param_lists = a[0], *state = a[1], *expected = a[2] ? a[2] : Py_None;
  return run(
      [&]() -> PyObject* {
        if (!is_sequence(param_lists) ||
            !(PyDict_CheckExact(state) || Py_TYPE(state) == g_defaultdict))
          throw HandOver();
        size_t params_in_all = 0;
        for_each(param_lists, [&](PyObject* params) {
          if (!is_sequence(params)) throw HandOver();
          params_in_all += static_cast<size_t>(Py_SIZE(params));
        });
        // the record's length, roughly: 16 words a parameter, 48 a state entry (two tensors)
        size_t words = 16 * params_in_all + 48 * static_cast<size_t>(PyDict_GET_SIZE(state)) + 64;
        std::vector<PyObject*> objects;
        objects.reserve(params_in_all + 4 * static_cast<size_t>(PyDict_GET_SIZE(state)));  // AMSGrad: 4 values
        for_each(param_lists, [&](PyObject* params) { gather_items(params, objects); });
        gather_state(state, objects);
        prefetch_tensors(objects);
        Sig sig(PyBytes_CheckExact(expected) ? expected : nullptr, words);
        sig.put(Py_SIZE(param_lists));
        for_each(param_lists, [&](PyObject* params) {
          if (!is_sequence(params)) throw HandOver();  // replaced while the loop ran user code
          sig.put(Py_SIZE(params));
          for_each(params, [&](PyObject* p) { put_value(sig, p); });
        });
        sig.put(PyDict_GET_SIZE(state));
        for_each_item(state, [&](PyObject* key, PyObject* entry) {
          sig.put_address(key);
          sig.put_address(entry);
          if (PyDict_CheckExact(entry)) {
            sig.put(PyDict_GET_SIZE(entry));
            for_each_item(entry, [&](PyObject* name, PyObject* v) {
              sig.put_address(name);
              put_value(sig, v);
            });
          } else {
            sig.put(OTHER);
          }
        });
        return sig.finish(expected);
      },
      g_py_structure, "structure_py", [&] { return PyTuple_Pack(3, param_lists, state, expected); });
}

// grads_py's test of a (parameter, present gradient) pair: may a kernel walk g with p's extent?
bool laid_out_like(PyObject* p, PyObject* g) {
  if (!plain(Py_TYPE(g)) || !plain(Py_TYPE(p))) return false;
  const at::TensorBase& gt = unpack(g);
  const at::TensorBase& pt = unpack(p);
  if (gt.layout() != c10::kStrided || gt.device().type() == c10::DeviceType::Meta) return false;
  if (gt.scalar_type() != pt.scalar_type() || gt.device() != pt.device()) return false;
  c10::SymIntArrayRef gs = gt.sym_sizes(), ps = pt.sym_sizes();
  if (gs.size() != ps.size()) return false;
  for (size_t i = 0; i < gs.size(); ++i) {
    if (as_int(gs[i]) != as_int(ps[i])) return false;
  }
  c10::SymIntArrayRef gd = gt.sym_strides(), pd = pt.sym_strides();
  if (gd.size() != pd.size()) return false;
  for (size_t i = 0; i < gd.size(); ++i) {
    if (as_int(gd[i]) != as_int(pd[i])) return false;
  }
  return true;
}

PyObject* grads(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {"params"};
  PyObject* params;
  if (!parse("grads", args, nargs, kwnames, names, 1, 1, &params)) return nullptr;
  return run(
      [&]() -> PyObject* {
        if (!is_sequence(params)) throw HandOver();
        std::vector<PyObject*> objects;
        gather_items(params, objects);
        prefetch_tensors(objects);
        for (PyObject* p : objects) {  // .grad is read through each parameter's autograd record
          PyTypeObject* tp = Py_TYPE(p);
          if (tp != g_tensor_type && tp != g_param_type) continue;
          const char* meta = reinterpret_cast<const char*>(unpack(p).unsafeGetTensorImpl()->autograd_meta());
          if (meta != nullptr) {
            touch(meta);
            touch(meta + 64);
          }
        }
        // grads = [p.grad for p in params]
        Py_ssize_t n = Py_SIZE(params), filled = 0;
        Ref grads(check(PyList_New(n)));
        for_each(params, [&](PyObject* p) {
          PyObject* g = check(PyObject_GetAttr(p, g_grad_name));
          if (filled < n) {
            PyList_SET_ITEM(grads.get(), filled, g);
          } else {
            Ref hold(g);
            if (PyList_Append(grads.get(), g) < 0) throw PyErrSet();
          }
          ++filled;
        });
        if (filled < n && PyList_SetSlice(grads.get(), filled, n, nullptr) < 0) throw PyErrSet();
        objects.clear();
        gather_items(grads.get(), objects);
        prefetch_tensors(objects);
        // for p, g in zip(params, grads, strict=True): 0 for a missing gradient, the address of one
        // laid out like its parameter, and the first other one ends it with None
        Py_ssize_t ng = PyList_GET_SIZE(grads.get());
        Ref ptrs(check(PyList_New(ng)));
        for (Py_ssize_t i = 0;; ++i) {
          if (i >= Py_SIZE(params)) {
            if (i < ng) {
              PyErr_SetString(PyExc_ValueError, "zip() argument 2 is longer than argument 1");
              throw PyErrSet();
            }
            break;
          }
          if (i >= ng) {
            PyErr_SetString(PyExc_ValueError, "zip() argument 2 is shorter than argument 1");
            throw PyErrSet();
          }
          PyObject* p = item_at(params, i);
          PyObject* g = PyList_GET_ITEM(grads.get(), i);
          void* ptr = nullptr;
          if (g != Py_None) {
            if (!laid_out_like(p, g)) return check(PyTuple_Pack(2, grads.get(), Py_None));
            ptr = unpack(g).data_ptr();
          }
          PyList_SET_ITEM(ptrs.get(), i, check(PyLong_FromVoidPtr(ptr)));
        }
        return check(PyTuple_Pack(2, grads.get(), ptrs.get()));
      },
      g_py_grads, "grads_py", [&] { return PyTuple_Pack(1, params); });
}

PyMethodDef methods[] = {
    {"structure", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(structure)),
     METH_FASTCALL | METH_KEYWORDS,
     "structure(param_lists, state, expected=None) -> bytes | None\n\n"
     "fused_lr.core.meta.structure_py, compiled: the same result for every input."},
    {"grads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(grads)), METH_FASTCALL | METH_KEYWORDS,
     "grads(params) -> (grads, ptrs | None)\n\n"
     "fused_lr.core.meta.grads_py, compiled: the same result for every input."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "fused_lr._meta",
    "The compiled twin of fused_lr.core.meta's structure_py and grads_py (csrc/meta/meta.cpp).", -1, methods,
    nullptr, nullptr, nullptr, nullptr};

PyObject* import_error(PyObject* fmt_arg, const char* fmt) {
  PyErr_Format(PyExc_ImportError, fmt, fmt_arg);
  return nullptr;
}

// The tensor object's layout is the one PyTensor describes: a live tensor's at::Tensor is where
// PyTensor puts it (its TensorImpl address equals Python's t._cdata), and what it reads there
// equals what Python reads.
bool layout_matches(PyObject* torch) {
  if (g_tensor_type->tp_basicsize < static_cast<Py_ssize_t>(sizeof(PyTensor))) return false;
  // the reads below are the tensor's own, whatever TorchFunctionMode (a default device too) is active
  using TLS = at::impl::PythonTorchFunctionTLS;
  struct Restore {
    at::impl::TorchFunctionDisabledState state = TLS::get_disabled_state();
    ~Restore() { TLS::set_disabled_state(state); }
  } restore;
  TLS::set_disabled_state(at::impl::TorchFunctionDisabledState::ALL_DISABLED);
  Ref empty(check(PyObject_GetAttrString(torch, "empty")));
  Ref t0(check(PyObject_CallFunction(empty.get(), "ii", 3, 2)));
  Ref t(check(PyObject_CallMethod(t0.get(), "t", nullptr)));
  if (Py_TYPE(t.get()) != g_tensor_type) return false;
  Ref cdata(check(PyObject_GetAttrString(t.get(), "_cdata")));
  void* impl = PyLong_AsVoidPtr(cdata.get());
  if (impl == nullptr && PyErr_Occurred()) throw PyErrSet();
  void* word;
  std::memcpy(&word, reinterpret_cast<char*>(t.get()) + offsetof(PyTensor, cdata), sizeof(word));
  if (word != impl) return false;
  const at::TensorBase& tb = unpack(t.get());
  if (tb.unsafeGetTensorImpl() != impl) return false;
  Ref ptr(check(PyObject_CallMethod(t.get(), "data_ptr", nullptr)));
  Ref dtype(check(PyObject_GetAttrString(t.get(), "dtype")));
  Ref stride(check(PyObject_CallMethod(t.get(), "stride", nullptr)));
  if (PyLong_AsVoidPtr(ptr.get()) != tb.data_ptr()) return false;
  if (dtype.get() != reinterpret_cast<PyObject*>(torch::getTHPDtype(tb.scalar_type()))) return false;
  return tb.dim() == 2 && tb.sizes()[0] == 2 && tb.sizes()[1] == 3 && tb.strides()[0] == 1 && tb.strides()[1] == 2 &&
         PyTuple_Check(stride.get()) && PyTuple_GET_SIZE(stride.get()) == 2 &&
         PyLong_AsLongLong(PyTuple_GET_ITEM(stride.get(), 0)) == 1 &&
         PyLong_AsLongLong(PyTuple_GET_ITEM(stride.get(), 1)) == 2;
}

PyObject* init() {
  Ref torch(PyImport_ImportModule("torch"));
  if (!torch.get()) return nullptr;
  Ref version(PyObject_GetAttrString(torch.get(), "__version__"));
  if (!version.get()) return nullptr;
  Ref version_str(PyObject_Str(version.get()));
  if (!version_str.get()) return nullptr;
  if (PyUnicode_CompareWithASCIIString(version_str.get(), FUSED_LR_TORCH_VERSION) != 0) {
    return import_error(version_str.get(),
                        "fused_lr._meta was built against torch " FUSED_LR_TORCH_VERSION
                        " and this is torch %U: reinstall fused_lr to rebuild it (meanwhile "
                        "fused_lr.core.meta uses its Python functions)");
  }
  Ref tensor(PyObject_GetAttrString(torch.get(), "Tensor"));
  Ref nn(PyObject_GetAttrString(torch.get(), "nn"));
  Ref param(nn.get() ? PyObject_GetAttrString(nn.get(), "Parameter") : nullptr);
  Ref collections(PyImport_ImportModule("collections"));
  Ref defaultdict(collections.get() ? PyObject_GetAttrString(collections.get(), "defaultdict") : nullptr);
  if (!tensor.get() || !param.get() || !defaultdict.get()) return nullptr;
  if (!PyType_Check(tensor.get()) || !PyType_Check(param.get()) || !PyType_Check(defaultdict.get())) {
    PyErr_SetString(PyExc_ImportError, "fused_lr._meta: torch.Tensor, torch.nn.Parameter or defaultdict is not a type");
    return nullptr;
  }
  {
    // is_tensor's shortcuts hold while isinstance(v, torch.Tensor) is type.__instancecheck__
    Ref own(PyObject_GetAttrString(reinterpret_cast<PyObject*>(Py_TYPE(tensor.get())), "__instancecheck__"));
    Ref base(PyObject_GetAttrString(reinterpret_cast<PyObject*>(&PyType_Type), "__instancecheck__"));
    if (!own.get() || !base.get()) return nullptr;
    if (own.get() != base.get()) {
      PyErr_SetString(PyExc_ImportError, "fused_lr._meta: torch.Tensor's metaclass defines __instancecheck__");
      return nullptr;
    }
  }
  {
    Ref device_module(PyImport_ImportModule("torch.utils._device"));
    Ref device_context(device_module.get() ? PyObject_GetAttrString(device_module.get(), "DeviceContext") : nullptr);
    if (device_context.get() && PyType_Check(device_context.get())) {
      g_device_context = reinterpret_cast<PyTypeObject*>(device_context.release());
    }
    PyErr_Clear();  // without it, every mode sends the call to Python
  }
  g_grad_name = PyUnicode_InternFromString("grad");
  if (!g_grad_name) return nullptr;
  g_tensor = tensor.release();
  g_tensor_type = reinterpret_cast<PyTypeObject*>(g_tensor);
  g_param_type = reinterpret_cast<PyTypeObject*>(param.release());
  g_defaultdict = reinterpret_cast<PyTypeObject*>(defaultdict.release());
  try {
    if (!layout_matches(torch.get())) {
      return import_error(version_str.get(),
                          "fused_lr._meta: torch %U's tensor object is not laid out as this module reads it");
    }
  } catch (const PyErrSet&) {
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_Format(PyExc_ImportError, "fused_lr._meta: the layout check failed: %s", e.what());
    return nullptr;
  }
  Ref module(PyModule_Create(&module_def));
  if (!module.get()) return nullptr;
  if (PyModule_AddStringConstant(module.get(), "TORCH_VERSION", FUSED_LR_TORCH_VERSION) < 0) return nullptr;
  return module.release();
}

}  // namespace

PyMODINIT_FUNC PyInit__meta() {
  return init();
}
