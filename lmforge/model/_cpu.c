/* Compiled CPU kernels for small-batch decoding (fp32): GEMV, RMSNorm, RoPE and attention over a KV cache.
 *
 * Why: decoding one token reads every weight once and does two flops per weight, so its speed is memory
 * bandwidth plus per-op overhead. torch's CPU GEMV (MKL sgemv here) streams weights at about half this
 * machine's read bandwidth; a plain AVX2/FMA loop over four rows at a time, split across threads by rows,
 * streams at close to it. The norms, rotations and one-query attention of a decode step are a few thousand
 * flops each, so torch's dispatch of their several ops costs more than the math: here each is one call.
 * The readable references are the torch paths in layers.py / attention.py; tests/model/test_kernels.py
 * asserts agreement to fp32 rounding.
 *
 * One GEMV call may cover several matrices that share the input (q, k and v; gate and up): one thread
 * dispatch, their rows split across threads as if stacked. Threads: a persistent pool (the caller is thread
 * 0). A worker spins briefly between calls (the calls of one decode step come microseconds apart), then
 * sleeps on a condition variable. Calls are serialized by a mutex; the GIL is released while they run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdatomic.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LMF_X86 1
#endif

#define MAX_MATS 8
#define MAX_THREADS 64
#define MAX_BATCH 16
#define SPIN_NS 2000000 /* a worker spins this long after its last job before it sleeps */

typedef struct {
    const float *x;             /* (B, K) */
    int B, K, n_mats;
    const float *w[MAX_MATS];   /* (N_j, K) each, row-major */
    float *y[MAX_MATS];         /* (B, N_j) each */
    int64_t n[MAX_MATS];
    int64_t total;              /* sum of N_j */
} Job;

static int HAVE_AVX2 = 0;

/* ------------------------------------------------------------------ row kernels */

static void rows_scalar(const float *x, int B, int K, const float *w, float *y, int64_t ldy, int64_t r0,
                        int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const float *wr = w + r * K;
        for (int b = 0; b < B; b++) {
            const float *xb = x + (int64_t)b * K;
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += wr[k] * xb[k];
            y[b * ldy + r] = acc;
        }
    }
}

#ifdef LMF_X86
__attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* B == 1: four rows at a time, two 8-wide steps per iteration (eight independent accumulators). */
__attribute__((target("avx2,fma"))) static void rows_b1(const float *x, int K, const float *w, float *y, int64_t r0,
                                                        int64_t r1) {
    int64_t r = r0;
    const int K16 = K & ~15, K8 = K & ~7;
    for (; r + 4 <= r1; r += 4) {
        const float *w0 = w + r * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
        int k = 0;
        for (; k < K16; k += 16) {
            __m256 xa = _mm256_loadu_ps(x + k), xb = _mm256_loadu_ps(x + k + 8);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xa, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xa, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xa, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xa, a3);
            c0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k + 8), xb, c0);
            c1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k + 8), xb, c1);
            c2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k + 8), xb, c2);
            c3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k + 8), xb, c3);
        }
        for (; k < K8; k += 8) {
            __m256 xa = _mm256_loadu_ps(x + k);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xa, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xa, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xa, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xa, a3);
        }
        float s0 = hsum(_mm256_add_ps(a0, c0)), s1 = hsum(_mm256_add_ps(a1, c1));
        float s2 = hsum(_mm256_add_ps(a2, c2)), s3 = hsum(_mm256_add_ps(a3, c3));
        for (; k < K; k++) {
            s0 += w0[k] * x[k]; s1 += w1[k] * x[k]; s2 += w2[k] * x[k]; s3 += w3[k] * x[k];
        }
        y[r] = s0; y[r + 1] = s1; y[r + 2] = s2; y[r + 3] = s3;
    }
    if (r < r1) rows_scalar(x, 1, K, w, y, 0, r, r1);
}

/* Two weight rows against nb (<= 4) input rows: 2 * nb accumulators. Inlined once per constant nb so the
 * accumulators live in registers. */
__attribute__((target("avx2,fma"), always_inline)) static inline void pair_nb(const float *x, const int nb, int K,
                                                                             const float *w0, float *y, int64_t ldy,
                                                                             int64_t r) {
    const float *w1 = w0 + K;
    const int K8 = K & ~7;
    __m256 a[4], c[4];
    for (int b = 0; b < nb; b++) a[b] = c[b] = _mm256_setzero_ps();
    int k = 0;
    for (; k < K8; k += 8) {
        __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
        for (int b = 0; b < nb; b++) {
            __m256 xv = _mm256_loadu_ps(x + (int64_t)b * K + k);
            a[b] = _mm256_fmadd_ps(v0, xv, a[b]);
            c[b] = _mm256_fmadd_ps(v1, xv, c[b]);
        }
    }
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (int64_t)b * K;
        float s0 = hsum(a[b]), s1 = hsum(c[b]);
        for (int kk = k; kk < K; kk++) { s0 += w0[kk] * xb[kk]; s1 += w1[kk] * xb[kk]; }
        y[b * ldy + r] = s0; y[b * ldy + r + 1] = s1;
    }
}

/* B >= 2: two weight rows at a time, the batch in chunks of four. The chunks after the first re-read the two
 * rows from L1, so the weights still stream from memory once. */
__attribute__((target("avx2,fma"))) static void rows_bn(const float *x, int B, int K, const float *w, float *y,
                                                        int64_t ldy, int64_t r0, int64_t r1) {
    int64_t r = r0;
    for (; r + 2 <= r1; r += 2) {
        for (int b0 = 0; b0 < B; b0 += 4) {
            const float *xb = x + (int64_t)b0 * K, *w0 = w + r * K;
            float *yb = y + b0 * ldy;
            switch (B - b0 < 4 ? B - b0 : 4) {
            case 1: pair_nb(xb, 1, K, w0, yb, ldy, r); break;
            case 2: pair_nb(xb, 2, K, w0, yb, ldy, r); break;
            case 3: pair_nb(xb, 3, K, w0, yb, ldy, r); break;
            default: pair_nb(xb, 4, K, w0, yb, ldy, r); break;
            }
        }
    }
    if (r < r1) rows_scalar(x, B, K, w, y, ldy, r, r1);
}
#endif

/* Rows [g0, g1) of the stacked matrices. */
static void run_rows(const Job *j, int64_t g0, int64_t g1) {
    int64_t base = 0;
    for (int m = 0; m < j->n_mats && g0 < g1; m++) {
        int64_t n = j->n[m], lo = g0 - base, hi = g1 - base;
        if (lo < n && hi > 0) {
            if (lo < 0) lo = 0;
            if (hi > n) hi = n;
#ifdef LMF_X86
            if (HAVE_AVX2 && j->B == 1) rows_b1(j->x, j->K, j->w[m], j->y[m], lo, hi);
            else if (HAVE_AVX2) rows_bn(j->x, j->B, j->K, j->w[m], j->y[m], n, lo, hi);
            else
#endif
                rows_scalar(j->x, j->B, j->K, j->w[m], j->y[m], n, lo, hi);
        }
        base += n;
    }
}

static void gemv_part(const void *task, int t, int nt) {
    /* Thread t's share of the stacked rows, cut at multiples of 4 so row blocks stay whole. */
    const Job *j = (const Job *)task;
    int64_t blocks = (j->total + 3) / 4;
    int64_t g0 = blocks * t / nt * 4, g1 = blocks * (t + 1) / nt * 4;
    if (g1 > j->total) g1 = j->total;
    if (g0 < g1) run_rows(j, g0, g1);
}

/* ------------------------------------------------------------------ RMSNorm, RoPE, one-query attention */

#ifdef LMF_X86
__attribute__((target("avx2,fma"))) static float dot_avx(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= n; k += 16) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc2);
    }
    for (; k + 8 <= n; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    float s = hsum(_mm256_add_ps(acc, acc2));
    for (; k < n; k++) s += a[k] * b[k];
    return s;
}

__attribute__((target("avx2,fma"))) static void axpy_avx(float *y, float a, const float *x, int n) {
    __m256 av = _mm256_set1_ps(a);
    int k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(y + k, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + k), _mm256_loadu_ps(y + k)));
    for (; k < n; k++) y[k] += a * x[k];
}
#endif

static float dot(const float *a, const float *b, int n) {
#ifdef LMF_X86
    if (HAVE_AVX2) return dot_avx(a, b, n);
#endif
    float s = 0.0f;
    for (int k = 0; k < n; k++) s += a[k] * b[k];
    return s;
}

static void axpy(float *y, float a, const float *x, int n) {
#ifdef LMF_X86
    if (HAVE_AVX2) { axpy_avx(y, a, x, n); return; }
#endif
    for (int k = 0; k < n; k++) y[k] += a * x[k];
}

/* y = (x * rsqrt(mean(x^2) + eps)) * w per row, the two roundings in HF LlamaRMSNorm's order. */
static void rmsnorm(const float *x, const float *w, float *y, int64_t rows, int C, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * C;
        float *yr = y + r * C;
        float r_std = 1.0f / sqrtf(dot(xr, xr, C) / (float)C + eps);
        for (int c = 0; c < C; c++) yr[c] = (xr[c] * r_std) * w[c];
    }
}

/* HF's rotate_half convention: out[:D/2] = x1 cos - x2 sin, out[D/2:] = x2 cos + x1 sin, per head. */
static void rope(const float *x, int64_t xs_tok, int64_t xs_head, const float *cos_, const float *sin_, int64_t cs_tok,
                 float *out, int64_t n_tok, int H, int D) {
    const int half = D / 2;
    for (int64_t t = 0; t < n_tok; t++) {
        const float *c = cos_ + t * cs_tok, *sn = sin_ + t * cs_tok;
        for (int h = 0; h < H; h++) {
            const float *x1 = x + t * xs_tok + h * xs_head, *x2 = x1 + half;
            float *o1 = out + (t * H + h) * D, *o2 = o1 + half;
            for (int i = 0; i < half; i++) {
                o1[i] = x1[i] * c[i] - x2[i] * sn[i];
                o2[i] = x2[i] * c[i] + x1[i] * sn[i];
            }
        }
    }
}

typedef struct {
    const float *q; int64_t q_sb, q_sh;          /* q (B, H, D) by strides */
    const float *k, *v; int64_t k_sb, k_sh, v_sb, v_sh; /* (B, Hkv, S, D), stride D along S */
    const uint8_t *mask; int64_t m_sb;           /* (B, S) nonzero = may attend */
    float *out;                                  /* (B, H, D) contiguous */
    int B, H, Hkv, S, D;
    float scale;
} Attn;

/* softmax(q k^T * scale, masked) v for the (b, h) pairs of thread t; one query per row. */
static void attn_part(const void *task, int t, int nt) {
    const Attn *a = (const Attn *)task;
    int64_t pairs = (int64_t)a->B * a->H, p0 = pairs * t / nt, p1 = pairs * (t + 1) / nt;
    float *scores = (float *)malloc(sizeof(float) * (size_t)a->S);
    if (!scores) return; /* the caller checked the size; an allocation failure leaves zeros */
    const int G = a->H / a->Hkv;
    for (int64_t p = p0; p < p1; p++) {
        int b = (int)(p / a->H), h = (int)(p % a->H), g = h / G;
        const float *q = a->q + b * a->q_sb + h * a->q_sh;
        const float *k = a->k + b * a->k_sb + g * a->k_sh, *v = a->v + b * a->v_sb + g * a->v_sh;
        const uint8_t *m = a->mask + b * a->m_sb;
        float *o = a->out + p * a->D;
        float mx = -INFINITY;
        for (int s = 0; s < a->S; s++) {
            if (!m[s]) continue;
            scores[s] = dot(q, k + (int64_t)s * a->D, a->D) * a->scale;
            if (scores[s] > mx) mx = scores[s];
        }
        memset(o, 0, sizeof(float) * (size_t)a->D);
        if (mx == -INFINITY) continue; /* nothing visible: zeros rather than NaN */
        float sum = 0.0f;
        for (int s = 0; s < a->S; s++) {
            if (!m[s]) continue;
            scores[s] = expf(scores[s] - mx);
            sum += scores[s];
        }
        float inv = 1.0f / sum;
        for (int s = 0; s < a->S; s++)
            if (m[s]) axpy(o, scores[s] * inv, v + (int64_t)s * a->D, a->D);
    }
    free(scores);
}

/* ------------------------------------------------------------------ the pool */

typedef void (*PartFn)(const void *task, int t, int nt);
static PartFn JOB_FN;        /* the current job: JOB_FN(JOB_TASK, t, JOB_NT) for t < JOB_NT */
static const void *JOB_TASK;
static int JOB_NT;
static atomic_int GEN;       /* bumped once per job */
static atomic_int DONE;      /* workers that finished the current job */
static int N_WORKERS;        /* started so far (thread ids 1..N_WORKERS) */
static int SLEEPERS;         /* guarded by MU */
static pthread_mutex_t MU = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t CV = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t CALL_MU = PTHREAD_MUTEX_INITIALIZER;

static inline void cpu_relax(void) {
#ifdef LMF_X86
    _mm_pause();
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int START_GEN[MAX_THREADS]; /* GEN when each worker was created: its first job is the next one */

static void *worker(void *arg) {
    int tid = (int)(intptr_t)arg;
    int seen = START_GEN[tid];
    for (;;) {
        int64_t t0 = now_ns();
        int g, spins = 0;
        while ((g = atomic_load_explicit(&GEN, memory_order_acquire)) == seen) {
            cpu_relax();
            if (++spins % 256 == 0 && now_ns() - t0 > SPIN_NS) {
                pthread_mutex_lock(&MU);
                SLEEPERS++;
                while (atomic_load_explicit(&GEN, memory_order_acquire) == seen) pthread_cond_wait(&CV, &MU);
                SLEEPERS--;
                pthread_mutex_unlock(&MU);
            }
        }
        seen = g;
        /* Every worker acknowledges every job, participant or not, so no job is posted before all have seen
         * the previous one (a late worker can never read the next job's fields under this generation). */
        if (tid < JOB_NT) JOB_FN(JOB_TASK, tid, JOB_NT);
        atomic_fetch_add_explicit(&DONE, 1, memory_order_release);
    }
    return NULL;
}

static void reset_after_fork(void) {
    /* The child has only the forking thread: forget the workers (they are started again on demand). */
    N_WORKERS = 0;
    SLEEPERS = 0;
    pthread_mutex_init(&MU, NULL);
    pthread_cond_init(&CV, NULL);
    pthread_mutex_init(&CALL_MU, NULL);
}

static int ensure_workers(int n) {
    while (N_WORKERS < n) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        START_GEN[N_WORKERS + 1] = atomic_load_explicit(&GEN, memory_order_relaxed);
        int rc = pthread_create(&th, &attr, worker, (void *)(intptr_t)(N_WORKERS + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) return N_WORKERS;
        N_WORKERS++;
    }
    return n;
}

static void run_parallel(PartFn fn, const void *task, int n_threads) {
    /* fn(task, t, n) for t < n on n threads (the caller is t = 0); returns when all are done. */
    pthread_mutex_lock(&CALL_MU);
    if (n_threads > 1) n_threads = 1 + ensure_workers(n_threads - 1);
    if (n_threads <= 1) {
        pthread_mutex_unlock(&CALL_MU);
        fn(task, 0, 1);
        return;
    }
    JOB_FN = fn; JOB_TASK = task; JOB_NT = n_threads;
    atomic_store_explicit(&DONE, 0, memory_order_relaxed);
    pthread_mutex_lock(&MU);
    atomic_fetch_add_explicit(&GEN, 1, memory_order_release);
    if (SLEEPERS) pthread_cond_broadcast(&CV);
    pthread_mutex_unlock(&MU);
    fn(task, 0, n_threads);
    while (atomic_load_explicit(&DONE, memory_order_acquire) < N_WORKERS) cpu_relax();
    pthread_mutex_unlock(&CALL_MU);
}

/* ------------------------------------------------------------------ Python binding */

/* gemv(x_ptr, B, K, [(w_ptr, y_ptr, N), ...], n_threads): y_j (B, N_j) = x (B, K) @ W_j (N_j, K)^T.
 * Pointers are data_ptr()s of contiguous fp32 tensors; the Python wrapper (kernels.py) checks them. */
static PyObject *py_gemv(PyObject *self, PyObject *args) {
    unsigned long long xp;
    int B, K, n_threads;
    PyObject *mats;
    if (!PyArg_ParseTuple(args, "KiiOi", &xp, &B, &K, &mats, &n_threads)) return NULL;
    if (B < 1 || B > MAX_BATCH || K < 1) return PyErr_Format(PyExc_ValueError, "gemv: bad B=%d or K=%d", B, K);
    PyObject *seq = PySequence_Fast(mats, "gemv: matrices must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
    if (m < 1 || m > MAX_MATS) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "gemv: 1 to %d matrices, got %zd", MAX_MATS, m);
    }
    Job j;
    memset(&j, 0, sizeof j);
    j.x = (const float *)(uintptr_t)xp;
    j.B = B; j.K = K; j.n_mats = (int)m;
    for (Py_ssize_t i = 0; i < m; i++) {
        unsigned long long wp, yp;
        long long n;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKL", &wp, &yp, &n)) {
            Py_DECREF(seq);
            return NULL;
        }
        j.w[i] = (const float *)(uintptr_t)wp;
        j.y[i] = (float *)(uintptr_t)yp;
        j.n[i] = n;
        j.total += n;
    }
    Py_DECREF(seq);
    if (n_threads < 1) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (j.total < 64) n_threads = 1; /* not worth a dispatch */
    Py_BEGIN_ALLOW_THREADS
    run_parallel(gemv_part, &j, n_threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* rmsnorm(x_ptr, w_ptr, y_ptr, rows, C, eps): contiguous fp32 rows. */
static PyObject *py_rmsnorm(PyObject *self, PyObject *args) {
    unsigned long long xp, wp, yp;
    long long rows;
    int C;
    float eps;
    if (!PyArg_ParseTuple(args, "KKKLif", &xp, &wp, &yp, &rows, &C, &eps)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    rmsnorm((const float *)(uintptr_t)xp, (const float *)(uintptr_t)wp, (float *)(uintptr_t)yp, rows, C, eps);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* rope(x_ptr, xs_tok, xs_head, cos_ptr, sin_ptr, cs_tok, out_ptr, n_tok, H, D): strides in floats. */
static PyObject *py_rope(PyObject *self, PyObject *args) {
    unsigned long long xp, cp, sp, op;
    long long xs_tok, xs_head, cs_tok, n_tok;
    int H, D;
    if (!PyArg_ParseTuple(args, "KLLKKLKLii", &xp, &xs_tok, &xs_head, &cp, &sp, &cs_tok, &op, &n_tok, &H, &D))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rope((const float *)(uintptr_t)xp, xs_tok, xs_head, (const float *)(uintptr_t)cp, (const float *)(uintptr_t)sp,
         cs_tok, (float *)(uintptr_t)op, n_tok, H, D);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* attention(q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sh, v_ptr, v_sb, v_sh, mask_ptr, m_sb, out_ptr,
 *           B, H, Hkv, S, D, scale, n_threads): one query per row against S cached keys. */
static PyObject *py_attention(PyObject *self, PyObject *args) {
    unsigned long long qp, kp, vp, mp, op;
    long long q_sb, q_sh, k_sb, k_sh, v_sb, v_sh, m_sb;
    int B, H, Hkv, S, D, n_threads;
    float scale;
    if (!PyArg_ParseTuple(args, "KLLKLLKLLKLKiiiiifi", &qp, &q_sb, &q_sh, &kp, &k_sb, &k_sh, &vp, &v_sb, &v_sh, &mp,
                          &m_sb, &op, &B, &H, &Hkv, &S, &D, &scale, &n_threads))
        return NULL;
    if (B < 1 || H < 1 || Hkv < 1 || H % Hkv || S < 1 || D < 1)
        return PyErr_Format(PyExc_ValueError, "attention: bad shape B=%d H=%d Hkv=%d S=%d D=%d", B, H, Hkv, S, D);
    Attn a = {(const float *)(uintptr_t)qp, q_sb, q_sh, (const float *)(uintptr_t)kp, (const float *)(uintptr_t)vp,
              k_sb, k_sh, v_sb, v_sh, (const uint8_t *)(uintptr_t)mp, m_sb, (float *)(uintptr_t)op,
              B, H, Hkv, S, D, scale};
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if ((int64_t)B * H * S * D < 65536 || n_threads < 1) n_threads = 1; /* small: not worth a dispatch */
    Py_BEGIN_ALLOW_THREADS
    run_parallel(attn_part, &a, n_threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_has_avx2(PyObject *self, PyObject *noargs) { return PyBool_FromLong(HAVE_AVX2); }

static PyMethodDef methods[] = {
    {"gemv", py_gemv, METH_VARARGS, "gemv(x_ptr, B, K, [(w_ptr, y_ptr, N), ...], n_threads)"},
    {"rmsnorm", py_rmsnorm, METH_VARARGS, "rmsnorm(x_ptr, w_ptr, y_ptr, rows, C, eps)"},
    {"rope", py_rope, METH_VARARGS, "rope(x_ptr, xs_tok, xs_head, cos_ptr, sin_ptr, cs_tok, out_ptr, n_tok, H, D)"},
    {"attention", py_attention, METH_VARARGS, "one-query attention over a KV cache, see _cpu.c"},
    {"has_avx2", py_has_avx2, METH_NOARGS, "True when the AVX2/FMA kernels run on this CPU."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_cpu", "Small-batch fp32 decode kernels.", -1,
                                       methods};

PyMODINIT_FUNC PyInit__cpu(void) {
#ifdef LMF_X86
    __builtin_cpu_init();
    HAVE_AVX2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    pthread_atfork(NULL, NULL, reset_after_fork);
    return PyModule_Create(&moduledef);
}
