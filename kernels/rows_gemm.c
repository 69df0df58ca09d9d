// Expert GEMMs for x86-64 CPUs with AVX2 + FMA, built and loaded by cpu_rows.py. Two kernels: rows_gemm_f32 (a few
// rows, canonical weights) and panels_gemm_f32 (any rows, weights packed in panels), below.
//
// A few rows through one weight matrix, for decode-sized expert batches:
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

// ---------------------------------------------------------------------------------------------------------------
// Any number of rows through one weight matrix stored in panels: Wp is [ceil(M/16), K, 16], panel p holding rows
// 16p..16p+15 of W (zero past M) column by column, so that 16 consecutive floats are W[16p:16p+16, k].
//     y[j, m] = sum_k W[m, k] * x[j, k]      for j < n, m < M
// An outer-product micro-kernel: 6 rows of x x 16 weight rows of accumulators (12 ymm), each step loading two
// weight vectors and broadcasting 6 x values; a panel (16 x K floats) stays in L2 while every 6-row block of x
// passes over it, so the weights stream from memory once. Why: MKL's GEMM runs 8-64 rows at 40-130 GFLOP/s on
// two cores here and this at 78-170 (it never repacks the weights; the panels are the packing, done once).

static inline __attribute__((always_inline)) void panel_block(const float *P, long K, const float *x, long ldx,
                                                              float *y, long ldy, const int J) {
    __m256 a0[6], a1[6];
    for (int j = 0; j < J; j++) { a0[j] = _mm256_setzero_ps(); a1[j] = _mm256_setzero_ps(); }
    for (long k = 0; k < K; k++) {
        __m256 w0 = _mm256_loadu_ps(P + k * 16), w1 = _mm256_loadu_ps(P + k * 16 + 8);
        for (int j = 0; j < J; j++) {
            __m256 xb = _mm256_broadcast_ss(x + j * ldx + k);
            a0[j] = _mm256_fmadd_ps(w0, xb, a0[j]);
            a1[j] = _mm256_fmadd_ps(w1, xb, a1[j]);
        }
    }
    for (int j = 0; j < J; j++) { _mm256_storeu_ps(y + j * ldy, a0[j]); _mm256_storeu_ps(y + j * ldy + 8, a1[j]); }
}

// All rows of x through one panel, 6 at a time; a panel past M's end (cols < 16) goes through a scratch block.
static void panel_rows(const float *P, long K, const float *x, long ldx, float *y, long ldy, long n, long cols) {
    float scratch[6 * 16];
    for (long j = 0; j < n; j += 6) {
        long rows = n - j < 6 ? n - j : 6;
        float *out = cols == 16 ? y + j * ldy : scratch;
        long ld = cols == 16 ? ldy : 16;
        const float *xj = x + j * ldx;
        switch (rows) {
        case 6: panel_block(P, K, xj, ldx, out, ld, 6); break;
        case 5: panel_block(P, K, xj, ldx, out, ld, 5); break;
        case 4: panel_block(P, K, xj, ldx, out, ld, 4); break;
        case 3: panel_block(P, K, xj, ldx, out, ld, 3); break;
        case 2: panel_block(P, K, xj, ldx, out, ld, 2); break;
        default: panel_block(P, K, xj, ldx, out, ld, 1); break;
        }
        if (cols < 16)
            for (long r = 0; r < rows; r++)
                for (long c = 0; c < cols; c++) y[(j + r) * ldy + c] = scratch[r * 16 + c];
    }
}

int panels_gemm_f32(const float *Wp, long M, long K, const float *x, long ldx, float *y, long ldy, long n,
                    int threads) {
    long panels = (M + 15) / 16;
    if (n < 1) return 0;
    if (threads > panels) threads = (int)panels;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long p = 0; p < panels; p++) {
        long cols = M - p * 16 < 16 ? M - p * 16 : 16;
        panel_rows(Wp + p * K * 16, K, x, ldx, y + p * 16, ldy, n, cols);
    }
    return 0;
}
