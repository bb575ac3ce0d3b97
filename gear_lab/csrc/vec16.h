// Vectors of 16 float lanes for the sources of gear_lab/csrc (GCC / Clang vector extensions:
// native vectors where the ISA has them, two or four narrower ones elsewhere). A function whose
// `acc += a * b` on them should fuse multiply and add carries
// __attribute__((optimize("fp-contract=fast"))): the library builds with -ffp-contract=off.
#pragma once

#include <cstring>

namespace {

typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

}  // namespace
