// A few rows through one weight matrix, for decode-sized expert batches on x86-64 CPUs (AVX2 + FMA):
//     y[j, m] = sum_k W[m, k] * x[j, k]      for j < n <= 8, m < M
// W is row-major [M, K]; x and y are row-major with leading dimensions ldx, ldy (y is token-major: [n, M]).
// Why: MKL's GEMM runs 2-8 rows at 20-24 GFLOP/s per core here (a third of the core's FMA rate, and below what
// streaming the weights allows);
// this loads each 8-float piece of a weight row once, uses it for every row of x (held in registers, from L1),
// and keeps R*N independent accumulators so the FMA latency is hidden. Built and loaded by cpu_rows.py.
#include <immintrin.h>
#include <omp.h>
#include <stddef.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void block(const float *W, long K, const float *x, long ldx,
                                                        float *y, long ldy, const int R, const int N) {
    __m256 acc[8][8];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < N; j++) acc[r][j] = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv[8];
        for (int j = 0; j < N; j++) xv[j] = _mm256_loadu_ps(x + j * ldx + k);
        for (int r = 0; r < R; r++) {
            __m256 w = _mm256_loadu_ps(W + r * K + k);
            for (int j = 0; j < N; j++) acc[r][j] = _mm256_fmadd_ps(w, xv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < N; j++) {
            float s = hsum(acc[r][j]);
            for (long kk = k; kk < K; kk++) s += W[r * K + kk] * x[j * ldx + kk];
            y[j * ldy + r] = s;
        }
}

#define RUN(R, N)                                                                   \
    for (; m + R <= m1; m += R) block(W + m * K, K, x, ldx, y + m, ldy, R, N);      \
    for (; m < m1; m++) block(W + m * K, K, x, ldx, y + m, ldy, 1, N);              \
    return 0;

static int rows_range(const float *W, long K, const float *x, long ldx, float *y, long ldy, long n, long m0,
                      long m1) {
    long m = m0;
    switch (n) {
    case 1: RUN(8, 1)
    case 2: RUN(4, 2)
    case 3: RUN(2, 3)
    case 4: RUN(2, 4)
    case 5: RUN(1, 5)
    case 6: RUN(1, 6)
    case 7: RUN(1, 7)
    case 8: RUN(1, 8)
    default: return -1;
    }
}

// The rows of W are split over `threads` OpenMP threads, in pieces of whole 8-row blocks. Built with -fopenmp, this
// library shares the OpenMP runtime torch loaded (same soname), so it runs on torch's own, already spinning, team
// instead of competing with it for the cores. Returns 0, or -1 for an n it does not handle.
int rows_gemm_f32(const float *W, long K, const float *x, long ldx, float *y, long ldy, long n, long M,
                  int threads) {
    if (n < 1 || n > 8) return -1;
    long blocks = (M + 7) / 8;
    if (threads > blocks) threads = (int)blocks;
    if (threads <= 1) return rows_range(W, K, x, ldx, y, ldy, n, 0, M);
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long lo = blocks * t / nt * 8, hi = blocks * (t + 1) / nt * 8;
        if (hi > M) hi = M;
        if (lo < hi) rows_range(W, K, x, ldx, y, ldy, n, lo, hi);
    }
    return 0;
}
