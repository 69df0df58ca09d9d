// Expert GEMMs for x86-64 CPUs with AVX2 + FMA, built and loaded by cpu_rows.py. Two kernels: rows_gemm_f32 (a few
// rows, canonical weights) and panels_gemm_f32 (any rows, weights packed in panels), below; then both again on FP8 /
// MXFP4 weights, dequantized inside (fp8_/mxfp4_rows_gemm, fp8_/mxfp4_panels_gemm), at the end. The MXFP4 rows
// kernel has an AVX-512 variant too, compiled through target attributes and chosen at run time from cpuid.
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

// ---------------------------------------------------------------------------------------------------------------
// Quantized weights (QuantizedExpertWeights, kernels/quantized.py), dequantized inside the kernels:
//     y[j, m] = sum_k w[m, k] * x[j, k],      w[m, k] = value(q[m, k]) * scale[m / BN, k / BK]
// FP8: q float8_e4m3fn bytes [M, K], scale float32 [ceil(M/BN), ceil(K/BK)] (edge blocks may be partial). MXFP4:
// q [M, K/2], two e2m1 nibbles a byte (the low one is the even column), scale one e8m0 exponent byte per row and
// 32 columns, [M, K/32]. Why: at decode sizes a layer is bound by reading its weights, and a quarter (FP8) or an
// eighth (MXFP4) of float32's bytes only pays if no float32 copy of the weights is written and read back.
// - fp8_rows_gemm / mxfp4_rows_gemm: 1-8 rows of x, a dot-product kernel like rows_gemm_f32: each weight vector is
//   decoded once, in registers, and used for every row of x. A K block's products accumulate unscaled; the block's
//   sum is then multiplied by its scale into the total (one FMA per block and row of x). MXFP4 on AVX-512 instead
//   scales its decoding table once per block (mxfp4_rows512).
// - fp8_panels_gemm / mxfp4_panels_gemm: any rows: each thread dequantizes 16 weight rows at a time into one panel
//   (pack_panels' [K, 16] layout, held in L2) and runs every row of x over it with panels_gemm_f32's micro-kernel;
//   the weights are decoded once per call however many rows x has, and no float32 expert is written to memory.
#include <stdlib.h>

// 8 float8_e4m3fn bytes -> 8 floats equal to value * 2^-120, exactly: sign-extended to 32 bits and shifted left by
// 20, a byte's 4 exponent bits land in the low 4 of float32's 8 and its 3 mantissa bits on top of float32's 23; the
// AND keeps those and one copy of the sign. float32's exponent bias (127) is e4m3's (7) plus 120, and e4m3's
// subnormals become float32 subnormals with the same factor. NaN (0x7F, 0xFF) decodes as 480 (checkpoints do not
// store it). NOTE: with denormals-are-zero set (torch.set_flush_denormal(True)) e4m3 subnormals, |v| < 2^-6, read 0.
static inline __m256 fp8x8(const unsigned char *q) {
    __m256i d = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(d, 20), _mm256_set1_epi32((int)0x87F00000)));
}

static inline float fp8_value(unsigned char b) {  // exact, for tails
    int e = (b >> 3) & 15, m = b & 7;
    float v = e ? (float)(8 + m) * (float)(1 << e) / 1024.0f : (float)m / 512.0f;
    return b & 0x80 ? -v : v;
}

// The rows kernel multiplies by x * 2^64 (a copy, exact), so that the products of the 2^-120-scaled weights stay
// clear of float32's subnormal range (where they would lose precision), and folds 2^56 into each block's scale.
#define FP8_X_SCALE 0x1p64f
#define FP8_BLOCK_SCALE 0x1p56f

static inline __attribute__((always_inline)) void fp8_row(const unsigned char *q, long K, const float *srow, long BK,
                                                          const float *x, long ldx, float *y, long ldy, const int N) {
    __m256 tot[8], acc[8];
    float tail[8];
    for (int j = 0; j < N; j++) { tot[j] = _mm256_setzero_ps(); tail[j] = 0.0f; }
    for (long k0 = 0, kb = 0; k0 < K; k0 += BK, kb++) {
        long k1 = k0 + BK < K ? k0 + BK : K, k = k0;
        for (int j = 0; j < N; j++) acc[j] = _mm256_setzero_ps();
        if (N <= 2) {  // two chains of FMAs per row of x: one chain's latency held 1-2 rows at ~60% of the rate
            __m256 acc2[2];
            for (int j = 0; j < N; j++) acc2[j] = _mm256_setzero_ps();
            for (; k + 16 <= k1; k += 16) {
                __m256 w = fp8x8(q + k), w2 = fp8x8(q + k + 8);
                for (int j = 0; j < N; j++) {
                    acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + j * ldx + k), acc[j]);
                    acc2[j] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + j * ldx + k + 8), acc2[j]);
                }
            }
            for (int j = 0; j < N; j++) acc[j] = _mm256_add_ps(acc[j], acc2[j]);
        }
        for (; k + 8 <= k1; k += 8) {
            __m256 w = fp8x8(q + k);
            for (int j = 0; j < N; j++) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + j * ldx + k), acc[j]);
        }
        __m256 sv = _mm256_set1_ps(srow[kb] * FP8_BLOCK_SCALE);
        for (int j = 0; j < N; j++) tot[j] = _mm256_fmadd_ps(acc[j], sv, tot[j]);
        for (; k < k1; k++)  // the last columns of a block when BK or K is not a multiple of 8
            for (int j = 0; j < N; j++) tail[j] += fp8_value(q[k]) * srow[kb] * (x[j * ldx + k] / FP8_X_SCALE);
    }
    for (int j = 0; j < N; j++) y[j * ldy] = hsum(tot[j]) + tail[j];
}

#define FOR_ROWS(CALL)                                                                                        \
    switch (n) {                                                                                              \
    case 1: for (long m = m0; m < m1; m++) CALL(1); break;                                                    \
    case 2: for (long m = m0; m < m1; m++) CALL(2); break;                                                    \
    case 3: for (long m = m0; m < m1; m++) CALL(3); break;                                                    \
    case 4: for (long m = m0; m < m1; m++) CALL(4); break;                                                    \
    case 5: for (long m = m0; m < m1; m++) CALL(5); break;                                                    \
    case 6: for (long m = m0; m < m1; m++) CALL(6); break;                                                    \
    case 7: for (long m = m0; m < m1; m++) CALL(7); break;                                                    \
    default: for (long m = m0; m < m1; m++) CALL(8); break;                                                   \
    }

static void fp8_rows_range(const unsigned char *q, long K, const float *scale, long BN, long BK, const float *x,
                           long ldx, float *y, long ldy, long n, long m0, long m1) {
    long SK = (K + BK - 1) / BK;
#define FP8_CALL(N) fp8_row(q + m * K, K, scale + m / BN * SK, BK, x, ldx, y + m, ldy, N)
    FOR_ROWS(FP8_CALL)
#undef FP8_CALL
}

// MXFP4: 32 bytes (two 32-column blocks, 64 values) -> 8 vectors of twice the e2m1 values (integers in [-12, 12],
// from a 16-entry byte table, vpshufb), each byte sign-extended in place from its 32-bit lane by shifts (cheaper
// than widening 8 bytes at a time, which competes with the table lookups for the shuffle unit). Vector v, lane d
// holds column 8 * (d % 4) + v of block d / 4: the caller permutes x to that order (mxfp4_permute_x), so that
// the two blocks' scales apply per 128-bit half.
static inline __attribute__((always_inline)) void mxfp4x64(const unsigned char *q, __m256 w[8]) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,
                                         0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256i b = _mm256_loadu_si256((const __m256i *)q);
    __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(b, low4));
    __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(b, 4), low4));
    w[0] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(lo, 24), 24));
    w[1] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(hi, 24), 24));
    w[2] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(lo, 16), 24));
    w[3] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(hi, 16), 24));
    w[4] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(lo, 8), 24));
    w[5] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(hi, 8), 24));
    w[6] = _mm256_cvtepi32_ps(_mm256_srai_epi32(lo, 24));
    w[7] = _mm256_cvtepi32_ps(_mm256_srai_epi32(hi, 24));
}

// 16 bytes (one block) -> 4 vectors of twice the e2m1 values in column order (odd block counts' last block, and
// the panel dequantizer).
static inline __attribute__((always_inline)) void mxfp4x32(const unsigned char *q, __m256 w[4]) {
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i *)q);
    __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(b, low4));
    __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), low4));
    __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);  // columns 0-15, 16-31
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c0));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(c0, c0)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c1));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(c1, c1)));
}

// e8m0 byte e -> 2^(e - 128): the block scale 2^(e - 127) halved for the doubled table values, exactly. e >= 2 puts
// e - 1 in float32's exponent field; 2^-127 (e = 1) and 2^-128 (e = 0) are float32 subnormals, written as their
// bit patterns (shifting e into the exponent field would give 0 for e = 0 and 2^-126 for e = 1).
static inline float e8m0_half(unsigned char e) {
    union { unsigned u; float f; } v = {.u = e >= 2 ? (unsigned)(e - 1) << 23 : 0x200000u << e};
    return v.f;
}

static inline __attribute__((always_inline)) void mxfp4_row(const unsigned char *q, const unsigned char *e, long K,
                                                            const float *x, long ldx, float *y, long ldy,
                                                            const int N) {
    __m256 tot[8], acc[8];
    for (int j = 0; j < N; j++) tot[j] = _mm256_setzero_ps();
    long blocks = K / 32, kb = 0;
    for (; kb + 2 <= blocks; kb += 2) {
        __m256 w[8], sv = _mm256_setr_m128(_mm_set1_ps(e8m0_half(e[kb])), _mm_set1_ps(e8m0_half(e[kb + 1])));
        mxfp4x64(q + kb * 16, w);
        for (int j = 0; j < N; j++) {
            const float *xk = x + j * ldx + kb * 32;
            acc[j] = _mm256_mul_ps(w[0], _mm256_loadu_ps(xk));
            for (int i = 1; i < 8; i++) acc[j] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xk + 8 * i), acc[j]);
            tot[j] = _mm256_fmadd_ps(acc[j], sv, tot[j]);
        }
    }
    if (kb < blocks) {
        __m256 w[4], sv = _mm256_set1_ps(e8m0_half(e[kb]));
        mxfp4x32(q + kb * 16, w);
        for (int j = 0; j < N; j++) {
            const float *xk = x + j * ldx + kb * 32;
            acc[j] = _mm256_mul_ps(w[0], _mm256_loadu_ps(xk));
            for (int i = 1; i < 4; i++) acc[j] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xk + 8 * i), acc[j]);
            tot[j] = _mm256_fmadd_ps(acc[j], sv, tot[j]);
        }
    }
    for (int j = 0; j < N; j++) y[j * ldy] = hsum(tot[j]);
}

static void mxfp4_rows_range(const unsigned char *q, const unsigned char *e, long K, const float *x, long ldx,
                             float *y, long ldy, long n, long m0, long m1) {
#define MXFP4_CALL(N) mxfp4_row(q + m * (K / 2), e + m * (K / 32), K, x, ldx, y + m, ldy, N)
    FOR_ROWS(MXFP4_CALL)
#undef MXFP4_CALL
}

// MXFP4 on AVX-512 (F, BW, VL, DQ), chosen at run time from cpuid (mxfp4_rows_gemm; the library itself is built
// for AVX2, these functions alone for AVX-512 through target attributes). One 32-column block (16 bytes) at a time:
// its bytes zero-extended to 16 int32 lanes (vpmovzxbd); vpermps then picks each lane's float from a 16-entry table
// of the e2m1 values already multiplied by the block's scale (exact: a power of two), by the low nibble's 4 bits as
// they are (vpermps reads no others) and by the high nibble's after one shift. So the weights come out as scaled
// floats in 5 vector ops per 32 (the AVX2 decode above takes 26 per 64, unscaled, then a scale FMA per block and
// row of x), and the accumulators run on across blocks. Vector 0 holds the block's even columns, vector 1 its odd
// ones: x is copied in that order (rows_x_copy). R weight rows share each vector of x, N rows of x each weight
// vector; C = 2 keeps the even and odd columns on separate accumulators, for enough independent FMA chains when
// R * N is small.
// Measured (one thread, x in cache, K = 1024, G weights/s, 1/2/3/4 rows of x): 47/35/28/23 here against the AVX2
// kernel's 19/15/14/12 and the FP8 kernel's 25/20/15/12.
#ifndef MOERAY_NO_AVX512
#define AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))
#define MX_SEG 64           // blocks whose scales are decoded at a time
#define MX_PREFETCH 4096    // bytes ahead of a group of weight rows that each block prefetches

static const float E2M1_VALUES[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                      -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// count (<= MX_SEG) e8m0 bytes -> their scales 2^(e - 127) as floats, exactly: e << 23 is that float for e >= 1,
// and 2^-127 (e = 0) is the subnormal 0x00400000. e = 255 (NaN in e8m0; checkpoints do not store it) reads inf.
AVX512 static inline void e8m0_scales(const unsigned char *e, long count, float *out) {
    for (long b = 0; b < count; b += 16) {
        __mmask16 m = count - b >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - b)) - 1);
        __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, e + b));
        __m512i bits = _mm512_mask_mov_epi32(_mm512_slli_epi32(v, 23),
                                             _mm512_cmpeq_epi32_mask(v, _mm512_setzero_si512()),
                                             _mm512_set1_epi32(0x400000));
        _mm512_mask_storeu_ps(out + b, m, _mm512_castsi512_ps(bits));
    }
}

// Rows m..m+R-1 of W (q, e pointing at row m) against N rows of x; y[j * ldy + r] = row r's dot product with x_j.
// The R rows are R * K / 2 contiguous bytes read as R interleaved streams too short (512 bytes a row at K = 1024)
// for the hardware prefetcher to pick up: each block prefetches the line MX_PREFETCH bytes ahead of the group at
// the rate the group is read (28 -> 39 G weights/s, one thread, one row of x, weights from memory).
AVX512 static inline __attribute__((always_inline)) void mxfp4_rows512(const unsigned char *q, const unsigned char *e,
                                                                       long K, const float *x, long ldx, float *y,
                                                                       long ldy, const int R, const int N,
                                                                       const int C) {
    const __m512 lut = _mm512_loadu_ps(E2M1_VALUES);
    const long blocks = K / 32, hk = K / 2;
    __m512 acc[4][8][2];
    float sc[4][MX_SEG];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < N; j++)
            for (int c = 0; c < C; c++) acc[r][j][c] = _mm512_setzero_ps();
    for (long s0 = 0; s0 < blocks; s0 += MX_SEG) {
        long s1 = s0 + MX_SEG < blocks ? s0 + MX_SEG : blocks;
        for (int r = 0; r < R; r++) e8m0_scales(e + r * blocks + s0, s1 - s0, sc[r]);
        for (long kb = s0; kb < s1; kb++) {
            _mm_prefetch((const char *)q + MX_PREFETCH + kb * R * 16, _MM_HINT_T0);
            for (int r = 0; r < R; r++) {
                __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + r * hk + kb * 16)));
                __m512 t = _mm512_mul_ps(lut, _mm512_set1_ps(sc[r][kb - s0]));
                __m512 w0 = _mm512_permutexvar_ps(b, t), w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t);
                for (int j = 0; j < N; j++) {
                    const float *xk = x + j * ldx + kb * 32;
                    __m512 a = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xk), acc[r][j][0]);
                    if (C == 1) {
                        acc[r][j][0] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xk + 16), a);
                    } else {
                        acc[r][j][0] = a;
                        acc[r][j][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xk + 16), acc[r][j][1]);
                    }
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < N; j++)
            y[j * ldy + r] = _mm512_reduce_add_ps(C == 1 ? acc[r][j][0] : _mm512_add_ps(acc[r][j][0], acc[r][j][1]));
}

// R per row count n, measured: 4 weight rows a pass up to 6 rows of x (1 row: 47 G weights/s against 23 one weight
// row at a time; 2 rows: 35 against 25), 2 for 7-8 (4 would need 28-32 accumulators).
#define MX512(R, N, C)                                                                                         \
    for (; m + R <= m1; m += R) mxfp4_rows512(q + m * (K / 2), e + m * (K / 32), K, x, ldx, y + m, ldy, R, N, C); \
    for (; m < m1; m++) mxfp4_rows512(q + m * (K / 2), e + m * (K / 32), K, x, ldx, y + m, ldy, 1, N, 2);      \
    break;

AVX512 static void mxfp4_rows_range512(const unsigned char *q, const unsigned char *e, long K, const float *x,
                                       long ldx, float *y, long ldy, long n, long m0, long m1) {
    long m = m0;
    switch (n) {
    case 1: MX512(4, 1, 2)
    case 2: MX512(4, 2, 2)
    case 3: MX512(4, 3, 1)
    case 4: MX512(4, 4, 1)
    case 5: MX512(4, 5, 1)
    case 6: MX512(4, 6, 1)
    case 7: MX512(2, 7, 1)
    default: MX512(2, 8, 1)
    }
}
#undef MX512

static int cpu_has_avx512(void) {
    static int has = -1;
    if (has < 0) {
        __builtin_cpu_init();
        has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    }
    return has;
}
#else  // a compiler without AVX-512 support (cpu_rows.py builds again with -DMOERAY_NO_AVX512 when the first fails)
static int cpu_has_avx512(void) { return 0; }
static void mxfp4_rows_range512(const unsigned char *q, const unsigned char *e, long K, const float *x, long ldx,
                                float *y, long ldy, long n, long m0, long m1) {
    (void)q, (void)e, (void)K, (void)x, (void)ldx, (void)y, (void)ldy, (void)n, (void)m0, (void)m1;
}
#endif

// 1 when mxfp4_rows_gemm runs the AVX-512 kernel here (the CPU has AVX-512 F, BW, VL and DQ), else 0.
int rows_gemm_avx512(void) { return cpu_has_avx512(); }

enum { X_FP8, X_MXFP4, X_MXFP4_512 };  // which kernel a copy of x is for

// The rows kernels' copy of x ([n, K], contiguous): scaled by 2^64 for FP8; for MXFP4 on AVX2 each pair of blocks
// (64 columns) permuted to mxfp4x64's order, a last odd block left in column order; for MXFP4 on AVX-512 each
// block's even columns, then its odd ones.
static float *rows_x_copy(const float *x, long ldx, long n, long K, int kind) {
    float *xc = malloc(sizeof(float) * n * K);
    if (xc == NULL) return NULL;
    for (long j = 0; j < n; j++) {
        const float *xj = x + j * ldx;
        float *out = xc + j * K;
        long k = 0;
        if (kind == X_MXFP4)
            for (; k + 64 <= K; k += 64)
                for (int v = 0; v < 8; v++)
                    for (int d = 0; d < 8; d++) out[k + 8 * v + d] = xj[k + 32 * (d / 4) + 8 * (d % 4) + v];
        if (kind == X_MXFP4_512)
            for (; k + 32 <= K; k += 32)
                for (int d = 0; d < 16; d++) {
                    out[k + d] = xj[k + 2 * d];
                    out[k + 16 + d] = xj[k + 2 * d + 1];
                }
        for (; k < K; k++) out[k] = kind == X_FP8 ? xj[k] * FP8_X_SCALE : xj[k];
    }
    return xc;
}

// All rows kernels on quantized weights: rows of W split over `threads` threads in whole 8-row pieces, as in
// rows_gemm_f32. Returns 0, -1 for arguments they do not handle, -2 when out of memory.
static int quant_rows(int kind, const unsigned char *q, const void *scale, long BN, long BK, long K,
                      const float *x, long ldx, float *y, long ldy, long n, long M, int threads) {
    if (n < 1 || n > 8 || BN < 1 || BK < 1 || (kind != X_FP8 && K % 32)) return -1;
    float *xc = rows_x_copy(x, ldx, n, K, kind);
    if (xc == NULL) return -2;
    long blocks = (M + 7) / 8;
    if (threads > blocks) threads = (int)blocks;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long lo = blocks * t / nt * 8, hi = blocks * (t + 1) / nt * 8;
        if (hi > M) hi = M;
        if (lo < hi && kind == X_FP8) fp8_rows_range(q, K, (const float *)scale, BN, BK, xc, K, y, ldy, n, lo, hi);
        if (lo < hi && kind == X_MXFP4) mxfp4_rows_range(q, (const unsigned char *)scale, K, xc, K, y, ldy, n, lo, hi);
        if (lo < hi && kind == X_MXFP4_512)
            mxfp4_rows_range512(q, (const unsigned char *)scale, K, xc, K, y, ldy, n, lo, hi);
    }
    free(xc);
    return 0;
}

int fp8_rows_gemm(const unsigned char *q, long K, const float *scale, long BN, long BK, const float *x, long ldx,
                  float *y, long ldy, long n, long M, int threads) {
    return quant_rows(X_FP8, q, scale, BN, BK, K, x, ldx, y, ldy, n, M, threads);
}

// The AVX-512 kernel where the CPU has it (rows_gemm_avx512()), else the AVX2 one. mxfp4_rows_gemm_avx2 runs the
// AVX2 one anywhere (MOERAY_CPU_AVX512=0; the tests compare the two).
int mxfp4_rows_gemm(const unsigned char *q, const unsigned char *e, long K, const float *x, long ldx, float *y,
                    long ldy, long n, long M, int threads) {
    return quant_rows(cpu_has_avx512() ? X_MXFP4_512 : X_MXFP4, q, e, 1, 32, K, x, ldx, y, ldy, n, M, threads);
}

int mxfp4_rows_gemm_avx2(const unsigned char *q, const unsigned char *e, long K, const float *x, long ldx, float *y,
                         long ldy, long n, long M, int threads) {
    return quant_rows(X_MXFP4, q, e, 1, 32, K, x, ldx, y, ldy, n, M, threads);
}

// One weight row dequantized to float32, [K]: the same values as torch's q.to(float32) * scale (one rounding).
static void fp8_dequant_row(const unsigned char *q, long K, const float *srow, long BK, float *out) {
    for (long k0 = 0, kb = 0; k0 < K; k0 += BK, kb++) {
        long k1 = k0 + BK < K ? k0 + BK : K, k = k0;
        __m256 sv = _mm256_set1_ps(srow[kb] * 0x1p120f);
        for (; k + 8 <= k1; k += 8) _mm256_storeu_ps(out + k, _mm256_mul_ps(fp8x8(q + k), sv));
        for (; k < k1; k++) out[k] = fp8_value(q[k]) * srow[kb];
    }
}

static void mxfp4_dequant_row(const unsigned char *q, const unsigned char *e, long K, float *out) {
    for (long kb = 0; kb < K / 32; kb++) {
        __m256 w[4], sv = _mm256_set1_ps(e8m0_half(e[kb]));
        mxfp4x32(q + kb * 16, w);
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(out + kb * 32 + 8 * i, _mm256_mul_ps(w[i], sv));
    }
}

// dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 tile.
static inline void transpose8(const float *src, long lds, float *dst, long ldd) {
    __m256 r[8], t[8], s[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        s[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(s[i], s[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(s[i], s[i + 4], 0x31));
    }
}

// Both panel kernels: panels split over `threads` threads; each thread dequantizes a panel's (up to) 16 rows into
// `rows` ([16, K], row-major), transposes them into `panel` ([K, 16], zero rows past M) and runs x over it.
static int quant_panels(int mxfp4, const unsigned char *q, const void *scale, long BN, long BK, long K,
                        const float *x, long ldx, float *y, long ldy, long n, long M, int threads) {
    if (BN < 1 || BK < 1 || (mxfp4 && K % 32)) return -1;
    if (n < 1) return 0;
    long panels = (M + 15) / 16, SK = (K + BK - 1) / BK;
    int failed = 0;
    if (threads > panels) threads = (int)panels;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        float *rows = malloc(sizeof(float) * 32 * K), *panel = rows + 16 * K;
        if (rows == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long p = 0; p < panels; p++) {
            if (rows == NULL) continue;
            long cols = M - p * 16 < 16 ? M - p * 16 : 16;
            for (long i = 0; i < 16; i++) {
                long m = p * 16 + i;
                if (i >= cols)
                    for (long k = 0; k < K; k++) rows[i * K + k] = 0.0f;
                else if (mxfp4)
                    mxfp4_dequant_row(q + m * (K / 2), (const unsigned char *)scale + m * (K / 32), K, rows + i * K);
                else
                    fp8_dequant_row(q + m * K, K, (const float *)scale + m / BN * SK, BK, rows + i * K);
            }
            long k = 0;
            for (; k + 8 <= K; k += 8) {
                transpose8(rows + k, K, panel + k * 16, 16);
                transpose8(rows + 8 * K + k, K, panel + k * 16 + 8, 16);
            }
            for (; k < K; k++)
                for (long i = 0; i < 16; i++) panel[k * 16 + i] = rows[i * K + k];
            panel_rows(panel, K, x, ldx, y + p * 16, ldy, n, cols);
        }
        free(rows);
    }
    return failed ? -2 : 0;
}

int fp8_panels_gemm(const unsigned char *q, long K, const float *scale, long BN, long BK, const float *x, long ldx,
                    float *y, long ldy, long n, long M, int threads) {
    return quant_panels(0, q, scale, BN, BK, K, x, ldx, y, ldy, n, M, threads);
}

int mxfp4_panels_gemm(const unsigned char *q, const unsigned char *e, long K, const float *x, long ldx, float *y,
                      long ldy, long n, long M, int threads) {
    return quant_panels(1, q, e, 1, 32, K, x, ldx, y, ldy, n, M, threads);
}
