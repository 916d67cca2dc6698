/*
 * memtest: write a pseudo-random pattern over N MiB of memory, read it back
 * and verify it twice. Used by the dsm tests, whose guest keeps most of its
 * RAM on peers: every verified word went out to a peer and came back.
 *
 * Usage: memtest MIB [SEED]
 * Prints progress lines and one result line:
 *   OMEGA-MEMTEST ok=<0|1> mib=<N> errors=<count> seconds=<wall time>
 * Single-threaded. Exit status: 0 all words verified, 1 a mismatch, 2 bad
 * arguments or no memory.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

/* The word stored at index i: a 64-bit mix (splitmix64 finaliser) of i and
 * the seed, so a word in the wrong place or a stale page never verifies. */
static uint64_t memtest_word(uint64_t i, uint64_t seed)
{
	uint64_t x = i * 0x9E3779B97F4A7C15ull + seed;
	x ^= x >> 31;
	x *= 0xBF58476D1CE4E5B9ull;
	x ^= x >> 29;
	return x;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Returns the number of mismatching words. */
static uint64_t memtest_verify(const uint64_t *mem, uint64_t words, uint64_t seed)
{
	uint64_t errors = 0;
	for (uint64_t i = 0; i < words; i++)
		if (mem[i] != memtest_word(i, seed))
			errors++;
	return errors;
}

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: memtest MIB [SEED]\n");
		return 2;
	}
	char *end;
	unsigned long mib = strtoul(argv[1], &end, 10);
	if (*end || mib == 0) {
		fprintf(stderr, "memtest: bad size %s\n", argv[1]);
		return 2;
	}
	uint64_t seed = argc == 3 ? strtoull(argv[2], NULL, 0) : 0x0e6a5eedull;
	size_t bytes = (size_t)mib << 20;
	uint64_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("memtest: mmap");
		return 2;
	}
	uint64_t words = bytes / sizeof *mem;
	double t0 = now_s();
	for (uint64_t i = 0; i < words; i++)
		mem[i] = memtest_word(i, seed);
	printf("memtest: wrote %lu MiB in %.1f s\n", mib, now_s() - t0);
	fflush(stdout);
	uint64_t errors = 0;
	for (int pass = 1; pass <= 2; pass++) {
		uint64_t e = memtest_verify(mem, words, seed);
		printf("memtest: verify pass %d: %llu errors (%.1f s)\n", pass,
		       (unsigned long long)e, now_s() - t0);
		fflush(stdout);
		errors += e;
	}
	printf("OMEGA-MEMTEST ok=%d mib=%lu errors=%llu seconds=%.1f\n", errors == 0, mib,
	       (unsigned long long)errors, now_s() - t0);
	return errors ? 1 : 0;
}
