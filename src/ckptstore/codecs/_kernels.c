/* Fused inner loops of the delta and byte-plane codecs.
 *
 * The numpy implementations in delta.py / planes.py are the reference: these kernels must produce the same bytes
 * (tests/codecs/test_kernels.py compares them). They exist because the numpy versions make ~10 passes over each
 * tensor; here each transform is one pass, with the GIL released so tensors encode in parallel.
 *
 * Floating point: the only float operation is one IEEE single-precision multiply (prediction = prev * scale),
 * compiled with -ffp-contract=off so no fused multiply-add can change its rounding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline uint32_t ord32(uint32_t w) {
    /* float bit pattern -> integer in the same order as the floats (an involution) */
    uint32_t mask = (uint32_t)((int32_t)w >> 31) & 0x7FFFFFFFu;
    return w ^ mask;
}

static inline uint32_t scaled32(uint32_t p, float s) {
    /* one IEEE single-precision multiply, rounded to nearest (no FMA: -ffp-contract=off, nothing to fuse) */
    float v;
    memcpy(&v, &p, 4);
    v = v * s;
    uint32_t out;
    memcpy(&out, &v, 4);
    return out;
}

/* Run BODY for every element i with the prediction of element i in `pr`, specialised per predictor so the
 * inner loops stay branch-free: mode 0 = previous value, 1 = one scale, 2 = one scale per row. */
#define FOR_EACH_PREDICTION(BODY)                                                         \
    if (mode == 0) {                                                                      \
        for (Py_ssize_t i = 0; i < n; i++) { uint32_t pr = ps[i]; BODY }                  \
    } else if (mode == 1) {                                                               \
        float s0 = sc[0];                                                                 \
        for (Py_ssize_t i = 0; i < n; i++) { uint32_t pr = scaled32(ps[i], s0); BODY }    \
    } else {                                                                              \
        for (Py_ssize_t r = 0; r < n / cols; r++) {                                       \
            float s0 = sc[r];                                                             \
            for (Py_ssize_t i = r * cols; i < (r + 1) * cols; i++) {                      \
                uint32_t pr = scaled32(ps[i], s0); BODY                                   \
            }                                                                             \
        }                                                                                 \
    }

static int get_buffers(Py_buffer *a, Py_buffer *b, Py_buffer *s, Py_buffer *o, Py_ssize_t *n, Py_ssize_t rows,
                       int mode, Py_ssize_t *cols) {
    if (a->len % 4 || b->len != a->len || o->len != a->len) {
        PyErr_SetString(PyExc_ValueError, "buffers must be float32 words of equal length");
        return -1;
    }
    *n = a->len / 4;
    *cols = 1;
    if (mode == 1 && s->len < 4) {
        PyErr_SetString(PyExc_ValueError, "scale mode needs one scale");
        return -1;
    }
    if (mode == 2) {
        if (rows <= 0 || s->len != rows * 4 || *n % rows) {
            PyErr_SetString(PyExc_ValueError, "rowscale mode needs one scale per row");
            return -1;
        }
        *cols = *n / rows;
    }
    return 0;
}

static PyObject *f32_delta_encode(PyObject *self, PyObject *args) {
    Py_buffer x, p, s, o;
    int mode;
    Py_ssize_t rows, n, cols;
    if (!PyArg_ParseTuple(args, "y*y*y*niw*", &x, &p, &s, &rows, &mode, &o)) return NULL;
    PyObject *ret = NULL;
    if (get_buffers(&x, &p, &s, &o, &n, rows, mode, &cols) == 0) {
        const uint32_t *xs = x.buf, *ps = p.buf;
        const float *sc = s.buf;
        uint32_t *out = o.buf;
        Py_BEGIN_ALLOW_THREADS
        FOR_EACH_PREDICTION({
            uint32_t d = ord32(xs[i]) - ord32(pr);
            out[i] = (d << 1) ^ (uint32_t)((int32_t)d >> 31);
        })
        Py_END_ALLOW_THREADS
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&p);
    PyBuffer_Release(&s);
    PyBuffer_Release(&o);
    return ret;
}

static PyObject *f32_delta_decode(PyObject *self, PyObject *args) {
    Py_buffer z, p, s, o;
    int mode;
    Py_ssize_t rows, n, cols;
    if (!PyArg_ParseTuple(args, "y*y*y*niw*", &z, &p, &s, &rows, &mode, &o)) return NULL;
    PyObject *ret = NULL;
    if (get_buffers(&z, &p, &s, &o, &n, rows, mode, &cols) == 0) {
        const uint32_t *zs = z.buf, *ps = p.buf;
        const float *sc = s.buf;
        uint32_t *out = o.buf;
        Py_BEGIN_ALLOW_THREADS
        FOR_EACH_PREDICTION({
            uint32_t d = (zs[i] >> 1) ^ (0u - (zs[i] & 1u));
            out[i] = ord32(ord32(pr) + d);
        })
        Py_END_ALLOW_THREADS
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&z);
    PyBuffer_Release(&p);
    PyBuffer_Release(&s);
    PyBuffer_Release(&o);
    return ret;
}

/* f32_delta_encode followed by split_planes in one pass: the residual words go straight into 4 byte planes
 * (4 separate buffers of n bytes: rows of one (4, n) array, or slices of them when a tensor is coded in spans on
 * several threads), saving a pass and a tensor-sized temporary. */
static PyObject *f32_delta_encode_planes(PyObject *self, PyObject *args) {
    Py_buffer x, p, s, q0, q1, q2, q3;
    int mode;
    Py_ssize_t rows, n, cols;
    if (!PyArg_ParseTuple(args, "y*y*y*niw*w*w*w*", &x, &p, &s, &rows, &mode, &q0, &q1, &q2, &q3)) return NULL;
    PyObject *ret = NULL;
    if (get_buffers(&x, &p, &s, &p, &n, rows, mode, &cols) == 0) {
        if (q0.len != n || q1.len != n || q2.len != n || q3.len != n) {
            PyErr_SetString(PyExc_ValueError, "f32_delta_encode_planes: planes must hold one byte per word");
        } else {
            const uint32_t *xs = x.buf, *ps = p.buf;
            const float *sc = s.buf;
            uint8_t *b0 = q0.buf, *b1 = q1.buf, *b2 = q2.buf, *b3 = q3.buf;
            Py_BEGIN_ALLOW_THREADS
            FOR_EACH_PREDICTION({
                uint32_t d = ord32(xs[i]) - ord32(pr);
                uint32_t z = (d << 1) ^ (uint32_t)((int32_t)d >> 31);
                b0[i] = (uint8_t)z; b1[i] = (uint8_t)(z >> 8); b2[i] = (uint8_t)(z >> 16); b3[i] = (uint8_t)(z >> 24);
            })
            Py_END_ALLOW_THREADS
            ret = Py_None;
            Py_INCREF(ret);
        }
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&p);
    PyBuffer_Release(&s);
    PyBuffer_Release(&q0);
    PyBuffer_Release(&q1);
    PyBuffer_Release(&q2);
    PyBuffer_Release(&q3);
    return ret;
}

/* The inverse of f32_delta_encode_planes: residual words read from 4 separate plane buffers (each n bytes: a
 * decompressed plane, or a raw one still inside the payload), decoded against the prediction into out. */
static PyObject *f32_delta_decode_planes(PyObject *self, PyObject *args) {
    Py_buffer q0, q1, q2, q3, p, s, o;
    int mode;
    Py_ssize_t rows, n, cols;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*niw*", &q0, &q1, &q2, &q3, &p, &s, &rows, &mode, &o)) return NULL;
    PyObject *ret = NULL;
    if (get_buffers(&p, &p, &s, &o, &n, rows, mode, &cols) == 0) {
        if (q0.len != n || q1.len != n || q2.len != n || q3.len != n) {
            PyErr_SetString(PyExc_ValueError, "f32_delta_decode_planes: planes must hold one byte per word");
        } else {
            const uint8_t *b0 = q0.buf, *b1 = q1.buf, *b2 = q2.buf, *b3 = q3.buf;
            const uint32_t *ps = p.buf;
            const float *sc = s.buf;
            uint32_t *out = o.buf;
            Py_BEGIN_ALLOW_THREADS
            FOR_EACH_PREDICTION({
                uint32_t z = (uint32_t)b0[i] | ((uint32_t)b1[i] << 8) | ((uint32_t)b2[i] << 16) |
                             ((uint32_t)b3[i] << 24);
                uint32_t d = (z >> 1) ^ (0u - (z & 1u));
                out[i] = ord32(ord32(pr) + d);
            })
            Py_END_ALLOW_THREADS
            ret = Py_None;
            Py_INCREF(ret);
        }
    }
    PyBuffer_Release(&q0);
    PyBuffer_Release(&q1);
    PyBuffer_Release(&q2);
    PyBuffer_Release(&q3);
    PyBuffer_Release(&p);
    PyBuffer_Release(&s);
    PyBuffer_Release(&o);
    return ret;
}

/* 4 separate plane buffers (n bytes each) -> n little-endian 4-byte words. */
static PyObject *join_planes4(PyObject *self, PyObject *args) {
    Py_buffer q0, q1, q2, q3, o;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*", &q0, &q1, &q2, &q3, &o)) return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n = q0.len;
    if (q1.len != n || q2.len != n || q3.len != n || o.len != 4 * n) {
        PyErr_SetString(PyExc_ValueError, "join_planes4: planes of unequal length or wrong output size");
    } else {
        const uint8_t *b0 = q0.buf, *b1 = q1.buf, *b2 = q2.buf, *b3 = q3.buf;
        uint32_t *out = o.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = (uint32_t)b0[i] | ((uint32_t)b1[i] << 8) | ((uint32_t)b2[i] << 16) | ((uint32_t)b3[i] << 24);
        Py_END_ALLOW_THREADS
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&q0);
    PyBuffer_Release(&q1);
    PyBuffer_Release(&q2);
    PyBuffer_Release(&q3);
    PyBuffer_Release(&o);
    return ret;
}

/* n little-endian 4-byte words -> 4 separate plane buffers (n bytes each): the inverse of join_planes4. */
static PyObject *split_planes4(PyObject *self, PyObject *args) {
    Py_buffer w, q0, q1, q2, q3;
    if (!PyArg_ParseTuple(args, "y*w*w*w*w*", &w, &q0, &q1, &q2, &q3)) return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n = q0.len;
    if (q1.len != n || q2.len != n || q3.len != n || w.len != 4 * n) {
        PyErr_SetString(PyExc_ValueError, "split_planes4: planes of unequal length or wrong input size");
    } else {
        const uint32_t *in = w.buf;
        uint8_t *b0 = q0.buf, *b1 = q1.buf, *b2 = q2.buf, *b3 = q3.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t z = in[i];
            b0[i] = (uint8_t)z; b1[i] = (uint8_t)(z >> 8); b2[i] = (uint8_t)(z >> 16); b3[i] = (uint8_t)(z >> 24);
        }
        Py_END_ALLOW_THREADS
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&w);
    PyBuffer_Release(&q0);
    PyBuffer_Release(&q1);
    PyBuffer_Release(&q2);
    PyBuffer_Release(&q3);
    return ret;
}

/* (n, k) bytes -> (k, n) planes, and back. */
static PyObject *planes(PyObject *self, PyObject *args, int split) {
    Py_buffer src, dst;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "y*nw*", &src, &k, &dst)) return NULL;
    PyObject *ret = NULL;
    if (k < 1 || k > 16 || src.len % k || dst.len != src.len) {
        PyErr_SetString(PyExc_ValueError, "planes: bad item size or buffer lengths");
    } else {
        Py_ssize_t n = src.len / k;
        const uint8_t *a = src.buf;
        uint8_t *b = dst.buf;
        Py_BEGIN_ALLOW_THREADS
        if (split) {
            if (k == 4) {
                uint8_t *b0 = b, *b1 = b + n, *b2 = b + 2 * n, *b3 = b + 3 * n;
                for (Py_ssize_t i = 0; i < n; i++) {
                    b0[i] = a[4 * i]; b1[i] = a[4 * i + 1]; b2[i] = a[4 * i + 2]; b3[i] = a[4 * i + 3];
                }
            } else {
                for (Py_ssize_t i = 0; i < n; i++)
                    for (Py_ssize_t j = 0; j < k; j++) b[j * n + i] = a[i * k + j];
            }
        } else {
            if (k == 4) {
                const uint8_t *a0 = a, *a1 = a + n, *a2 = a + 2 * n, *a3 = a + 3 * n;
                for (Py_ssize_t i = 0; i < n; i++) {
                    b[4 * i] = a0[i]; b[4 * i + 1] = a1[i]; b[4 * i + 2] = a2[i]; b[4 * i + 3] = a3[i];
                }
            } else {
                for (Py_ssize_t i = 0; i < n; i++)
                    for (Py_ssize_t j = 0; j < k; j++) b[i * k + j] = a[j * n + i];
            }
        }
        Py_END_ALLOW_THREADS
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return ret;
}

static PyObject *split_planes(PyObject *self, PyObject *args) { return planes(self, args, 1); }
static PyObject *join_planes(PyObject *self, PyObject *args) { return planes(self, args, 0); }


/* Per row of a (rows, cols) float32 matrix pair: sum(x*y) and sum(y*y) in double (the least-squares scale of
 * x ~ s*y is their quotient). Sequential double sums: they may differ from numpy's pairwise einsum in the last
 * bits, which only moves the chosen scale (stored exactly in the payload), never what a payload decodes to. */
static PyObject *f32_row_dots(PyObject *self, PyObject *args) {
    Py_buffer x, y, num, den;
    Py_ssize_t rows;
    if (!PyArg_ParseTuple(args, "y*y*nw*w*", &x, &y, &rows, &num, &den)) return NULL;
    PyObject *ret = NULL;
    if (x.len % 4 || y.len != x.len || rows <= 0 || (x.len / 4) % rows || num.len != rows * 8 ||
        den.len != rows * 8) {
        PyErr_SetString(PyExc_ValueError, "f32_row_dots: bad buffer lengths");
    } else {
        const float *xs = x.buf, *ys = y.buf;
        double *nu = num.buf, *de = den.buf;
        Py_ssize_t cols = (x.len / 4) / rows;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows; r++) {
            const float *a = xs + r * cols, *b = ys + r * cols;
            double s0 = 0, s1 = 0, s2 = 0, s3 = 0, t0 = 0, t1 = 0, t2 = 0, t3 = 0;
            Py_ssize_t i = 0;
            for (; i + 4 <= cols; i += 4) {
                double b0 = b[i], b1 = b[i + 1], b2 = b[i + 2], b3 = b[i + 3];
                s0 += (double)a[i] * b0; s1 += (double)a[i + 1] * b1;
                s2 += (double)a[i + 2] * b2; s3 += (double)a[i + 3] * b3;
                t0 += b0 * b0; t1 += b1 * b1; t2 += b2 * b2; t3 += b3 * b3;
            }
            for (; i < cols; i++) { s0 += (double)a[i] * b[i]; t0 += (double)b[i] * b[i]; }
            nu[r] = (s0 + s1) + (s2 + s3);
            de[r] = (t0 + t1) + (t2 + t3);
        }
        Py_END_ALLOW_THREADS
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    PyBuffer_Release(&num);
    PyBuffer_Release(&den);
    return ret;
}

/* Byte histogram of each byte position (plane) of k-byte words, over every `step`-th word: counts[j*256 + b]. */
static PyObject *plane_histogram(PyObject *self, PyObject *args) {
    Py_buffer src, counts;
    Py_ssize_t k, step;
    if (!PyArg_ParseTuple(args, "y*nnw*", &src, &k, &step, &counts)) return NULL;
    PyObject *ret = NULL;
    if (k < 1 || k > 16 || step < 1 || src.len % k || counts.len != k * 256 * 8) {
        PyErr_SetString(PyExc_ValueError, "plane_histogram: bad item size, step or buffer lengths");
    } else {
        const uint8_t *a = src.buf;
        int64_t *c = counts.buf;
        Py_ssize_t n = src.len / k;
        Py_BEGIN_ALLOW_THREADS
        memset(c, 0, (size_t)(k * 256 * 8));
        for (Py_ssize_t i = 0; i < n; i += step)
            for (Py_ssize_t j = 0; j < k; j++) c[j * 256 + a[i * k + j]]++;
        Py_END_ALLOW_THREADS
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&counts);
    return ret;
}

/* copy_many([(dst, src), ...]): memcpy of each pair, all under one release of the GIL. An async save's snapshot
 * copies hundreds of arrays: one np.copyto each would take the GIL back after every array, and a copy thread
 * waiting for it while the training thread runs Python waits up to the interpreter's switch interval (5 ms). */
static PyObject *copy_many(PyObject *self, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "copy_many: expected a sequence of (dst, src) pairs");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), got = 0;
    Py_buffer *bufs = PyMem_Calloc(n > 0 ? 2 * (size_t)n : 1, sizeof(Py_buffer));
    PyObject *ret = NULL;
    if (bufs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < n; got++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, got);
        PyObject *dst, *src;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "copy_many: each item must be a (dst, src) tuple");
            goto done;
        }
        dst = PyTuple_GET_ITEM(pair, 0);
        src = PyTuple_GET_ITEM(pair, 1);
        if (PyObject_GetBuffer(dst, &bufs[2 * got], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto done;
        if (PyObject_GetBuffer(src, &bufs[2 * got + 1], PyBUF_C_CONTIGUOUS) < 0) {
            PyBuffer_Release(&bufs[2 * got]);
            goto done;
        }
        if (bufs[2 * got].len != bufs[2 * got + 1].len) {
            PyErr_SetString(PyExc_ValueError, "copy_many: dst and src differ in length");
            PyBuffer_Release(&bufs[2 * got]);
            PyBuffer_Release(&bufs[2 * got + 1]);
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) memcpy(bufs[2 * i].buf, bufs[2 * i + 1].buf, (size_t)bufs[2 * i].len);
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    if (bufs != NULL) {
        for (Py_ssize_t i = 0; i < got; i++) {
            PyBuffer_Release(&bufs[2 * i]);
            PyBuffer_Release(&bufs[2 * i + 1]);
        }
        PyMem_Free(bufs);
    }
    Py_DECREF(seq);
    return ret;
}

/* ---- whole-payload decoding of many tensors in one call (codecs/native.py) ----
 *
 * A checkpoint holds hundreds of coded tensors under 4 MB. Through the Python codec chain each took 57-107 us alone
 * on one thread, against 37-66 us for the same decode here (the rest is Python, serial on the GIL); a batch is
 * decoded start to finish under one release of the GIL: the planes-zstd header parsed, each plane decompressed
 * (or taken raw, or filled with its constant), the planes joined or the delta undone. Anything this does not
 * handle, or finds malformed, is reported per item and decoded by the Python path instead, which raises the
 * error the user sees: this loop is an accelerator of the reference decoder, never a second judge of the bytes.
 *
 * zstd is the zstandard package's own library, bound at import through its cffi module (bind_zstd): no second
 * copy of zstd, no headers needed to build. */
typedef size_t (*zstd_decompress_fn)(void *, void *, size_t, const void *, size_t);
typedef unsigned long long (*zstd_content_size_fn)(const void *, size_t);
typedef unsigned (*zstd_is_error_fn)(size_t);
typedef void *(*zstd_create_fn)(void);
typedef size_t (*zstd_free_fn)(void *);
static zstd_decompress_fn z_decompress;
static zstd_content_size_fn z_content_size;
static zstd_is_error_fn z_is_error;
static zstd_create_fn z_create;
static zstd_free_fn z_free;

/* A zstd context and a scratch buffer for the planes of one tensor: kept between calls in a small pool (loads
 * run on short-lived pool threads, so per-thread state would be made again, and its pages faulted in again, for
 * every checkpoint). */
struct decode_state {
    void *dctx;
    uint8_t *scratch;
    size_t cap;
};
#define KEPT_STATES 8
static struct decode_state *kept_states[KEPT_STATES];
static int kept_count;
static pthread_mutex_t kept_lock = PTHREAD_MUTEX_INITIALIZER;

static void state_free(struct decode_state *t) {
    if (t == NULL) return;
    if (t->dctx != NULL) z_free(t->dctx);
    free(t->scratch);
    free(t);
}

static struct decode_state *state_take(void) {
    struct decode_state *t = NULL;
    pthread_mutex_lock(&kept_lock);
    if (kept_count > 0) t = kept_states[--kept_count];
    pthread_mutex_unlock(&kept_lock);
    if (t == NULL) t = calloc(1, sizeof *t);
    return t;
}

static void state_give(struct decode_state *t) {
    if (t == NULL) return;
    pthread_mutex_lock(&kept_lock);
    if (kept_count < KEPT_STATES) {
        kept_states[kept_count++] = t;
        t = NULL;
    }
    pthread_mutex_unlock(&kept_lock);
    state_free(t);
}

/* The state's zstd context made and its scratch at least this large; 0 when memory is short. */
static int state_ready(struct decode_state *t, size_t scratch) {
    if (t == NULL) return 0;
    if (t->dctx == NULL && (t->dctx = z_create()) == NULL) return 0;
    if (t->cap < scratch) {
        uint8_t *b = realloc(t->scratch, scratch);
        if (b == NULL) return 0;
        t->scratch = b;
        t->cap = scratch;
    }
    return 1;
}

static PyObject *bind_zstd(PyObject *self, PyObject *args) {
    unsigned long long a, b, c, d, e;
    if (!PyArg_ParseTuple(args, "KKKKK", &a, &b, &c, &d, &e)) return NULL;
    if (!a || !b || !c || !d || !e) {
        PyErr_SetString(PyExc_ValueError, "bind_zstd: null function address");
        return NULL;
    }
    z_decompress = (zstd_decompress_fn)(uintptr_t)a;
    z_content_size = (zstd_content_size_fn)(uintptr_t)b;
    z_is_error = (zstd_is_error_fn)(uintptr_t)c;
    z_create = (zstd_create_fn)(uintptr_t)d;
    z_free = (zstd_free_fn)(uintptr_t)e;
    Py_RETURN_NONE;
}

static inline uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

struct decode_item {
    const uint8_t *payload;
    size_t length;
    int k;
    uint8_t *out;
    size_t nbytes;
    const uint32_t *prev; /* NULL: a keyframe */
    const float *scales;
    Py_ssize_t nscales, rows;
    int mode;
};

/* One planes-zstd payload into item->out; 0 on success, 1 when the Python path must decode it. */
static int decode_item(const struct decode_item *it, struct decode_state *t) {
    const Py_ssize_t k = it->k, n = (Py_ssize_t)(it->nbytes / (size_t)k);
    const uint8_t *p = it->payload, *planes[8];
    size_t pos = 1 + 9 * (size_t)k;
    if (n == 0 || it->nbytes % (size_t)k || it->length < pos || p[0] != k) return 1;
    if (!state_ready(t, (size_t)k * (size_t)n)) return 1;
    for (Py_ssize_t i = 0; i < k; i++) {
        const uint8_t method = p[1 + 9 * i];
        const uint64_t value = le64(p + 2 + 9 * i);
        uint8_t *plane = t->scratch + (size_t)i * (size_t)n;
        if (method == 0 || method == 1) { /* raw, zstd: value is the data's length */
            if (value > it->length - pos) return 1;
            if (method == 0) {
                if (value != (uint64_t)n) return 1;
                planes[i] = p + pos;
            } else {
                if (z_content_size(p + pos, (size_t)value) != (unsigned long long)n) return 1;
                size_t got = z_decompress(t->dctx, plane, (size_t)n, p + pos, (size_t)value);
                if (z_is_error(got) || got != (size_t)n) return 1;
                planes[i] = plane;
            }
            pos += (size_t)value;
        } else if (method == 2) { /* constant */
            if (value > 255) return 1;
            memset(plane, (int)value, (size_t)n);
            planes[i] = plane;
        } else {
            return 1; /* chunked planes (large tensors) have their own parallel path */
        }
    }
    if (it->prev != NULL) {
        Py_ssize_t cols = 1;
        const int mode = it->mode;
        if (k != 4 || mode < 0 || mode > 2 || (mode == 1 && it->nscales < 1)) return 1;
        if (mode == 2) {
            if (it->rows <= 0 || it->nscales != it->rows || n % it->rows) return 1;
            cols = n / it->rows;
        }
        const uint8_t *b0 = planes[0], *b1 = planes[1], *b2 = planes[2], *b3 = planes[3];
        const uint32_t *ps = it->prev;
        const float *sc = it->scales;
        uint32_t *out = (uint32_t *)it->out;
        FOR_EACH_PREDICTION({
            uint32_t z = (uint32_t)b0[i] | ((uint32_t)b1[i] << 8) | ((uint32_t)b2[i] << 16) | ((uint32_t)b3[i] << 24);
            uint32_t d = (z >> 1) ^ (0u - (z & 1u));
            out[i] = ord32(ord32(pr) + d);
        })
    } else if (k == 1) {
        memcpy(it->out, planes[0], (size_t)n);
    } else if (k == 2) {
        uint16_t *out = (uint16_t *)it->out;
        for (Py_ssize_t i = 0; i < n; i++) out[i] = (uint16_t)(planes[0][i] | (planes[1][i] << 8));
    } else if (k == 4) {
        const uint8_t *b0 = planes[0], *b1 = planes[1], *b2 = planes[2], *b3 = planes[3];
        uint32_t *out = (uint32_t *)it->out;
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = (uint32_t)b0[i] | ((uint32_t)b1[i] << 8) | ((uint32_t)b2[i] << 16) | ((uint32_t)b3[i] << 24);
    } else {
        for (Py_ssize_t i = 0; i < n; i++)
            for (Py_ssize_t j = 0; j < k; j++) it->out[i * k + j] = planes[j][i];
    }
    return 0;
}

/* decode_many([(payload, k, out, prev or None, scales, rows, mode), ...]) -> bytes, one per item: 0 decoded,
 * 1 left for the Python path. All buffers are taken first (with the GIL), then every item decodes without it. */
static PyObject *decode_many(PyObject *self, PyObject *arg) {
    if (z_decompress == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "decode_many: zstd is not bound (bind_zstd)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(arg, "decode_many: expected a sequence of items");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), got = 0;
    Py_buffer *bufs = PyMem_Calloc(n > 0 ? 4 * (size_t)n : 1, sizeof(Py_buffer));
    struct decode_item *items = PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(struct decode_item));
    PyObject *ret = NULL;
    if (bufs == NULL || items == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < n; got++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, got), *payload, *out, *prev, *scales;
        struct decode_item *it = &items[got];
        Py_buffer *b = &bufs[4 * got];
        if (!PyArg_ParseTuple(item, "OiOOOni;decode_many: bad item", &payload, &it->k, &out, &prev, &scales,
                              &it->rows, &it->mode))
            goto done;
        if (it->k != 1 && it->k != 2 && it->k != 4 && it->k != 8) {
            PyErr_SetString(PyExc_ValueError, "decode_many: word size must be 1, 2, 4 or 8");
            goto done;
        }
        if (PyObject_GetBuffer(payload, &b[0], PyBUF_SIMPLE) < 0) goto done;
        if (PyObject_GetBuffer(out, &b[1], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto release0;
        if (PyObject_GetBuffer(scales, &b[3], PyBUF_C_CONTIGUOUS) < 0) goto release1;
        if (prev != Py_None) {
            if (PyObject_GetBuffer(prev, &b[2], PyBUF_C_CONTIGUOUS) < 0) goto release3;
            if (b[2].len != b[1].len) {
                PyErr_SetString(PyExc_ValueError, "decode_many: prev and out differ in length");
                PyBuffer_Release(&b[2]);
                goto release3;
            }
            it->prev = b[2].buf;
        }
        if (b[3].len % 4) {
            PyErr_SetString(PyExc_ValueError, "decode_many: scales must be float32");
            if (it->prev != NULL) PyBuffer_Release(&b[2]);
            goto release3;
        }
        it->payload = b[0].buf;
        it->length = (size_t)b[0].len;
        it->out = b[1].buf;
        it->nbytes = (size_t)b[1].len;
        it->scales = b[3].buf;
        it->nscales = b[3].len / 4;
        continue;
    release3:
        PyBuffer_Release(&b[3]);
    release1:
        PyBuffer_Release(&b[1]);
    release0:
        PyBuffer_Release(&b[0]);
        goto done;
    }
    ret = PyBytes_FromStringAndSize(NULL, n);
    if (ret == NULL) goto done;
    char *status = PyBytes_AS_STRING(ret);
    Py_BEGIN_ALLOW_THREADS
    struct decode_state *state = state_take();
    for (Py_ssize_t i = 0; i < n; i++) status[i] = (char)decode_item(&items[i], state);
    state_give(state);
    Py_END_ALLOW_THREADS
done:
    if (bufs != NULL) {
        for (Py_ssize_t i = 0; i < got; i++) {
            PyBuffer_Release(&bufs[4 * i]);
            PyBuffer_Release(&bufs[4 * i + 1]);
            if (items[i].prev != NULL) PyBuffer_Release(&bufs[4 * i + 2]);
            PyBuffer_Release(&bufs[4 * i + 3]);
        }
        PyMem_Free(bufs);
    }
    PyMem_Free(items);
    Py_DECREF(seq);
    return ret;
}

static PyMethodDef methods[] = {
    {"f32_delta_encode", f32_delta_encode, METH_VARARGS,
     "f32_delta_encode(x, prev, scales, rows, mode, out): zigzag(ord(x) - ord(pred(prev))) into out"},
    {"f32_delta_decode", f32_delta_decode, METH_VARARGS,
     "f32_delta_decode(z, prev, scales, rows, mode, out): inverse of f32_delta_encode"},
    {"f32_delta_encode_planes", f32_delta_encode_planes, METH_VARARGS,
     "f32_delta_encode_planes(x, prev, scales, rows, mode, p0, p1, p2, p3): f32_delta_encode into 4 byte planes"},
    {"f32_delta_decode_planes", f32_delta_decode_planes, METH_VARARGS,
     "f32_delta_decode_planes(p0, p1, p2, p3, prev, scales, rows, mode, out): inverse of f32_delta_encode_planes"},
    {"join_planes4", join_planes4, METH_VARARGS, "join_planes4(p0, p1, p2, p3, out): 4 byte planes -> words"},
    {"split_planes4", split_planes4, METH_VARARGS, "split_planes4(words, p0, p1, p2, p3): words -> 4 byte planes"},
    {"f32_row_dots", f32_row_dots, METH_VARARGS,
     "f32_row_dots(x, y, rows, num, den): per row sum(x*y) and sum(y*y) of float32 matrices, in double"},
    {"plane_histogram", plane_histogram, METH_VARARGS,
     "plane_histogram(src, itemsize, step, counts): byte counts per plane over every step-th word"},
    {"split_planes", split_planes, METH_VARARGS, "split_planes(src, itemsize, dst): words -> byte planes"},
    {"join_planes", join_planes, METH_VARARGS, "join_planes(src, itemsize, dst): byte planes -> words"},
    {"copy_many", copy_many, METH_O, "copy_many([(dst, src), ...]): copy each src into dst (equal lengths)"},
    {"bind_zstd", bind_zstd, METH_VARARGS,
     "bind_zstd(decompressDCtx, getFrameContentSize, isError, createDCtx, freeDCtx): zstd's C functions"},
    {"decode_many", decode_many, METH_O,
     "decode_many([(payload, k, out, prev, scales, rows, mode), ...]) -> bytes: 0 decoded, 1 left to Python"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused codec loops (see delta.py).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
