// Host driver for csrc/fused_lr_math.h: tests/test_cuda_host.py compiles it with the system C++
// compiler, feeds it cases on stdin and checks the answers against the Python reference.
// One command per line, numbers separated by blanks; one line of output per command.
//
//   table  T[128] n k[n]                         -> eval_table(T, k) for each k
//   update f32|f64 H[8] T[128] k fresh has_scale grad_scale has_norm norm norm_is_double max_norm
//          has_clip clip n (p g b)[n]            -> (p' b')[n] after update_element
//   norm   f32|f64 has_scale grad_scale maximize has_clip clip n g[n]
//                                                -> sqrt(sum of processed_grad(g)^2), summed in double
//   chunks chunk_size n (numel first_chunk)[n] total
//                                                -> (tensor begin end) for chunks 0 .. total-1
#include <stdio.h>
#include <stdlib.h>

#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "../fused_lr_math.h"

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

template <typename M>
void update(std::istream& in) {
  const auto hyper = read(in, flr::HYPER_COLS);
  const auto table = read(in, flr::MAX_SEGMENTS * flr::ROW);
  const float k = static_cast<float>(read1(in));
  const bool fresh = read1(in) != 0;
  const bool has_scale = read1(in) != 0;
  const float grad_scale = static_cast<float>(read1(in));
  flr::StepArgs s{};
  s.has_norm = read1(in) != 0;
  const double norm = read1(in);
  s.norm_is_double = read1(in) != 0;
  s.max_norm = read1(in);
  s.has_clip_value = read1(in) != 0;
  s.clip_value = read1(in);
  const float inv_scale = has_scale ? flr::unscale_factor(grad_scale) : 1.0f;
  const auto c = flr::make_coefs<M>(hyper.data(), table.data(), k, fresh, inv_scale, norm, s);
  const auto n = static_cast<size_t>(read1(in));
  for (size_t i = 0; i < n; ++i) {
    M p = static_cast<M>(read1(in)), g = static_cast<M>(read1(in)), b = static_cast<M>(read1(in));
    flr::update_element(p, g, b, c);
    print(p);
    print(b);
  }
}

template <typename M>
void norm(std::istream& in) {
  const bool has_scale = read1(in) != 0;
  const float grad_scale = static_cast<float>(read1(in));
  flr::Coefs<M> c{};
  c.inv_scale = M(has_scale ? flr::unscale_factor(grad_scale) : 1.0f);
  c.maximize = read1(in) != 0;
  c.has_clip_value = read1(in) != 0;
  c.clip_value = M(read1(in));
  const auto n = static_cast<size_t>(read1(in));
  double acc = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double x = flr::processed_grad(static_cast<M>(read1(in)), c);
    acc += x * x;
  }
  print(sqrt(acc));
}

void chunks(std::istream& in) {
  const auto chunk_size = static_cast<int64_t>(read1(in));
  const auto n = static_cast<int>(read1(in));
  std::vector<int64_t> table(static_cast<size_t>(n) * flr::TABLE_COLS, 0);
  for (int i = 0; i < n; ++i) {
    table[i * flr::TABLE_COLS + flr::T_NUMEL] = static_cast<int64_t>(read1(in));
    table[i * flr::TABLE_COLS + flr::T_FIRST_CHUNK] = static_cast<int64_t>(read1(in));
  }
  const auto total = static_cast<int64_t>(read1(in));
  for (int64_t chunk = 0; chunk < total; ++chunk) {
    const int t = flr::locate_tensor(table.data(), n, chunk);
    int64_t begin, end;
    flr::chunk_range(table.data() + t * flr::TABLE_COLS, chunk, chunk_size, &begin, &end);
    printf("%d %lld %lld ", t, static_cast<long long>(begin), static_cast<long long>(end));
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
      const auto table = read(in, flr::MAX_SEGMENTS * flr::ROW);
      const auto n = static_cast<size_t>(read1(in));
      for (double k : read(in, n)) print(flr::eval_table(table.data(), k));
    } else if (cmd == "update" || cmd == "norm") {
      std::string dtype;
      in >> dtype;
      const bool f64 = dtype == "f64";
      if (cmd == "update") f64 ? update<double>(in) : update<float>(in);
      else f64 ? norm<double>(in) : norm<float>(in);
    } else if (cmd == "chunks") {
      chunks(in);
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
