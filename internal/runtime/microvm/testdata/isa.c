// isa prints what instructions of an x86-64 ISA level compute from its
// argument, so that a test can run it in a guest and check the result (and,
// on a CPU without them, see it die of SIGILL). Built with -march=x86-64-v2
// it runs POPCNT and CRC32 (SSE4.2); with -march=x86-64-v3 also AVX2 on
// 256-bit registers, LZCNT and BZHI (BMI2).
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
	unsigned long long x = strtoull(argc > 1 ? argv[1] : "0", NULL, 0);
	printf("popcnt=%d crc32c=%08llx", __builtin_popcountll(x), (unsigned long long)_mm_crc32_u64(0, x));
#ifdef __AVX2__
	// In assembly, so that the compiler can neither fold nor narrow it.
	unsigned long long lanes[4] = {x, x + 1, x + 2, x + 3};
	__asm__ volatile("vmovdqu %0, %%ymm0\n\t"
	                 "vpaddq %%ymm0, %%ymm0, %%ymm1\n\t"
	                 "vpaddq %%ymm1, %%ymm0, %%ymm0\n\t"
	                 "vmovdqu %%ymm0, %0\n\t"
	                 "vzeroupper"
	                 : "+m"(lanes)
	                 :
	                 : "xmm0", "xmm1");
	printf(" avx2=%llx lzcnt=%d bzhi=%llx", lanes[3], (int)_lzcnt_u64(x), (unsigned long long)_bzhi_u64(x, (unsigned)(x % 61)));
#endif
	printf("\n");
	return 0;
}
