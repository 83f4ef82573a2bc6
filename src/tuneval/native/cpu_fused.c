/* Fused CPU kernels for tuneval's BERT encoder forward (src/tuneval/packed_bert.py).
 *
 * Built on first use by src/tuneval/native/__init__.py (cc -O3, AVX2/FMA, OpenMP, which
 * resolves to the libgomp torch has already loaded, so these loops share torch's threads).
 * Every array is float32, row-major and contiguous unless a stride says otherwise.
 *
 * Dropout: element `idx` of a call is kept when the top 16 bits of hash(seed, idx) are
 * >= `threshold` (p = threshold / 65536), and kept values are scaled by `dscale`. The seed is
 * one draw from torch's generator per call, so runs stay seeded and resumable. `keep` bytes
 * are written for the backward pass (threshold 0 = no dropout: all kept, nothing written).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline uint32_t mix32(uint32_t x) { /* "lowbias32": every input bit reaches every output bit */
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static inline unsigned char kept(uint32_t seed_lo, uint32_t seed_hi, uint32_t idx, uint32_t threshold) {
    return (mix32(mix32(idx + seed_lo) ^ seed_hi) >> 16) >= threshold;
}

/* Fill keep[0..n) for flat indices base..base+n (mod 2**32). */
static void draw(unsigned char *keep, long n, uint64_t base, uint64_t seed, uint32_t threshold) {
    const uint32_t lo = (uint32_t)seed, hi = (uint32_t)(seed >> 32), b = (uint32_t)base;
#pragma omp simd
    for (long i = 0; i < n; i++) keep[i] = kept(lo, hi, b + (uint32_t)i, threshold);
}

/* out = LayerNorm(dropout(y) + r); saves xhat (normalised input), rstd and the keep mask. */
void dal_forward(const float *y, const float *r, const float *gamma, const float *beta, float *out, float *xhat,
                 float *rstd, unsigned char *keep, long rows, long hidden, float eps, uint64_t seed,
                 uint32_t threshold, float dscale, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long i = 0; i < rows; i++) {
        const float *yi = y + i * hidden, *ri = r + i * hidden;
        float *xi = xhat + i * hidden, *oi = out + i * hidden;
        if (threshold) {
            unsigned char *ki = keep + i * hidden;
            draw(ki, hidden, (uint64_t)i * (uint64_t)hidden, seed, threshold);
#pragma omp simd
            for (long j = 0; j < hidden; j++) xi[j] = yi[j] * ((float)ki[j] * dscale) + ri[j]; /* no branch: masks are random */
        } else {
#pragma omp simd
            for (long j = 0; j < hidden; j++) xi[j] = yi[j] + ri[j];
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (long j = 0; j < hidden; j++) sum += xi[j];
        const float mean = sum / (float)hidden;
        float var = 0.0f;
#pragma omp simd reduction(+ : var)
        for (long j = 0; j < hidden; j++) var += (xi[j] - mean) * (xi[j] - mean);
        const float rs = 1.0f / sqrtf(var / (float)hidden + eps);
        rstd[i] = rs;
#pragma omp simd
        for (long j = 0; j < hidden; j++) {
            xi[j] = (xi[j] - mean) * rs;
            oi[j] = xi[j] * gamma[j] + beta[j];
        }
    }
}

static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* out[j] = sum over threads t of partial[t * stride + j], j < n: the per-thread column sums a
 * backward pass accumulates (each thread owns a row of `partial`, so no atomics), reduced. */
static void sum_partials(const float *partial, int nthreads, long stride, long n, float *out) {
    for (long j = 0; j < n; j++) {
        float s = 0.0f;
        for (int t = 0; t < nthreads; t++) s += partial[(long)t * stride + j];
        out[j] = s;
    }
}

/* Gradients of dal_forward: dy, dr (= the gradient reaching LayerNorm's input), dgamma, dbeta. */
void dal_backward(const float *g, const float *xhat, const float *rstd, const float *gamma,
                  const unsigned char *keep, float dscale, float *dy, float *dr, float *dgamma, float *dbeta,
                  long rows, long hidden, int nthreads) {
    float *partial = calloc((size_t)nthreads * 2 * hidden, sizeof(float));
#pragma omp parallel num_threads(nthreads)
    {
        float *pg = partial + (long)thread_id() * 2 * hidden, *pb = pg + hidden;
#pragma omp for schedule(static)
        for (long i = 0; i < rows; i++) {
            const float *gi = g + i * hidden, *xi = xhat + i * hidden;
            float *dri = dr + i * hidden, *dyi = dy + i * hidden;
            float c1 = 0.0f, c2 = 0.0f;
#pragma omp simd reduction(+ : c1, c2)
            for (long j = 0; j < hidden; j++) {
                const float gg = gi[j] * gamma[j];
                c1 += gg;
                c2 += gg * xi[j];
                pg[j] += gi[j] * xi[j];
                pb[j] += gi[j];
            }
            c1 /= (float)hidden;
            c2 /= (float)hidden;
            const float rs = rstd[i];
#pragma omp simd
            for (long j = 0; j < hidden; j++) dri[j] = rs * (gi[j] * gamma[j] - c1 - xi[j] * c2);
            if (keep) {
                const unsigned char *ki = keep + i * hidden;
#pragma omp simd
                for (long j = 0; j < hidden; j++) dyi[j] = dri[j] * ((float)ki[j] * dscale);
            } else {
                memcpy(dyi, dri, (size_t)hidden * sizeof(float));
            }
        }
    }
    sum_partials(partial, nthreads, 2 * hidden, hidden, dgamma);
    sum_partials(partial + hidden, nthreads, 2 * hidden, hidden, dbeta);
    free(partial);
}

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* CALL(D) with D a constant where the head size has code unrolled for it (32, 64), else d. */
#define BY_HEAD_SIZE(d, CALL) \
    do {                      \
        if ((d) == 32)        \
            CALL(32);         \
        else if ((d) == 64)   \
            CALL(64);         \
        else                  \
            CALL(d);          \
    } while (0)

/* exp of 8 lanes, x <= 0: Cephes' expf polynomial (~1 ulp). */
ALWAYS_INLINE __m256 exp8_nonpos(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    const __m256 z = _mm256_mul_ps(r, r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, z, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* dst[c * n8 + j] = src[j * stride + c], zero past n: a head's keys (or values) as D rows of n8
 * (n rounded up to 8), so that one query's scores against 8 keys are D vector FMAs. Moved in 8x8
 * blocks transposed in registers (D is a multiple of 8): the scalar loop was 15% of attention. */
ALWAYS_INLINE void transpose_head(float *dst, const float *src, long stride, long n, long n8, const int D) {
    for (long j = 0; j < n8; j += 8) {
        for (int c = 0; c < D; c += 8) {
            __m256 r[8];
            for (int t = 0; t < 8; t++)
                r[t] = j + t < n ? _mm256_loadu_ps(src + (j + t) * stride + c) : _mm256_setzero_ps();
            const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
            const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
            const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
            const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
            const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
            const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
            const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
            const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
            const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
            const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
            const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
            const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
            float *o = dst + c * n8 + j;
            _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(o + n8, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(o + 2 * n8, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(o + 3 * n8, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(o + 4 * n8, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(o + 5 * n8, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(o + 6 * n8, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(o + 7 * n8, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
    }
}

/* rows r0, r1 [0..n8) = sum_c x0[c] (x1[c]) * mt[c * n8 + j]: two queries (or gradient rows) at
 * once share each load of mt, and their blocks of 8 keep eight FMA chains in flight, which
 * hides the FMA latency that one short row would be bound by. x1 may equal x0 (one row). */
ALWAYS_INLINE void rows_times(float *r0, float *r1, const float *x0, const float *x1, const float *mt, long n8,
                              const int D) {
    long jb = 0;
    for (; jb + 32 <= n8; jb += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int c = 0; c < D; c++) {
            const __m256 u = _mm256_broadcast_ss(x0 + c), w = _mm256_broadcast_ss(x1 + c);
            const float *m = mt + c * n8 + jb;
            const __m256 m0 = _mm256_loadu_ps(m), m1 = _mm256_loadu_ps(m + 8);
            const __m256 m2 = _mm256_loadu_ps(m + 16), m3 = _mm256_loadu_ps(m + 24);
            a0 = _mm256_fmadd_ps(u, m0, a0);
            a1 = _mm256_fmadd_ps(u, m1, a1);
            a2 = _mm256_fmadd_ps(u, m2, a2);
            a3 = _mm256_fmadd_ps(u, m3, a3);
            b0 = _mm256_fmadd_ps(w, m0, b0);
            b1 = _mm256_fmadd_ps(w, m1, b1);
            b2 = _mm256_fmadd_ps(w, m2, b2);
            b3 = _mm256_fmadd_ps(w, m3, b3);
        }
        _mm256_storeu_ps(r0 + jb, a0);
        _mm256_storeu_ps(r0 + jb + 8, a1);
        _mm256_storeu_ps(r0 + jb + 16, a2);
        _mm256_storeu_ps(r0 + jb + 24, a3);
        _mm256_storeu_ps(r1 + jb, b0);
        _mm256_storeu_ps(r1 + jb + 8, b1);
        _mm256_storeu_ps(r1 + jb + 16, b2);
        _mm256_storeu_ps(r1 + jb + 24, b3);
    }
    for (; jb < n8; jb += 8) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
        int c = 0;
        for (; c + 2 <= D; c += 2) {
            const __m256 m0 = _mm256_loadu_ps(mt + c * n8 + jb), m1 = _mm256_loadu_ps(mt + (c + 1) * n8 + jb);
            a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x0 + c), m0, a0);
            a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x0 + c + 1), m1, a1);
            b0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x1 + c), m0, b0);
            b1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x1 + c + 1), m1, b1);
        }
        for (; c < D; c++) {
            const __m256 m0 = _mm256_loadu_ps(mt + c * n8 + jb);
            a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x0 + c), m0, a0);
            b0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x1 + c), m0, b0);
        }
        _mm256_storeu_ps(r0 + jb, _mm256_add_ps(a0, a1));
        _mm256_storeu_ps(r1 + jb, _mm256_add_ps(b0, b1));
    }
}

/* s[0..n8) <- exp(scale * (s - max over the first n)), zero past n; returns their sum. */
ALWAYS_INLINE float softmax_numerators(float *s, long n, long n8, float scale) {
    float mx = -INFINITY;
    for (long j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    const __m256 vmx = _mm256_set1_ps(mx), vsc = _mm256_set1_ps(scale);
    __m256 acc = _mm256_setzero_ps();
    for (long jb = 0; jb < n8; jb += 8) {
        __m256 e = exp8_nonpos(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + jb), vmx), vsc));
        if (jb + 8 > n) { /* the last block: lanes past n are padding */
            const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - jb)), lane));
            e = _mm256_and_ps(e, live);
        }
        _mm256_storeu_ps(s + jb, e);
        acc = _mm256_add_ps(acc, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

/* o0, o1 [0..D) = sum_j w0[j] (w1[j]) * rows[j * stride + 0..D): two output rows share each row load. */
ALWAYS_INLINE void weighted_rows(float *o0, float *o1, const float *w0, const float *w1, const float *rows,
                                 long stride, long n, const int D) {
    __m256 a[D / 8], b[D / 8];
    for (int v = 0; v < D / 8; v++) a[v] = b[v] = _mm256_setzero_ps();
    for (long j = 0; j < n; j++) {
        const __m256 u = _mm256_broadcast_ss(w0 + j), w = _mm256_broadcast_ss(w1 + j);
        for (int v = 0; v < D / 8; v++) {
            const __m256 r = _mm256_loadu_ps(rows + j * stride + 8 * v);
            a[v] = _mm256_fmadd_ps(u, r, a[v]);
            b[v] = _mm256_fmadd_ps(w, r, b[v]);
        }
    }
    for (int v = 0; v < D / 8; v++) {
        _mm256_storeu_ps(o0 + 8 * v, a[v]);
        _mm256_storeu_ps(o1 + 8 * v, b[v]);
    }
}

/* One query row's probabilities (saved), its dropout mask, and in s the dropped weights. */
ALWAYS_INLINE void attn_probs(float *s, long lk, long lk8, float scale, float *probs, const unsigned char *keep,
                              long base, uint32_t threshold, float dscale) {
    float *p = probs + base;
    const float inv = 1.0f / softmax_numerators(s, lk, lk8, scale);
#pragma omp simd
    for (long j = 0; j < lk; j++) p[j] = s[j] * inv;
    if (threshold) { /* keep[base..] was drawn by the caller, for the whole (sequence, head) at once */
#pragma omp simd
        for (long j = 0; j < lk; j++) s[j] = p[j] * ((float)keep[base + j] * dscale);
    } else {
#pragma omp simd
        for (long j = 0; j < lk; j++) s[j] = p[j];
    }
}

ALWAYS_INLINE void attn_forward_item(const float *q, long q_stride, const float *k, const float *v, long kv_stride,
                                     long kv0, long lk, long q0, long lq, long pbase, int h, long width, float scale,
                                     float *out, float *probs, unsigned char *keep, uint64_t seed,
                                     uint32_t threshold, float dscale, float *work, const int D) {
    const long lk8 = (lk + 7) & ~7L;
    float *kt = work, *s0 = work + lk8 * D, *s1 = s0 + lk8;
    const float *vb = v + kv0 * kv_stride + h * D;
    transpose_head(kt, k + kv0 * kv_stride + h * D, kv_stride, lk, lk8, D);
    if (threshold) { /* one long draw: rows are too short for the hash loop to pay its setup */
        const long item = pbase + h * lq * lk;
        draw(keep + item, lq * lk, (uint64_t)item, seed, threshold);
    }
    for (long i = 0; i < lq; i += 2) {
        const long i1 = i + 1 < lq ? i + 1 : i; /* an odd last query pairs with itself */
        rows_times(s0, s1, q + (q0 + i) * q_stride + h * D, q + (q0 + i1) * q_stride + h * D, kt, lk8, D);
        attn_probs(s0, lk, lk8, scale, probs, keep, pbase + (h * lq + i) * lk, threshold, dscale);
        attn_probs(s1, lk, lk8, scale, probs, keep, pbase + (h * lq + i1) * lk, threshold, dscale);
        weighted_rows(out + (q0 + i) * width + h * D, out + (q0 + i1) * width + h * D, s0, s1, vb, kv_stride, lk, D);
    }
}

/* Multi-head attention over packed sequences, with softmax and dropout on the probabilities.
 *
 * Sequence b's keys and values are rows kv_start[b] .. +kv_len[b] of k and v (row stride
 * kv_stride); its queries are rows q_start[b] .. +q_len[b] of q (row stride q_stride), and
 * the output rows with the same numbers of out ([rows, heads * d]). Head h reads columns
 * h*d .. h*d+d. probs/keep hold, from p_off[b], [heads, q_len, kv_len] for sequence b.
 * Each (sequence, head) pair is one work item: it owns its rows' columns of every output.
 * d must be a multiple of 8 (the Python side checks); 32 and 64 get code unrolled for them. */
void attn_forward(const float *q, long q_stride, const float *k, const float *v, long kv_stride,
                  const int64_t *kv_start, const int64_t *kv_len, const int64_t *q_start, const int64_t *q_len,
                  const int64_t *p_off, long nseq, int heads, int d, float scale, float *out, float *probs,
                  unsigned char *keep, uint64_t seed, uint32_t threshold, float dscale, int nthreads) {
    const long width = (long)heads * d;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (long w = 0; w < nseq * heads; w++) {
        const long b = w / heads, h = w % heads, lk = kv_len[b], lk8 = (lk + 7) & ~7L;
        float *work = malloc((size_t)lk8 * (d + 2) * sizeof(float));
#define FWD(D)                                                                                                   \
    attn_forward_item(q, q_stride, k, v, kv_stride, kv_start[b], lk, q_start[b], q_len[b], p_off[b], h, width,   \
                      scale, out, probs, keep, seed, threshold, dscale, work, D)
        BY_HEAD_SIZE(d, FWD);
#undef FWD
        free(work);
    }
}

/* One query row's backward through dropout and softmax: g = dS (scaled), pm = dropped probs. */
ALWAYS_INLINE void attn_probs_grad(float *dp, float *g, float *pm, const float *p, const unsigned char *keep,
                                   long base, long lk, float scale, float dscale) {
    float c = 0.0f;
#pragma omp simd reduction(+ : c)
    for (long j = 0; j < lk; j++) {
        const float m = keep ? (float)keep[base + j] * dscale : 1.0f;
        dp[j] *= m;
        pm[j] = p[j] * m;
        c += dp[j] * p[j];
    }
#pragma omp simd
    for (long j = 0; j < lk; j++) g[j] = scale * p[j] * (dp[j] - c);
}

ALWAYS_INLINE void attn_backward_item(const float *q, long q_stride, const float *k, const float *v,
                                      long kv_stride, long kv0, long lk, long q0, long lq, long pbase, int h,
                                      long width, float scale, const float *probs, const unsigned char *keep,
                                      float dscale, const float *dout, float *dq, float *dk, float *dv,
                                      float *work, const int D) {
    const long lk8 = (lk + 7) & ~7L, off = kv0 * kv_stride + h * D;
    float *vt = work, *dp0 = vt + lk8 * D, *dp1 = dp0 + lk8, *g0 = dp1 + lk8, *g1 = g0 + lk8;
    float *pm0 = g1 + lk8, *pm1 = pm0 + lk8;
    transpose_head(vt, v + off, kv_stride, lk, lk8, D);
    for (long j = 0; j < lk; j++) {
        memset(dk + off + j * kv_stride, 0, (size_t)D * sizeof(float));
        memset(dv + off + j * kv_stride, 0, (size_t)D * sizeof(float));
    }
    for (long i = 0; i < lq; i += 2) {
        const int pair = i + 1 < lq;
        const long i1 = pair ? i + 1 : i;
        const float *qa = q + (q0 + i) * q_stride + h * D, *qb = q + (q0 + i1) * q_stride + h * D;
        const float *ga = dout + (q0 + i) * width + h * D, *gb = dout + (q0 + i1) * width + h * D;
        const long base0 = pbase + (h * lq + i) * lk, base1 = pbase + (h * lq + i1) * lk;
        rows_times(dp0, dp1, ga, gb, vt, lk8, D); /* gradients of the dropped probabilities */
        attn_probs_grad(dp0, g0, pm0, probs + base0, keep, base0, lk, scale, dscale);
        attn_probs_grad(dp1, g1, pm1, probs + base1, keep, base1, lk, scale, dscale);
        if (!pair) { /* the odd last query: its twin must add nothing to dk, dv */
            memset(g1, 0, (size_t)lk * sizeof(float));
            memset(pm1, 0, (size_t)lk * sizeof(float));
        }
        float dqb[D];
        weighted_rows(dq + (q0 + i) * q_stride + h * D, pair ? dq + (q0 + i1) * q_stride + h * D : dqb, g0, g1,
                      k + off, kv_stride, lk, D);
        __m256 vqa[D / 8], vqb[D / 8], vga[D / 8], vgb[D / 8];
        for (int u = 0; u < D / 8; u++) {
            vqa[u] = _mm256_loadu_ps(qa + 8 * u);
            vqb[u] = _mm256_loadu_ps(qb + 8 * u);
            vga[u] = _mm256_loadu_ps(ga + 8 * u);
            vgb[u] = _mm256_loadu_ps(gb + 8 * u);
        }
        for (long j = 0; j < lk; j++) {
            float *dkj = dk + off + j * kv_stride, *dvj = dv + off + j * kv_stride;
            const __m256 ka = _mm256_broadcast_ss(g0 + j), kb = _mm256_broadcast_ss(g1 + j);
            const __m256 va = _mm256_broadcast_ss(pm0 + j), vb = _mm256_broadcast_ss(pm1 + j);
            for (int u = 0; u < D / 8; u++) {
                __m256 x = _mm256_fmadd_ps(ka, vqa[u], _mm256_loadu_ps(dkj + 8 * u));
                _mm256_storeu_ps(dkj + 8 * u, _mm256_fmadd_ps(kb, vqb[u], x));
                __m256 y = _mm256_fmadd_ps(va, vga[u], _mm256_loadu_ps(dvj + 8 * u));
                _mm256_storeu_ps(dvj + 8 * u, _mm256_fmadd_ps(vb, vgb[u], y));
            }
        }
    }
}

/* Gradients of attn_forward: dq, dk, dv in the layouts (and strides) of q, k, v. */
void attn_backward(const float *q, long q_stride, const float *k, const float *v, long kv_stride,
                   const int64_t *kv_start, const int64_t *kv_len, const int64_t *q_start, const int64_t *q_len,
                   const int64_t *p_off, long nseq, int heads, int d, float scale, const float *probs,
                   const unsigned char *keep, float dscale, const float *dout, float *dq, float *dk, float *dv,
                   int nthreads) {
    const long width = (long)heads * d;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (long w = 0; w < nseq * heads; w++) {
        const long b = w / heads, h = w % heads, lk = kv_len[b], lk8 = (lk + 7) & ~7L;
        float *work = malloc((size_t)lk8 * (d + 6) * sizeof(float));
#define BWD(D)                                                                                                   \
    attn_backward_item(q, q_stride, k, v, kv_stride, kv_start[b], lk, q_start[b], q_len[b], p_off[b], h, width,  \
                       scale, probs, keep, dscale, dout, dq, dk, dv, work, D)
        BY_HEAD_SIZE(d, BWD);
#undef BWD
        free(work);
    }
}

/* GELU (erf form, as torch's gelu with approximate="none") of 8 lanes and its derivative.
 * erf is Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), the formula of torch's own vectorised
 * erf; the exp it needs, exp(-x^2 / 2), is also the normal density, so the derivative
 * Phi(x) + x phi(x) costs a few FMAs more: saving it here leaves the backward one multiply. */
ALWAYS_INLINE void gelu8(__m256 x, __m256 *y, __m256 *dy) {
    const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
    const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
    const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, _mm256_set1_ps(1.0f)));
    __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
    const __m256 e = exp8_nonpos(_mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(-0.5f)));
    const __m256 erf_abs = _mm256_fnmadd_ps(_mm256_mul_ps(r, t), e, _mm256_set1_ps(1.0f));
    const __m256 cdf = _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_xor_ps(erf_abs, sign)));
    *y = _mm256_mul_ps(x, cdf);
    *dy = _mm256_fmadd_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.39894228040143268f)), e, cdf); /* 1/sqrt(2 pi) */
}

/* y = gelu(h) and d = gelu'(h) over n elements (n a multiple of 8 is not required). */
void gelu_forward(const float *h, float *y, float *d, long n, int nthreads) {
    const long n8 = n / 8 * 8;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long i = 0; i < n8; i += 8) {
        __m256 yv, dv;
        gelu8(_mm256_loadu_ps(h + i), &yv, &dv);
        _mm256_storeu_ps(y + i, yv);
        _mm256_storeu_ps(d + i, dv);
    }
    if (n8 < n) {
        float in[8] = {0}, yo[8], dout[8];
        memcpy(in, h + n8, (size_t)(n - n8) * sizeof(float));
        __m256 yv, dv;
        gelu8(_mm256_loadu_ps(in), &yv, &dv);
        _mm256_storeu_ps(yo, yv);
        _mm256_storeu_ps(dout, dv);
        memcpy(y + n8, yo, (size_t)(n - n8) * sizeof(float));
        memcpy(d + n8, dout, (size_t)(n - n8) * sizeof(float));
    }
}

/* dh = g * d over [rows, cols], and dbias = the column sums of dh (the bias gradient of the
 * linear layer in front of the GELU), in the same pass. */
void gelu_backward(const float *g, const float *d, float *dh, float *dbias, long rows, long cols, int nthreads) {
    float *partial = calloc((size_t)nthreads * cols, sizeof(float));
#pragma omp parallel num_threads(nthreads)
    {
        float *pb = partial + (long)thread_id() * cols;
#pragma omp for schedule(static)
        for (long i = 0; i < rows; i++) {
            const float *gi = g + i * cols, *di = d + i * cols;
            float *hi = dh + i * cols;
#pragma omp simd
            for (long j = 0; j < cols; j++) {
                hi[j] = gi[j] * di[j];
                pb[j] += hi[j];
            }
        }
    }
    sum_partials(partial, nthreads, cols, cols, dbias);
    free(partial);
}

/* The sum of squares of `count` float arrays together (a global gradient norm for clipping),
 * in one call: torch's vector_norm ran at ~8 GB/s one tensor at a time here. Chunks of 4096
 * are summed in float lanes, the chunk sums in double. */
double sumsq_many(const float *const *ptrs, const long *lens, long count, int nthreads) {
    double total = 0.0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    for (long t = 0; t < count; t++) {
        const float *x = ptrs[t];
        const long n = lens[t];
#pragma omp for schedule(static) nowait
        for (long c = 0; c < n; c += 4096) {
            const long end = c + 4096 < n ? c + 4096 : n;
            __m256 acc = _mm256_setzero_ps();
            long i = c;
            for (; i + 8 <= end; i += 8) {
                const __m256 v = _mm256_loadu_ps(x + i);
                acc = _mm256_fmadd_ps(v, v, acc);
            }
            float lanes[8];
            _mm256_storeu_ps(lanes, acc);
            double s = 0.0;
            for (int l = 0; l < 8; l++) s += lanes[l];
            for (; i < end; i++) s += (double)x[i] * x[i];
            total += s;
        }
    }
    return total;
}

/* One AdamW step over a [rows, cols] parameter whose rows with `active[i] == 0` have had no
 * gradient since the optimizer started (exp_avg, exp_avg_sq and grad all zero there): for those
 * the step is exactly param *= 1 - lr * wd, a pass over the parameter alone instead of over four
 * arrays. Active rows take torch's fused CPU AdamW arithmetic, operation by operation and with
 * no contraction into FMAs (aten/src/ATen/native/cpu/FusedAdamKernel.cpp): grad /= grad_scale,
 * param *= 1 - lr * wd, exp_avg.lerp_(grad, 1 - beta1), exp_avg_sq = exp_avg_sq *
 * beta2 + (1 - beta2) * grad * grad, param += -step_size * exp_avg / (sqrt(exp_avg_sq) /
 * sqrt(bias_correction2) + eps). Unlike torch, the divided gradient is not stored back: the
 * reused buffer must stay zero outside the rows it wrote, and 0 / grad_scale is NaN when the
 * scale is (a NaN norm), which would leave NaN rows that no later step clears. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
void adamw_rows(float *p, const float *g, float *m, float *v, const unsigned char *active, long rows, long cols,
                float decay, float lerp_w, float beta2, float beta2c, float neg_step_size, float bc2_sqrt,
                float eps, const float *grad_scale, int nthreads) {
    const int small = fabsf(lerp_w) < 0.5f; /* torch's lerp: two forms, for accuracy */
    const float coeff = small ? lerp_w : lerp_w - 1.0f;
    const __m256 vdecay = _mm256_set1_ps(decay), vcoeff = _mm256_set1_ps(coeff), vb2 = _mm256_set1_ps(beta2),
                 vb2c = _mm256_set1_ps(beta2c), vss = _mm256_set1_ps(neg_step_size),
                 vbc2 = _mm256_set1_ps(bc2_sqrt), veps = _mm256_set1_ps(eps);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < rows; r++) {
        float *pr = p + r * cols;
        long j = 0;
        if (!active[r]) {
            if (decay != 1.0f) {
                for (; j + 8 <= cols; j += 8) _mm256_storeu_ps(pr + j, _mm256_mul_ps(_mm256_loadu_ps(pr + j), vdecay));
                for (; j < cols; j++) pr[j] = pr[j] * decay;
            }
            continue;
        }
        const float *gr = g + r * cols;
        float *mr = m + r * cols, *vr = v + r * cols;
        for (; j + 8 <= cols; j += 8) {
            __m256 gv = _mm256_loadu_ps(gr + j);
            if (grad_scale) gv = _mm256_div_ps(gv, _mm256_set1_ps(*grad_scale));
            const __m256 pv = _mm256_mul_ps(_mm256_loadu_ps(pr + j), vdecay);
            __m256 mv = _mm256_loadu_ps(mr + j);
            mv = _mm256_fmadd_ps(vcoeff, _mm256_sub_ps(gv, mv), small ? mv : gv);
            const __m256 vv = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(vr + j), vb2), _mm256_mul_ps(_mm256_mul_ps(vb2c, gv), gv));
            _mm256_storeu_ps(mr + j, mv);
            _mm256_storeu_ps(vr + j, vv);
            const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vv), vbc2), veps);
            _mm256_storeu_ps(pr + j, _mm256_add_ps(pv, _mm256_div_ps(_mm256_mul_ps(vss, mv), denom)));
        }
        for (; j < cols; j++) {
            float gs = gr[j];
            if (grad_scale) gs = gs / *grad_scale;
            const float pv = pr[j] * decay;
            mr[j] = fmaf(coeff, gs - mr[j], small ? mr[j] : gs);
            vr[j] = vr[j] * beta2 + beta2c * gs * gs;
            pr[j] = pv + neg_step_size * mr[j] / (sqrtf(vr[j]) / bc2_sqrt + eps);
        }
    }
}
#pragma GCC pop_options
