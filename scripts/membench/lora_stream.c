/*
 * How fast can one decode step's LoRA streams be read on this machine?
 * (docs/perf/lora.md, "Session 8"). A decode step over many distinct adapters reads
 * each adapter's matrices for one projection group as one run of 18-134 KB, at
 * scattered places. This reads a 320 MB buffer in runs of CHUNK_KB at shuffled
 * places, either only loading every byte ("touch") or with the int8 shrink's
 * instruction mix (xor + vpdpbusd per 32 bytes, a convert and FMA per 256 bytes),
 * on 4 KiB or 2 MiB pages; "cosched" streams on one thread while the other runs
 * vpdpbusd on registers.
 *
 * Build: gcc -O2 -pthread scripts/membench/lora_stream.c -o /tmp/lora_stream
 * Run:   /tmp/lora_stream touch|shrink|shrink512 CHUNK_KB THREADS [small]
 *        /tmp/lora_stream cosched
 * WAYS=k (touch, shrink): each thread reads k runs side by side, 256 bytes of each in
 * turn (the interleaved decode tasks of docs/perf/lora.md, session 9); SPLIT=k: one
 * run read as k parts side by side.
 * Needs AVX-512 VNNI (the CI machine's EPYC has it).
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define FEATURES __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))

static const size_t TOTAL = 320UL << 20;
static char *buf;
static size_t chunk, nchunks, *order;
static int nthreads, mode; /* 0 touch, 1 shrink (256-bit), 2 shrink (512-bit) */
static char xq[4096];
static volatile int sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int ways = 1;

/* Reads k runs of len bytes side by side, 256 bytes of each in turn, with the mode's
 * instruction mix. */
FEATURES static void stream_multi(const char **ps, int k, size_t len) {
    __m256i acc = _mm256_setzero_si256(), flip = _mm256_set1_epi8(-128);
    __m512i flip5 = _mm512_set1_epi8(-128);
    __m256 f = _mm256_setzero_ps();
    for (size_t i = 0; i < len; i += 256) {
        for (int w = 0; w < k; w++) {
            const char *p = ps[w];
            if (mode == 0) {
                for (int s = 0; s < 8; s++)
                    acc = _mm256_add_epi8(acc, _mm256_load_si256((const __m256i *)(p + i + 32 * s)));
            } else if (mode == 1) {
                __m256i lo = _mm256_setzero_si256(), hi = lo;
                for (int s = 0; s < 4; s++) {
                    size_t kk = i + 64 * s;
                    __m256i xb = _mm256_set1_epi64x(*(const long long *)(xq + ((kk / 8) & 4088)));
                    __m256i a0 = _mm256_xor_si256(_mm256_load_si256((const __m256i *)(p + kk)), flip);
                    __m256i a1 = _mm256_xor_si256(_mm256_load_si256((const __m256i *)(p + kk + 32)), flip);
                    lo = _mm256_dpbusd_epi32(lo, a0, xb);
                    hi = _mm256_dpbusd_epi32(hi, a1, xb);
                }
                f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_set1_ps(1.0f), f);
                f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(1.0f), f);
            } else {
                __m512i z = _mm512_setzero_si512();
                for (int s = 0; s < 4; s++) {
                    size_t kk = i + 64 * s;
                    __m512i xb = _mm512_set1_epi64(*(const long long *)(xq + ((kk / 8) & 4088)));
                    z = _mm512_dpbusd_epi32(z, _mm512_xor_si512(_mm512_load_si512(p + kk), flip5), xb);
                }
                f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm512_castsi512_si256(z)), _mm256_set1_ps(1.0f), f);
            }
        }
    }
    sink = _mm256_extract_epi32(acc, 0) + (int)_mm256_cvtss_f32(f);
}

static void stream_chunk(const char *p) { stream_multi(&p, 1, chunk); }

static int split = 1;
static void *worker(void *arg) {
    if (split > 1) {
        size_t part = chunk / split / 256 * 256;
        const char *ps[8];
        for (size_t c = (size_t)arg; c < nchunks; c += nthreads) {
            for (int w = 0; w < split; w++) ps[w] = buf + order[c] * chunk + w * part;
            stream_multi(ps, split, part);
        }
        return NULL;
    }
    if (ways > 1) {
        const char *ps[8];
        for (size_t c = (size_t)arg * ways; c + ways <= nchunks; c += nthreads * ways) {
            for (int w = 0; w < ways; w++) ps[w] = buf + order[c + w] * chunk;
            stream_multi(ps, ways, chunk);
        }
        return NULL;
    }
    for (size_t c = (size_t)arg; c < nchunks; c += nthreads) stream_chunk(buf + order[c] * chunk);
    return NULL;
}

static double compute_ms;
FEATURES static void *computer(void *arg) {
    (void)arg;
    double t0 = now();
    __m256i acc[8], w = _mm256_set1_epi8(3), x = _mm256_set1_epi8(5);
    for (int i = 0; i < 8; i++) acc[i] = _mm256_set1_epi32(i);
    for (long it = 0; it < 50000000L; it++) {
        for (int i = 0; i < 8; i++) acc[i] = _mm256_dpbusd_epi32(acc[i], w, x);
        w = _mm256_add_epi8(w, x);
    }
    compute_ms = (now() - t0) * 1e3;
    sink = _mm256_extract_epi32(acc[0], 0) + _mm256_extract_epi32(acc[7], 0);
    return NULL;
}

static void setup(int huge) {
    char *p = mmap(NULL, TOTAL + (2 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(1); }
    buf = (char *)(((unsigned long)p + (2 << 20) - 1) & ~((2UL << 20) - 1));
    madvise(buf, TOTAL, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    memset(buf, 1, TOTAL);
    nchunks = TOTAL / chunk;
    order = malloc(nchunks * sizeof *order);
    for (size_t i = 0; i < nchunks; i++) order[i] = i;
    srand(1);
    for (size_t i = nchunks - 1; i > 0; i--) {
        size_t j = (size_t)rand() % (i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "cosched")) {
        chunk = 40 << 10, nthreads = 1, mode = 1;
        setup(1);
        for (int m = 1; m <= 3; m++) {
            pthread_t s, c;
            double t0 = now();
            if (m & 1) pthread_create(&s, NULL, worker, (void *)0);
            if (m & 2) pthread_create(&c, NULL, computer, NULL);
            if (m & 1) pthread_join(s, NULL);
            double stream_s = now() - t0;
            if (m & 2) pthread_join(c, NULL);
            printf("%-22s stream %5.1f GB/s   compute %6.1f ms\n",
                   m == 1 ? "stream alone" : m == 2 ? "compute alone" : "stream beside compute",
                   m & 1 ? TOTAL / stream_s / 1e9 : 0.0, m & 2 ? compute_ms : 0.0);
        }
        return 0;
    }
    if (argc < 4) {
        fprintf(stderr, "usage: %s touch|shrink|shrink512 CHUNK_KB THREADS [small] | cosched\n", argv[0]);
        return 2;
    }
    mode = !strcmp(argv[1], "touch") ? 0 : !strcmp(argv[1], "shrink") ? 1 : 2;
    chunk = (size_t)atoi(argv[2]) << 10;
    chunk = chunk / 256 * 256;
    nthreads = atoi(argv[3]);
    int huge = !(argc > 4 && !strcmp(argv[4], "small"));
    if (getenv("WAYS")) ways = atoi(getenv("WAYS"));
    if (getenv("SPLIT")) split = atoi(getenv("SPLIT"));
    setup(huge);
    double best = 1e9;
    for (int r = 0; r < 7; r++) {
        pthread_t th[64];
        double t0 = now();
        for (long i = 0; i < nthreads; i++) pthread_create(&th[i], NULL, worker, (void *)i);
        for (int i = 0; i < nthreads; i++) pthread_join(th[i], NULL);
        double t = now() - t0;
        if (t < best) best = t;
    }
    printf("%-9s %5zu KB runs, %d thread(s), %s pages: %5.1f GB/s\n", argv[1], chunk >> 10,
           nthreads, huge ? "2 MiB" : "4 KiB", TOTAL / best / 1e9);
    return 0;
}
