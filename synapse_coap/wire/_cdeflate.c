/* The body codec's DEFLATE with a preset dictionary, without zlib's allocations.
 *
 * Part of the native build (synapse_coap/native.py, built by `synapse-coap
 * build-native`); used by synapse_coap/wire/deflate.py (_deflate) for the profile
 * dictionaries, where the Python path copies a compressor primed with the dictionary
 * (zlib's compressobj().copy()) for every body.
 *
 * Same library, same calls, same bytes: a compressor is primed once per (dictionary,
 * window bits, memLevel) with deflateInit2 + deflateSetDictionary, and each body is
 * compressed by a deflateCopy of it, run to Z_FINISH. What differs is where the copy
 * lives. Through Python's zlib module every copy mallocs zlib's five buffers (some
 * 40 KB at the codec's sizes, in five allocations), and every compress() and flush()
 * allocates a 32 KB output buffer: in the homeserver, answers' DEFLATE cost several
 * times its cost in a loop (bench/inbound.py, an A/B with the DEFLATE results
 * memoised). Here the copy's buffers are carved from one arena, the same memory for
 * every body (no allocation, and memory the CPU's caches have seen at the last body),
 * and the output goes to a buffer on the stack for a small body.
 *
 * The arena is used only while a copy is being made and compressed, with the GIL held
 * throughout (nothing here releases it), so one arena serves every thread. zlib asks
 * the allocator for the copy's buffers inside deflateCopy (which copies the primed
 * stream's allocator functions with the stream): the allocator hands out arena memory
 * while `copying` is set, and the free function ignores pointers into the arena.
 *
 * Beside it: inflate_dict, the decoder's inflate through one kept stream (see there),
 * and cannot_shrink, deflate.py's proof that a short body's DEFLATE cannot win, without
 * Python objects.
 *
 * Tests: tests/unit/test_cdeflate.py (the same bytes as zlib's module on the corpora,
 * hypothesis properties, the arena's growth, the bound on primed compressors; inflate's
 * output and verdicts against zlib's module; cannot_shrink against the reference).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <zlib.h>

#define MAX_PRIMED 16
#define ALIGN 64
#define SMALL_OUT 4096

typedef struct {
    PyObject *zdict; /* bytes, a strong reference */
    int wbits;
    int mem_level;
    z_stream strm;
} Primed;

static Primed primed[MAX_PRIMED];
static int n_primed = 0;

static unsigned char *arena = NULL;
static size_t arena_cap = 0;
static size_t arena_used = 0;
static int copying = 0;

static voidpf
zalloc_fn(voidpf opaque, uInt items, uInt size)
{
    (void)opaque;
    size_t n = ((size_t)items * size + (ALIGN - 1)) & ~((size_t)ALIGN - 1);
    if (copying && arena != NULL && arena_used + n <= arena_cap) {
        voidpf p = arena + arena_used;
        arena_used += n;
        return p;
    }
    return PyMem_RawMalloc(n);
}

static void
zfree_fn(voidpf opaque, voidpf p)
{
    (void)opaque;
    uintptr_t at = (uintptr_t)p, base = (uintptr_t)arena;
    if (arena != NULL && at >= base && at < base + arena_cap)
        return;
    PyMem_RawFree(p);
}

/* What a copy at (wbits, mem_level) takes from the arena: zlib's state (under 8 KB in
 * every zlib since 1.2), the window (2 x 2**wbits), prev (2**wbits Pos), head
 * (2**(memLevel+7) Pos) and the pending buffer (2**(memLevel+6) x 4), each aligned. */
static size_t
arena_need(int wbits, int mem_level)
{
    size_t w = (size_t)1 << wbits;
    return 16384 + 2 * w + 2 * w + ((size_t)2 << (mem_level + 7)) +
           ((size_t)4 << (mem_level + 6)) + 8 * ALIGN;
}

static void
clear_primed(void)
{
    for (int i = 0; i < n_primed; i++) {
        deflateEnd(&primed[i].strm);
        Py_CLEAR(primed[i].zdict);
    }
    n_primed = 0;
}

/* a and b (bytes) hold the same bytes: a kept dictionary found again, also when it
 * comes in another object */
static int
same_bytes(PyObject *a, PyObject *b)
{
    return a == b || (PyBytes_GET_SIZE(a) == PyBytes_GET_SIZE(b) &&
                      memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b),
                             (size_t)PyBytes_GET_SIZE(a)) == 0);
}

static Primed *
get_primed(PyObject *zdict, int wbits, int mem_level)
{
    for (int i = 0; i < n_primed; i++) {
        Primed *p = &primed[i];
        if (p->wbits == wbits && p->mem_level == mem_level && same_bytes(p->zdict, zdict))
            return p;
    }
    if (n_primed >= MAX_PRIMED)
        clear_primed();
    Primed *p = &primed[n_primed];
    memset(&p->strm, 0, sizeof(p->strm));
    p->strm.zalloc = zalloc_fn;
    p->strm.zfree = zfree_fn;
    p->strm.opaque = Z_NULL;
    int err = deflateInit2(&p->strm, 9, Z_DEFLATED, -wbits, mem_level, Z_DEFAULT_STRATEGY);
    if (err != Z_OK) {
        PyErr_Format(PyExc_ValueError, "deflateInit2 failed (%d)", err);
        return NULL;
    }
    err = deflateSetDictionary(&p->strm, (const Bytef *)PyBytes_AS_STRING(zdict),
                               (uInt)PyBytes_GET_SIZE(zdict));
    if (err != Z_OK) {
        deflateEnd(&p->strm);
        PyErr_Format(PyExc_ValueError, "deflateSetDictionary failed (%d)", err);
        return NULL;
    }
    Py_INCREF(zdict);
    p->zdict = zdict;
    p->wbits = wbits;
    p->mem_level = mem_level;
    n_primed++;
    return p;
}

/* deflate_dict(data, zdict, wbits, mem_level) -> bytes: raw DEFLATE (level 9) of data
 * with the preset dictionary zdict, window 2**wbits, memLevel mem_level */
static PyObject *
deflate_dict(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data;
    PyObject *zdict;
    int wbits, mem_level;
    if (!PyArg_ParseTuple(args, "y*O!ii", &data, &PyBytes_Type, &zdict, &wbits, &mem_level))
        return NULL;
    PyObject *result = NULL;
    if (wbits < 9 || wbits > 15 || mem_level < 1 || mem_level > 9 ||
        PyBytes_GET_SIZE(zdict) == 0 || data.len > (Py_ssize_t)0x7fffffff) {
        PyErr_SetString(PyExc_ValueError, "deflate_dict: window bits 9-15, memLevel 1-9, "
                                          "a dictionary and under 2 GiB of data");
        goto out;
    }
    Primed *p = get_primed(zdict, wbits, mem_level);
    if (p == NULL)
        goto out;
    size_t need = arena_need(wbits, mem_level);
    if (need > arena_cap) {
        unsigned char *grown = PyMem_RawMalloc(need);
        if (grown == NULL) {
            PyErr_NoMemory();
            goto out;
        }
        PyMem_RawFree(arena);
        arena = grown;
        arena_cap = need;
    }
    z_stream work;
    arena_used = 0;
    copying = 1;
    int err = deflateCopy(&work, &p->strm);
    copying = 0;
    if (err != Z_OK) {
        PyErr_Format(PyExc_MemoryError, "deflateCopy failed (%d)", err);
        goto out;
    }
    uLong bound = deflateBound(&work, (uLong)data.len);
    unsigned char small[SMALL_OUT];
    unsigned char *outbuf = small;
    if (bound > SMALL_OUT) {
        result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)bound);
        if (result == NULL) {
            deflateEnd(&work);
            goto out;
        }
        outbuf = (unsigned char *)PyBytes_AS_STRING(result);
    }
    work.next_in = (Bytef *)data.buf;
    work.avail_in = (uInt)data.len;
    work.next_out = outbuf;
    work.avail_out = (uInt)bound;
    err = deflate(&work, Z_FINISH);
    Py_ssize_t produced = (Py_ssize_t)(work.next_out - outbuf);
    deflateEnd(&work);
    if (err != Z_STREAM_END) {
        Py_CLEAR(result);
        PyErr_Format(PyExc_ValueError, "deflate did not finish (%d)", err);
        goto out;
    }
    if (result == NULL)
        result = PyBytes_FromStringAndSize((const char *)outbuf, produced);
    else
        _PyBytes_Resize(&result, produced);
out:
    PyBuffer_Release(&data);
    return result;
}

/* The inflater: one raw stream kept for every body (inflateReset and, with a dictionary,
 * inflateSetDictionary per body), so zlib's state and 32 KB window are allocated once,
 * where a decompressobj per body mallocs and frees both (and a Python object) every
 * time. Used with the GIL held throughout, like the arena. */
static z_stream inflater;
static int inflater_ready = 0;

/* zlib's module's words for an error (Modules/zlibmodule.c, zlib_error) */
static void
inflate_error(int err)
{
    const char *msg = inflater.msg;
    if (msg == NULL) {
        if (err == Z_BUF_ERROR)
            msg = "incomplete or truncated stream";
        else if (err == Z_STREAM_ERROR)
            msg = "inconsistent stream state";
        else if (err == Z_DATA_ERROR)
            msg = "invalid input data";
        else
            msg = "library error";
    }
    PyErr_Format(PyExc_ValueError, "Error %d while decompressing data: %.200s", err, msg);
}

/* inflate_dict(data, zdict, max_length) -> (bytes, ended, unused): what
 * zlib.decompressobj(-15, zdict=zdict).decompress(data, max_length) returns, whether the
 * stream ended (the object's eof) and how many input bytes followed its end (the length
 * of its unused_data); ValueError where that call raises zlib.error. */
static PyObject *
inflate_dict(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data;
    PyObject *zdict;
    Py_ssize_t max_length;
    if (!PyArg_ParseTuple(args, "y*O!n", &data, &PyBytes_Type, &zdict, &max_length))
        return NULL;
    PyObject *out = NULL, *result = NULL;
    if (max_length < 1 || max_length > (Py_ssize_t)0x7fffffff ||
        data.len > (Py_ssize_t)0x7fffffff) {
        PyErr_SetString(PyExc_ValueError, "inflate_dict: max_length 1 to 2 GiB, under 2 GiB "
                                          "of data");
        goto done;
    }
    int err;
    if (!inflater_ready) {
        memset(&inflater, 0, sizeof(inflater));
        inflater.zalloc = Z_NULL;
        inflater.zfree = Z_NULL;
        err = inflateInit2(&inflater, -15);
        if (err != Z_OK) {
            PyErr_Format(PyExc_MemoryError, "inflateInit2 failed (%d)", err);
            goto done;
        }
        inflater_ready = 1;
    } else if ((err = inflateReset(&inflater)) != Z_OK) {
        inflate_error(err);
        goto done;
    }
    if (PyBytes_GET_SIZE(zdict) > 0) {
        err = inflateSetDictionary(&inflater, (const Bytef *)PyBytes_AS_STRING(zdict),
                                   (uInt)PyBytes_GET_SIZE(zdict));
        if (err != Z_OK) {
            inflate_error(err);
            goto done;
        }
    }
    /* (room for 4x the input at first, as a small body's CBOR takes; grown as needed) */
    Py_ssize_t cap = data.len * 4 + 256;
    if (cap > max_length)
        cap = max_length;
    out = PyBytes_FromStringAndSize(NULL, cap);
    if (out == NULL)
        goto done;
    Py_ssize_t produced = 0;
    int ended = 0;
    inflater.next_in = (Bytef *)data.buf;
    inflater.avail_in = (uInt)data.len;
    for (;;) {
        if (produced == cap) {
            if (cap == max_length)
                break; /* max_length reached: the rest stays unread, as zlib's module */
            Py_ssize_t grown = cap * 2 < max_length ? cap * 2 : max_length;
            if (_PyBytes_Resize(&out, grown) < 0)
                goto done;
            cap = grown;
        }
        inflater.next_out = (Bytef *)PyBytes_AS_STRING(out) + produced;
        inflater.avail_out = (uInt)(cap - produced);
        err = inflate(&inflater, Z_SYNC_FLUSH);
        produced = cap - (Py_ssize_t)inflater.avail_out;
        if (err == Z_STREAM_END) {
            ended = 1;
            break;
        }
        if (err == Z_BUF_ERROR && inflater.avail_out > 0)
            break; /* the input ran out before the stream's end */
        if (err != Z_OK && err != Z_BUF_ERROR) {
            inflate_error(err);
            goto done;
        }
        if (inflater.avail_in == 0 && inflater.avail_out > 0)
            break;
    }
    if (_PyBytes_Resize(&out, produced) < 0)
        goto done;
    result = Py_BuildValue("(Oin)", out, ended, ended ? (Py_ssize_t)inflater.avail_in : 0);
done:
    Py_XDECREF(out);
    PyBuffer_Release(&data);
    return result;
}

/* cannot_shrink(data, zdict) -> bool: synapse_coap/wire/deflate.py's
 * python_cannot_shrink (the reference, and the proof in its docstring), in one pass
 * without Python objects: the dictionary's 3-byte sequences in an open-addressing table
 * built once per dictionary (a few profile dictionaries, bounded like the primed
 * compressors), the body's counts on the stack. tests/unit/test_cdeflate.py holds it to
 * the reference. */
#define SHRINK_MAX 64
#define TRI_SLOTS 16384 /* a power of two, over twice a profile dictionary's sequences */
#define MAX_TRI_TABLES 8

typedef struct {
    PyObject *zdict; /* bytes, a strong reference */
    uint32_t *slots; /* sequence + 1, 0 = empty; NULL: too many sequences for the table */
} TriTable;

static TriTable tri_tables[MAX_TRI_TABLES];
static int n_tri_tables = 0;

static inline uint32_t
tri_hash(uint32_t t)
{
    return (t * 2654435761u) >> 18; /* 14 bits: TRI_SLOTS */
}

static void
clear_tri_tables(void)
{
    for (int i = 0; i < n_tri_tables; i++) {
        PyMem_RawFree(tri_tables[i].slots);
        Py_CLEAR(tri_tables[i].zdict);
    }
    n_tri_tables = 0;
}

/* the table of zdict's sequences (its slots NULL when the dictionary has more than the
 * table holds: then cannot_shrink answers False, proving nothing) */
static TriTable *
get_tri_table(PyObject *zdict)
{
    for (int i = 0; i < n_tri_tables; i++) {
        if (same_bytes(tri_tables[i].zdict, zdict))
            return &tri_tables[i];
    }
    if (n_tri_tables >= MAX_TRI_TABLES)
        clear_tri_tables();
    TriTable *t = &tri_tables[n_tri_tables];
    const unsigned char *z = (const unsigned char *)PyBytes_AS_STRING(zdict);
    Py_ssize_t zn = PyBytes_GET_SIZE(zdict);
    t->slots = NULL;
    if (zn - 2 <= TRI_SLOTS / 2) {
        t->slots = PyMem_RawCalloc(TRI_SLOTS, sizeof(uint32_t));
        if (t->slots == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        for (Py_ssize_t i = 0; i + 2 < zn; i++) {
            uint32_t v = ((uint32_t)z[i] << 16 | (uint32_t)z[i + 1] << 8 | z[i + 2]) + 1;
            uint32_t h = tri_hash(v - 1);
            while (t->slots[h] != 0 && t->slots[h] != v)
                h = (h + 1) & (TRI_SLOTS - 1);
            t->slots[h] = v;
        }
    }
    Py_INCREF(zdict);
    t->zdict = zdict;
    n_tri_tables++;
    return t;
}

static int
tri_known(const TriTable *t, uint32_t seq)
{
    uint32_t v = seq + 1, h = tri_hash(seq);
    while (t->slots[h] != 0) {
        if (t->slots[h] == v)
            return 1;
        h = (h + 1) & (TRI_SLOTS - 1);
    }
    return 0;
}

/* the bits of counts[0..n) under Huffman's code (deflate.py's _huffman_bits) */
static long
huffman_bits(long *counts, int n)
{
    if (n == 1)
        return counts[0];
    for (int i = 1; i < n; i++) { /* insertion sort: at most 65 counts */
        long c = counts[i];
        int j = i - 1;
        while (j >= 0 && counts[j] > c) {
            counts[j + 1] = counts[j];
            j--;
        }
        counts[j + 1] = c;
    }
    long merged[SHRINK_MAX + 1];
    int i = 0, j = 0, m = 0;
    long total = 0;
    for (int k = 0; k < n - 1; k++) {
        long pair = 0;
        for (int two = 0; two < 2; two++) {
            if (j >= m || (i < n && counts[i] <= merged[j]))
                pair += counts[i++];
            else
                pair += merged[j++];
        }
        merged[m++] = pair;
        total += pair;
    }
    return total;
}

static PyObject *
cannot_shrink(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *data, *zdict;
    if (!PyArg_ParseTuple(args, "O!O!", &PyBytes_Type, &data, &PyBytes_Type, &zdict))
        return NULL;
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (n < 0 || n > SHRINK_MAX)
        Py_RETURN_FALSE;
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(data);
    const unsigned char *z = (const unsigned char *)PyBytes_AS_STRING(zdict);
    Py_ssize_t zn = PyBytes_GET_SIZE(zdict);
    const TriTable *table = NULL;
    if (zn > 0) {
        table = get_tri_table(zdict);
        if (table == NULL)
            return NULL;
        if (table->slots == NULL)
            Py_RETURN_FALSE;
    }
    /* the dictionary's last two bytes, then the body */
    unsigned char history[SHRINK_MAX + 2];
    Py_ssize_t tail = zn >= 2 ? 2 : (zn > 0 ? zn : 0);
    memcpy(history, z + zn - tail, (size_t)tail);
    memcpy(history + tail, d, (size_t)n);
    Py_ssize_t hn = tail + n, first = tail;
    uint32_t seqs[SHRINK_MAX + 2];
    unsigned char coverable[SHRINK_MAX];
    memset(coverable, 0, sizeof(coverable));
    long runs = 0;
    int in_run = 0;
    for (Py_ssize_t i = 0; i + 2 < hn; i++) {
        uint32_t t = (uint32_t)history[i] << 16 | (uint32_t)history[i + 1] << 8 | history[i + 2];
        seqs[i] = t;
        if (i < first)
            continue;
        int known = table != NULL && tri_known(table, t);
        for (Py_ssize_t k = 0; !known && k < i; k++)
            known = seqs[k] == t;
        Py_ssize_t at = i - first;
        if (known) {
            if (!in_run) {
                runs++;
                in_run = 1;
            }
            coverable[at] = coverable[at + 1] = coverable[at + 2] = 1;
        } else {
            in_run = 0;
        }
    }
    long count_of[256];
    memset(count_of, 0, sizeof(count_of));
    long fixed = 3 + 7 + 12 * runs;
    for (Py_ssize_t at = 0; at < n; at++) {
        if (!coverable[at]) {
            count_of[d[at]]++;
            fixed += d[at] < 144 ? 8 : 9;
        }
    }
    long counts[SHRINK_MAX + 1];
    int used = 0;
    long half = 0;
    int previous = -1;
    for (int symbol = 0; symbol <= 256; symbol++) {
        long c = symbol == 256 ? 1 : count_of[symbol];
        if (c == 0)
            continue;
        counts[used++] = c;
        long gap = symbol - previous - 1;
        if (previous < 0)
            half += 2 + (gap < 8 ? gap : 8);
        else
            half += gap + 1 < 10 ? gap + 1 : 10;
        previous = symbol;
    }
    long dynamic_half = 2 * (29 + huffman_bits(counts, used) + 2 * runs) + half;
    long least = 35 + 8 * (long)n;
    if (fixed < least)
        least = fixed;
    if ((dynamic_half + 1) / 2 < least)
        least = (dynamic_half + 1) / 2;
    return PyBool_FromLong((least + 7) / 8 + 1 >= (long)n);
}

static PyObject *
arena_size(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(nn)", (Py_ssize_t)arena_cap, (Py_ssize_t)n_primed);
}

static PyObject *
forget(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    clear_primed();
    clear_tri_tables();
    if (inflater_ready) {
        inflateEnd(&inflater);
        inflater_ready = 0;
    }
    PyMem_RawFree(arena);
    arena = NULL;
    arena_cap = 0;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"deflate_dict", deflate_dict, METH_VARARGS,
     "deflate_dict(data, zdict, wbits, mem_level) -> bytes: raw DEFLATE, level 9, of data "
     "with the preset dictionary zdict (zlib's bytes, without its allocations)"},
    {"inflate_dict", inflate_dict, METH_VARARGS,
     "inflate_dict(data, zdict, max_length) -> (bytes, ended, unused): raw inflate as "
     "zlib.decompressobj(-15, zdict=zdict).decompress(data, max_length), with one stream "
     "kept for every body; ended: the stream's end was read; unused: input bytes after it"},
    {"cannot_shrink", cannot_shrink, METH_VARARGS,
     "cannot_shrink(data, zdict) -> bool: synapse_coap.wire.deflate.python_cannot_shrink "
     "(the proof that no one-block DEFLATE stream of data beats it by a byte), in C"},
    {"arena_size", arena_size, METH_NOARGS,
     "arena_size() -> (bytes, primed compressors): the arena's size and how many "
     "dictionary compressors are kept"},
    {"forget", forget, METH_NOARGS,
     "forget() -> None: drop the primed compressors, the arena, the inflater and the "
     "dictionaries' sequence tables"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_cdeflate",
    .m_doc = "The body codec's DEFLATE with a preset dictionary, without zlib's allocations.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__cdeflate(void)
{
    return PyModule_Create(&moddef);
}
