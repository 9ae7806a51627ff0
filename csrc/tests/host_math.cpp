// Host driver for csrc/fused_lr_math.h: tests/test_cuda_host.py compiles it with the system C++
// compiler, feeds it cases on stdin and checks the answers against the Python reference.
// One command per line, numbers separated by blanks; one line of output per command.
//
//   table  S[MAX_SEGMENTS*SEGMENT_COLS] n k[n]     -> eval_table(S, k) for each k
//   update f32|f64 rule program H[HYPER_COLS] S[...] clock step lr_kind lr has_scale scale has_norm norm norm_is_double
//          clip_by_norm max_norm rate_power rate_eps has_clip clip has_found_inf found_inf n_states n
//          (p g s[n_states])[n]
//                                                -> (p' s'[n_states])[n]: one tensor of the rule with
//                                                   that RULES code and coefficient program
//                                                   through prepare_row and
//                                                   update_block (one thread, so every element passes
//                                                   the same code; lr_kind 0: float lr, 1: float32
//                                                   tensor lr, 2: float64 tensor lr; s: the rule's
//                                                   states in declaration order)
//   norm   f32|f64 has_scale scale has_clip clip n g[n]
//                                                -> sqrt of norm_block's sum over one block
//   coef   f32|f64 max_norm n norm[n]             -> clip_coef(norm, max_norm) in that dtype, for each
//   blocks chunk n (numel first_chunk)[n] total row[total]
//                                                -> (row begin end) of block_range for each block
#include <stdio.h>
#include <stdlib.h>

#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "../fused_lr_math.h"

namespace L = flr::layout;

namespace {

// strtod, not operator>>, so that Python's "inf" and "nan" parse.
std::vector<double> read(std::istream& in, size_t n) {
  std::vector<double> v(n);
  std::string tok;
  for (auto& x : v) {
    if (!(in >> tok)) break;
    x = strtod(tok.c_str(), nullptr);
  }
  return v;
}

double read1(std::istream& in) { return read(in, 1)[0]; }

void print(double x) { printf("%.17g ", x); }

int64_t address(const void* p) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(p)); }

template <typename T>
void update(std::istream& in) {
  const int rule = static_cast<int>(read1(in));
  const auto program = static_cast<int64_t>(read1(in));
  auto hyper = read(in, L::HYPER_COLS);
  auto sched = read(in, L::MAX_SEGMENTS * L::SEGMENT_COLS);
  const float clock = static_cast<float>(read1(in));
  const float step = static_cast<float>(read1(in));
  const int lr_kind = static_cast<int>(read1(in));
  const double lr = read1(in);
  const bool has_scale = read1(in) != 0;
  const float grad_scale = static_cast<float>(read1(in));
  const bool has_norm = read1(in) != 0;
  double norm = read1(in);
  const bool norm_is_double = read1(in) != 0;
  const bool clip_by_norm = read1(in) != 0;
  const double max_norm = read1(in);
  const double rate_power = read1(in);
  const double rate_eps = read1(in);
  const bool has_clip = read1(in) != 0;
  const double clip = read1(in);
  const bool has_found_inf = read1(in) != 0;
  const float found_inf = static_cast<float>(read1(in));
  const auto n_states = static_cast<int>(read1(in));
  const auto n = static_cast<int64_t>(read1(in));
  if (n_states < 0 || n_states > L::MAX_STATES) {
    in.setstate(std::ios::failbit);
    return;
  }
  std::vector<T> p(n), g(n);
  std::vector<std::vector<T>> s(n_states, std::vector<T>(n));
  for (int64_t i = 0; i < n; ++i) {
    p[i] = static_cast<T>(read1(in));
    g[i] = static_cast<T>(read1(in));
    for (auto& state : s) state[i] = static_cast<T>(read1(in));
  }
  const float lr32 = static_cast<float>(lr);
  float norm32 = static_cast<float>(norm);
  const int64_t lr32_at = lr_kind == 1 ? address(&lr32) : 0, lr64_at = lr_kind == 2 ? address(&lr) : 0;
  int64_t row[L::TENSOR_COLS] = {};
  row[L::T_PARAM] = address(p.data());
  row[L::T_GRAD] = address(g.data());
  bool aligned = row[L::T_PARAM] % 16 == 0;  // as the plan writes it: the gradient's is the kernel's test
  for (int j = 0; j < n_states; ++j) {
    row[L::T_STATE0 + j] = address(s[j].data());
    aligned = aligned && row[L::T_STATE0 + j] % 16 == 0;
  }
  row[L::T_STEP] = address(&step);
  row[L::T_NUMEL] = n;
  row[L::T_ALIGNED] = aligned;
  double scratch[2 * L::COEF_COLS];
  const flr::PrepareArgs a = {row, 1, hyper.data(), sched.data(), &lr32_at, &lr64_at, &clock,
                              has_norm ? (norm_is_double ? static_cast<void*>(&norm) : &norm32) : nullptr,
                              norm_is_double, nullptr, 0, clip_by_norm, max_norm, rate_power, rate_eps,
                              has_scale ? &grad_scale : nullptr, has_found_inf ? &found_inf : nullptr, scratch,
                              program};
  flr::prepare_row(a, 0);
  flr::prepare_row(a, 1);
  const int32_t blocks[1] = {0};
  const flr::UpdateArgs u = {row, blocks, 1, hyper.data(), scratch, has_clip, clip};
  const bool known = flr::with_rule(rule, [&](auto tag) {
    flr::update_block<T, decltype(tag)>(u, 0, n > 0 ? n : 1, 0, 1);
  });
  if (!known) {
    in.setstate(std::ios::failbit);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    print(p[i]);
    for (const auto& state : s) print(state[i]);
  }
}

template <typename T>
void norm(std::istream& in) {
  const bool has_scale = read1(in) != 0;
  const float grad_scale = static_cast<float>(read1(in));
  const bool has_clip = read1(in) != 0;
  const double clip = read1(in);
  const auto n = static_cast<int64_t>(read1(in));
  std::vector<T> g(n);
  for (auto& x : g) x = static_cast<T>(read1(in));
  int64_t row[L::TENSOR_COLS] = {};
  row[L::T_GRAD] = address(g.data());
  row[L::T_NUMEL] = n;
  const int32_t blocks[1] = {0};
  const flr::NormArgs a = {row, blocks, has_scale ? &grad_scale : nullptr, has_clip, clip};
  print(sqrt(flr::norm_block<T>(a, 0, n > 0 ? n : 1, 0, 1)));
}

// The clip coefficient in the norm's dtype N: each norm is rounded to N first, as a float32 norm is.
template <typename N>
void coef(std::istream& in) {
  const double max_norm = read1(in);
  const auto n = static_cast<size_t>(read1(in));
  for (double x : read(in, n)) print(static_cast<double>(flr::clip_coef<N>(static_cast<N>(x), max_norm)));
}

void blocks(std::istream& in) {
  const auto chunk = static_cast<int64_t>(read1(in));
  const auto n = static_cast<int64_t>(read1(in));
  std::vector<int64_t> table(n * L::TENSOR_COLS, 0);
  for (int64_t i = 0; i < n; ++i) {
    table[i * L::TENSOR_COLS + L::T_NUMEL] = static_cast<int64_t>(read1(in));
    table[i * L::TENSOR_COLS + L::T_FIRST_CHUNK] = static_cast<int64_t>(read1(in));
  }
  const auto total = static_cast<int64_t>(read1(in));
  std::vector<int32_t> rows(total);
  for (auto& r : rows) r = static_cast<int32_t>(read1(in));
  for (int64_t block = 0; block < total; ++block) {
    const flr::Range r = flr::block_range(table.data(), rows.data(), block, chunk);
    printf("%lld %lld %lld ", static_cast<long long>(r.row), static_cast<long long>(r.begin),
           static_cast<long long>(r.end));
  }
}

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    if (cmd == "table") {
      const auto table = read(in, L::MAX_SEGMENTS * L::SEGMENT_COLS);
      const auto n = static_cast<size_t>(read1(in));
      for (double k : read(in, n)) print(flr::eval_table(table.data(), k));
    } else if (cmd == "update" || cmd == "norm" || cmd == "coef") {
      std::string dtype;
      in >> dtype;
      const bool f64 = dtype == "f64";
      if (cmd == "update") f64 ? update<double>(in) : update<float>(in);
      else if (cmd == "norm") f64 ? norm<double>(in) : norm<float>(in);
      else f64 ? coef<double>(in) : coef<float>(in);
    } else if (cmd == "blocks") {
      blocks(in);
    } else {
      fprintf(stderr, "unknown command %s\n", cmd.c_str());
      return 2;
    }
    if (!in) {
      fprintf(stderr, "malformed %s line\n", cmd.c_str());
      return 2;
    }
    printf("\n");
  }
  return 0;
}
