// Throughput of the x86 instructions an int8 or fp32 product is made of, one thread, on independent registers:
// which execution pipes they share decides how fast an int8 product can be relative to fp32 on a CPU
// (benchmarks/NOTES.md, section 26). Build and run: g++ -O2 benchmarks/int8_pipes.cpp -o /tmp/int8_pipes && /tmp/int8_pipes
// Each line: nanoseconds per loop iteration of the listed instructions (ymm, AVX2), best of 5 runs of 10^8 iterations.
#include <chrono>
#include <cstdio>

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

#define I6(op, r0, r1, r2, r3, r4, r5)                                                                              \
  op " %%ymm15,%%ymm" #r0 ",%%ymm" #r0 "\n" op " %%ymm15,%%ymm" #r1 ",%%ymm" #r1 "\n" op " %%ymm15,%%ymm" #r2       \
     ",%%ymm" #r2 "\n" op " %%ymm15,%%ymm" #r3 ",%%ymm" #r3 "\n" op " %%ymm15,%%ymm" #r4 ",%%ymm" #r4 "\n" op       \
     " %%ymm15,%%ymm" #r5 ",%%ymm" #r5 "\n"

#define RUN(name, body)                                                                                             \
  {                                                                                                                 \
    double best = 1e9;                                                                                              \
    for (int rep = 0; rep < 5; ++rep) {                                                                             \
      long n = 100000000, c = n;                                                                                    \
      double t = now();                                                                                             \
      __asm__ volatile("vpxor %%ymm15,%%ymm15,%%ymm15\n1:\n" body "dec %0\njnz 1b\n"                                \
                       : "+r"(c)::"xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",   \
                         "xmm10", "xmm11", "xmm15");                                                                \
      t = (now() - t) / n * 1e9;                                                                                    \
      best = t < best ? t : best;                                                                                   \
    }                                                                                                               \
    std::printf("%-44s %6.3f ns/iteration\n", name, best);                                                          \
  }

int main() {
  RUN("12 vfmadd231ps (fp32: 96 multiply-adds)", I6("vfmadd231ps", 0, 1, 2, 3, 4, 5) I6("vfmadd231ps", 6, 7, 8, 9, 10, 11))
  RUN("12 vpmaddwd (int16 pairs: 192 multiply-adds)", I6("vpmaddwd", 0, 1, 2, 3, 4, 5) I6("vpmaddwd", 6, 7, 8, 9, 10, 11))
  RUN("12 vpmaddubsw (u8 x s8 pairs: 384)", I6("vpmaddubsw", 0, 1, 2, 3, 4, 5) I6("vpmaddubsw", 6, 7, 8, 9, 10, 11))
  RUN("6 vpmaddwd + 6 vpmaddubsw", I6("vpmaddwd", 0, 1, 2, 3, 4, 5) I6("vpmaddubsw", 6, 7, 8, 9, 10, 11))
  RUN("6 vpmaddwd", I6("vpmaddwd", 0, 1, 2, 3, 4, 5))
  RUN("6 vpmaddwd + 6 vfmadd231ps", I6("vpmaddwd", 0, 1, 2, 3, 4, 5) I6("vfmadd231ps", 6, 7, 8, 9, 10, 11))
  RUN("6 vpmaddwd + 6 vpaddd", I6("vpmaddwd", 0, 1, 2, 3, 4, 5) I6("vpaddd", 6, 7, 8, 9, 10, 11))
  RUN("12 vpaddd", I6("vpaddd", 0, 1, 2, 3, 4, 5) I6("vpaddd", 6, 7, 8, 9, 10, 11))
  return 0;
}
