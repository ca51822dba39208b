/* The body codec's C decoder: the CBOR of a body to its JSON value in one pass.
 *
 * Part of the native build (synapse_coap/native.py, built by `synapse-coap
 * build-native`); used by synapse_coap/wire/body_fast.py before cbor2's decoder.
 *
 * It parses the CBOR and applies, in document order, everything the reference decoder
 * (synapse_coap/wire/body_decode.py, _Decoder) applies: the key table (integer map keys),
 * the value table (simple values), our tags (identifiers, base64, sigils and mxc://
 * prefixes and server-name suffixes, server references, timestamp deltas, session
 * string references, the derived content hash), and its caps (depth of non-empty
 * arrays, maps and tags; a container never claims more items than bytes are left).
 *
 * It accepts a subset of what the reference decoder accepts and answers exactly what
 * the reference decoder answers for it.  Everything else (bignums, negative integers
 * below -2**63, indefinite lengths, unknown tags, a byte string outside a tag, a
 * duplicate key, invalid UTF-8, trailing bytes, a failing string resolver, ...)
 * gives the Tables' fallback object (given by the caller): the caller's other decoders then
 * give the answer or the error.  So this file never decides that a body is bad.
 *
 * Beside the decoder: a decoded value's JSON text and an event's content hash
 * (dump_json, content_hash: tests/unit/test_cjson.py), and a request's identifiers and
 * texts for the session string table (request_strings, strings.py's rules:
 * tests/unit/test_request_strings.py).
 *
 * Tests: tests/unit/test_cbody.py (differential against the reference decoder, golden
 * vectors and hypothesis properties), tests/unit/test_body.py through decode_body.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

/* the tag numbers (synapse_coap/wire/body_tables.py, strings.py); TAGS exports them
 * so that body_fast.py checks they are still the same before it uses this module */
#define TAG_REF 4
#define TAG_REF_WIDE 5
#define TAG_EVENT_ID 6
#define TAG_ROOM_HASH_ID 7
#define TAG_B64 8
#define TAG_B64URL 9
#define TAG_SERVER 18
#define TAG_EVENT_ID_LIST 19
#define TAG_TS_DELTA 21
#define TAG_DERIVED_SHA256 23
#define TS_LOW (((uint64_t)1) << 32) /* ints in [TS_LOW, 2**64) take part in deltas */
#define MAX_AFFIX_TAG 256

/* made once, when the module is first initialised */
static PyObject *DERIVED = NULL;      /* placeholder of a derived hash inside a map */
static PyObject *S_HASHES = NULL;     /* "hashes" */
static PyObject *S_SHA256 = NULL;     /* "sha256" */

static const char B64_STD[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char B64_URL[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* ------------------------------------------------------------------------------------ */
/* Tables: what one profile and context give the decoder, built once                     */
/* ------------------------------------------------------------------------------------ */

typedef struct {
    PyObject *prefix; /* bytes (UTF-8) or NULL: no affix for this tag */
    PyObject *suffix; /* bytes (UTF-8) */
} Affix;

typedef struct {
    PyObject_HEAD
    PyObject *keys;             /* tuple of str: key-table index -> key */
    PyObject *names;            /* tuple of str: server index -> name */
    PyObject *fallback;         /* what decode() returns when it does not decide */
    PyObject *content_hash;     /* content_hash(dict) -> str | None: for an event that
                                 * c_content_hash does not take (a float, ...) */
    PyObject *simple[256];      /* simple value number -> value-table str (or NULL) */
    Affix affix[MAX_AFFIX_TAG]; /* tag -> prefix and suffix around a text string */
} Tables;

static void
Tables_dealloc(Tables *self)
{
    Py_XDECREF(self->keys);
    Py_XDECREF(self->names);
    Py_XDECREF(self->fallback);
    Py_XDECREF(self->content_hash);
    for (int i = 0; i < 256; i++)
        Py_XDECREF(self->simple[i]);
    for (int i = 0; i < MAX_AFFIX_TAG; i++) {
        Py_XDECREF(self->affix[i].prefix);
        Py_XDECREF(self->affix[i].suffix);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Tables_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *keys, *simple, *affix, *names, *fallback, *content_hash;
    static char *kwlist[] = {"keys", "simple", "affix", "names", "fallback", "content_hash", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!O!O!OO:Tables", kwlist, &PyTuple_Type,
                                     &keys, &PyTuple_Type, &simple, &PyDict_Type, &affix,
                                     &PyTuple_Type, &names, &fallback, &content_hash))
        return NULL;
    if (!PyCallable_Check(content_hash)) {
        PyErr_SetString(PyExc_TypeError, "content_hash must be callable");
        return NULL;
    }
    if (PyTuple_GET_SIZE(simple) != 256) {
        PyErr_SetString(PyExc_ValueError, "simple must have 256 entries");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(keys); i++)
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(keys, i))) {
            PyErr_SetString(PyExc_TypeError, "keys must be str");
            return NULL;
        }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++)
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(names, i))) {
            PyErr_SetString(PyExc_TypeError, "names must be str");
            return NULL;
        }
    Tables *self = (Tables *)type->tp_alloc(type, 0); /* zeroed */
    if (self == NULL)
        return NULL;
    Py_INCREF(keys);
    self->keys = keys;
    Py_INCREF(names);
    self->names = names;
    Py_INCREF(fallback);
    self->fallback = fallback;
    Py_INCREF(content_hash);
    self->content_hash = content_hash;
    for (int i = 0; i < 256; i++) {
        PyObject *v = PyTuple_GET_ITEM(simple, i);
        if (v == Py_None)
            continue;
        if (!PyUnicode_CheckExact(v)) {
            PyErr_SetString(PyExc_TypeError, "simple entries must be str or None");
            goto fail;
        }
        Py_INCREF(v);
        self->simple[i] = v;
    }
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(affix, &pos, &k, &v)) {
        long tag = PyLong_Check(k) ? PyLong_AsLong(k) : -1;
        if (tag < 0 || tag >= MAX_AFFIX_TAG || !PyTuple_Check(v) || PyTuple_GET_SIZE(v) != 2 ||
            !PyUnicode_Check(PyTuple_GET_ITEM(v, 0)) || !PyUnicode_Check(PyTuple_GET_ITEM(v, 1))) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "affix must map tags 0-255 to (prefix, suffix)");
            goto fail;
        }
        PyObject *p = PyUnicode_AsUTF8String(PyTuple_GET_ITEM(v, 0));
        PyObject *s = p ? PyUnicode_AsUTF8String(PyTuple_GET_ITEM(v, 1)) : NULL;
        if (s == NULL) {
            Py_XDECREF(p);
            goto fail;
        }
        Py_XSETREF(self->affix[tag].prefix, p);
        Py_XSETREF(self->affix[tag].suffix, s);
    }
    return (PyObject *)self;
fail:
    Py_DECREF(self);
    return NULL;
}

static PyTypeObject TablesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "synapse_coap.wire._cbody.Tables",
    .tp_basicsize = sizeof(Tables),
    .tp_dealloc = (destructor)Tables_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Tables(keys, simple, affix, names, fallback, content_hash): one profile and "
              "context, built once.",
    .tp_new = Tables_new,
};

/* ------------------------------------------------------------------------------------ */
/* JSON text of a decoded value, and the content hash of an event, without json's       */
/* Python layer: the request path runs these once per body, between two requests of a   */
/* homeserver whose own work has evicted them from the CPU's caches, where every library */
/* function touched (json's encoder, hashlib's OpenSSL, binascii) costs tens of          */
/* microseconds; here they are one small piece of this module.                           */
/*                                                                                        */
/* W_UNHANDLED: a value this writer does not take (a float, a str with a lone surrogate, */
/* a key that is not a str, another type, nesting deeper than JSON_MAX_DEPTH): the       */
/* caller then runs Python's json, which gives the answer or the error.  What it takes,  */
/* it writes byte for byte as json.dumps(v, ensure_ascii=False, separators=(",", ":"),   */
/* allow_nan=False) (and sort_keys=True for the canonical form) encoded to UTF-8:        */
/* tests/unit/test_cbody.py holds it to that.                                            */
/* ------------------------------------------------------------------------------------ */

#define WR_OK 0
#define W_ERROR (-1)
#define W_UNHANDLED 1
#define JSON_MAX_DEPTH 200

typedef struct {
    char *buf;
    Py_ssize_t len;
    Py_ssize_t cap;
    char small[1024];
} W;

static void
w_init(W *w)
{
    w->buf = w->small;
    w->len = 0;
    w->cap = (Py_ssize_t)sizeof(w->small);
}

static void
w_free(W *w)
{
    if (w->buf != w->small)
        PyMem_Free(w->buf);
}

static int
w_reserve(W *w, Py_ssize_t n)
{
    if (w->cap - w->len >= n)
        return WR_OK;
    if (n > PY_SSIZE_T_MAX / 2 - w->len) {
        PyErr_NoMemory();
        return W_ERROR;
    }
    Py_ssize_t cap = w->cap * 2;
    if (cap < w->len + n)
        cap = w->len + n;
    char *b;
    if (w->buf == w->small) {
        b = PyMem_Malloc((size_t)cap);
        if (b != NULL)
            memcpy(b, w->small, (size_t)w->len);
    } else {
        b = PyMem_Realloc(w->buf, (size_t)cap);
    }
    if (b == NULL) {
        PyErr_NoMemory();
        return W_ERROR;
    }
    w->buf = b;
    w->cap = cap;
    return WR_OK;
}

static inline int
w_put(W *w, const char *s, Py_ssize_t n)
{
    if (w_reserve(w, n) != WR_OK)
        return W_ERROR;
    memcpy(w->buf + w->len, s, (size_t)n);
    w->len += n;
    return WR_OK;
}

static inline int
w_byte(W *w, char c)
{
    if (w->len == w->cap && w_reserve(w, 1) != WR_OK)
        return W_ERROR;
    w->buf[w->len++] = c;
    return WR_OK;
}

/* a JSON string as json's encode_basestring (ensure_ascii=False) writes it */
static int
w_str(W *w, PyObject *s)
{
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    if (u == NULL) { /* a lone surrogate: json's encoder and "surrogatepass" decide */
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return W_ERROR;
        PyErr_Clear();
        return W_UNHANDLED;
    }
    /* at most 6 bytes per input byte (\u00XX), and the quotes */
    if (n > (PY_SSIZE_T_MAX - 2) / 6) {
        PyErr_NoMemory();
        return W_ERROR;
    }
    if (w_reserve(w, n * 6 + 2) != WR_OK)
        return W_ERROR;
    char *o = w->buf + w->len;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)u[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = "0123456789abcdef"[c >> 4];
            *o++ = "0123456789abcdef"[c & 15];
        }
    }
    *o++ = '"';
    w->len = o - w->buf;
    return WR_OK;
}

static int w_value(W *w, PyObject *v, int depth, int sort);

static int
w_int(W *w, PyObject *v)
{
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred())
        return W_ERROR;
    if (overflow) { /* json writes int.__repr__ */
        PyObject *r = PyLong_Type.tp_repr(v);
        if (r == NULL)
            return W_ERROR;
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(r, &n);
        int err = s == NULL ? W_ERROR : w_put(w, s, n);
        Py_DECREF(r);
        return err;
    }
    char tmp[24];
    int n = snprintf(tmp, sizeof(tmp), "%lld", x);
    return w_put(w, tmp, n);
}

/* ``"k":v`` (after a comma unless ``first``) */
static int
w_member(W *w, PyObject *k, PyObject *v, int depth, int sort, int first)
{
    int rc = first ? WR_OK : w_byte(w, ',');
    Py_INCREF(v); /* (held while it is written) */
    if (rc == WR_OK)
        rc = w_str(w, k);
    if (rc == WR_OK)
        rc = w_byte(w, ':');
    if (rc == WR_OK)
        rc = w_value(w, v, depth + 1, sort);
    Py_DECREF(v);
    return rc;
}

/* the members of a dict in order (or sorted by key), {"k":v,...}; ``skip``: the three
 * keys an event's content hash leaves out (top level only) */
static int
w_dict(W *w, PyObject *d, int depth, int sort, int skip)
{
    if (PyDict_GET_SIZE(d) == 0 && !skip)
        return w_put(w, "{}", 2);
    if (w_byte(w, '{') != WR_OK)
        return W_ERROR;
    int first = 1;
    int rc = WR_OK;
    if (!sort) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(d, &pos, &k, &v)) {
            if (!PyUnicode_CheckExact(k))
                return W_UNHANDLED;
            rc = w_member(w, k, v, depth, sort, first);
            first = 0;
            if (rc != WR_OK)
                return rc;
        }
        return w_byte(w, '}');
    }
    PyObject *keys = PyDict_Keys(d);
    if (keys == NULL)
        return W_ERROR;
    Py_ssize_t n = PyList_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyUnicode_CheckExact(PyList_GET_ITEM(keys, i))) {
            Py_DECREF(keys);
            return W_UNHANDLED;
        }
    }
    if (PyList_Sort(keys) < 0) {
        Py_DECREF(keys);
        return W_ERROR;
    }
    for (Py_ssize_t i = 0; i < n && rc == WR_OK; i++) {
        PyObject *k = PyList_GET_ITEM(keys, i);
        if (skip && (PyUnicode_CompareWithASCIIString(k, "unsigned") == 0 ||
                     PyUnicode_CompareWithASCIIString(k, "signatures") == 0 ||
                     PyUnicode_CompareWithASCIIString(k, "hashes") == 0))
            continue;
        PyObject *v = PyDict_GetItemWithError(d, k);
        if (v == NULL) { /* (the dict changed under us: only Python code could) */
            rc = PyErr_Occurred() ? W_ERROR : W_UNHANDLED;
            break;
        }
        rc = w_member(w, k, v, depth, sort, first);
        first = 0;
    }
    Py_DECREF(keys);
    if (rc != WR_OK)
        return rc;
    return w_byte(w, '}');
}

static int
w_value(W *w, PyObject *v, int depth, int sort)
{
    if (depth > JSON_MAX_DEPTH)
        return W_UNHANDLED;
    if (PyUnicode_CheckExact(v))
        return w_str(w, v);
    if (v == Py_None)
        return w_put(w, "null", 4);
    if (v == Py_True)
        return w_put(w, "true", 4);
    if (v == Py_False)
        return w_put(w, "false", 5);
    if (PyLong_CheckExact(v))
        return w_int(w, v);
    if (PyDict_CheckExact(v))
        return w_dict(w, v, depth, sort, 0);
    if (PyList_CheckExact(v)) {
        if (w_byte(w, '[') != WR_OK)
            return W_ERROR;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(v); i++) {
            if (i && w_byte(w, ',') != WR_OK)
                return W_ERROR;
            PyObject *x = PyList_GET_ITEM(v, i);
            Py_INCREF(x);
            int rc = w_value(w, x, depth + 1, sort);
            Py_DECREF(x);
            if (rc != WR_OK)
                return rc;
        }
        return w_byte(w, ']');
    }
    return W_UNHANDLED; /* a float, a tuple, a subclass, anything else: Python's json */
}

/* dump_json(value) -> bytes | None: json.dumps(value, ensure_ascii=False,
 * separators=(",", ":"), allow_nan=False).encode("utf-8", "surrogatepass"), or None
 * where this writer does not take the value (see above) */
static PyObject *
dump_json(PyObject *module, PyObject *value)
{
    W w;
    w_init(&w);
    int rc = w_value(&w, value, 0, 0);
    PyObject *out = NULL;
    if (rc == WR_OK)
        out = PyBytes_FromStringAndSize(w.buf, w.len);
    else if (rc == W_UNHANDLED)
        out = Py_NewRef(Py_None);
    w_free(&w);
    return out;
}

/* SHA-256 (FIPS 180-4), for the content hash: one small function instead of a call
 * through hashlib into OpenSSL; tests/unit/test_cbody.py compares it with hashlib */
static const uint32_t SHA_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2,
};

#define ROR32(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void
sha256_block(uint32_t h[8], const unsigned char *p)
{
    uint32_t m[64];
    for (int i = 0; i < 16; i++)
        m[i] = ((uint32_t)p[4 * i] << 24) | ((uint32_t)p[4 * i + 1] << 16) |
               ((uint32_t)p[4 * i + 2] << 8) | (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR32(m[i - 15], 7) ^ ROR32(m[i - 15], 18) ^ (m[i - 15] >> 3);
        uint32_t s1 = ROR32(m[i - 2], 17) ^ ROR32(m[i - 2], 19) ^ (m[i - 2] >> 10);
        m[i] = m[i - 16] + s0 + m[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ROR32(e, 6) ^ ROR32(e, 11) ^ ROR32(e, 25)) + ((e & f) ^ (~e & g)) +
                      SHA_K[i] + m[i];
        uint32_t t2 = (ROR32(a, 2) ^ ROR32(a, 13) ^ ROR32(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += k;
}

static void
sha256(const unsigned char *data, size_t n, unsigned char out[32])
{
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    size_t i = 0;
    for (; i + 64 <= n; i += 64)
        sha256_block(h, data + i);
    unsigned char tail[128];
    size_t rest = n - i;
    memcpy(tail, data + i, rest);
    tail[rest] = 0x80;
    size_t total = rest + 9 <= 64 ? 64 : 128;
    memset(tail + rest + 1, 0, total - rest - 1);
    uint64_t bits = (uint64_t)n * 8;
    for (int j = 0; j < 8; j++)
        tail[total - 1 - j] = (unsigned char)(bits >> (8 * j));
    sha256_block(h, tail);
    if (total == 128)
        sha256_block(h, tail + 64);
    for (int j = 0; j < 8; j++) {
        out[4 * j] = (unsigned char)(h[j] >> 24);
        out[4 * j + 1] = (unsigned char)(h[j] >> 16);
        out[4 * j + 2] = (unsigned char)(h[j] >> 8);
        out[4 * j + 3] = (unsigned char)h[j];
    }
}

/* the event's content hash (body_tables.content_hash: the SHA-256 of its canonical JSON
 * without unsigned, signatures and hashes, unpadded base64) as a str; NULL with no error
 * set where this writer does not take the event (then the Python function decides) */
static PyObject *
c_content_hash(PyObject *event)
{
    W w;
    w_init(&w);
    int rc = w_dict(&w, event, 0, 1, 1);
    if (rc != WR_OK) {
        w_free(&w);
        return NULL;
    }
    unsigned char digest[32];
    sha256((const unsigned char *)w.buf, (size_t)w.len, digest);
    w_free(&w);
    char text[44];
    int o = 0;
    for (int i = 0; i < 30; i += 3) {
        uint32_t x = ((uint32_t)digest[i] << 16) | ((uint32_t)digest[i + 1] << 8) | digest[i + 2];
        text[o++] = B64_STD[x >> 18];
        text[o++] = B64_STD[(x >> 12) & 63];
        text[o++] = B64_STD[(x >> 6) & 63];
        text[o++] = B64_STD[x & 63];
    }
    uint32_t x = ((uint32_t)digest[30] << 16) | ((uint32_t)digest[31] << 8);
    text[o++] = B64_STD[x >> 18];
    text[o++] = B64_STD[(x >> 12) & 63];
    text[o++] = B64_STD[(x >> 6) & 63];
    return PyUnicode_FromStringAndSize(text, o); /* 43 characters */
}

/* content_hash(event: dict) -> str | None: c_content_hash, None where it does not take
 * the event (for the tests; the decoder calls c_content_hash itself) */
static PyObject *
content_hash(PyObject *module, PyObject *event)
{
    if (!PyDict_CheckExact(event)) {
        PyErr_SetString(PyExc_TypeError, "content_hash(event: dict)");
        return NULL;
    }
    PyObject *h = c_content_hash(event);
    if (h == NULL && !PyErr_Occurred())
        return Py_NewRef(Py_None);
    return h;
}

/* ------------------------------------------------------------------------------------ */
/* A request's strings for the session string table                                     */
/* ------------------------------------------------------------------------------------ */

/* a hash identifier, as strings.py's _HASH_ID: "$" or "!", 42 url-safe base64
 * characters, then one of the 16 whose two low bits are zero */
static int
is_hash_id(PyObject *s)
{
    if (PyUnicode_GET_LENGTH(s) != 44 || PyUnicode_KIND(s) != PyUnicode_1BYTE_KIND)
        return 0;
    const Py_UCS1 *c = PyUnicode_1BYTE_DATA(s);
    if (c[0] != '$' && c[0] != '!')
        return 0;
    for (int i = 1; i < 43; i++) {
        Py_UCS1 x = c[i];
        if (!((x >= 'A' && x <= 'Z') || (x >= 'a' && x <= 'z') || (x >= '0' && x <= '9') ||
              x == '_' || x == '-'))
            return 0;
    }
    return c[43] != 0 && strchr("AEIMQUYcgkosw048", c[43]) != NULL;
}

/* request_strings(value, max_ids, min_text, max_text, max_total) -> (ids, texts) | None:
 * strings.py's _identifiers_of(_strings(value)) and _texts_of(_strings(value)) in one
 * walk, or None where the value holds a container or string of another type than
 * dict, list, tuple and str themselves (a subclass may order its items otherwise):
 * the caller then runs the reference.  The walk stops once both are complete. */
static PyObject *
request_strings(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "request_strings(value, max_ids, min_text, max_text, max_total)");
        return NULL;
    }
    Py_ssize_t lim[4];
    for (int i = 0; i < 4; i++) {
        lim[i] = PyLong_AsSsize_t(args[i + 1]);
        if (lim[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    Py_ssize_t max_ids = lim[0], min_text = lim[1], max_text = lim[2], max_total = lim[3];
    /* a stack of borrowed references: nothing here runs Python code (str hashing and
     * comparison are C), so the value's containers keep their items alive */
    Py_ssize_t cap = 64, top = 0;
    PyObject **stack = PyMem_Malloc(sizeof(PyObject *) * (size_t)cap);
    PyObject *ids = PyList_New(0), *texts = PyList_New(0);
    PyObject *ids_seen = PySet_New(NULL), *texts_seen = PySet_New(NULL);
    PyObject *out = NULL;
    if (stack == NULL || ids == NULL || texts == NULL || ids_seen == NULL ||
        texts_seen == NULL) {
        if (stack == NULL)
            PyErr_NoMemory();
        goto done;
    }
    int ids_done = 0, texts_done = 0;
    Py_ssize_t total = 0;
    stack[top++] = args[0];
    while (top > 0 && !(ids_done && texts_done)) {
        PyObject *item = stack[--top];
        PyTypeObject *t = Py_TYPE(item);
        if (t == &PyUnicode_Type) {
            if (PyUnicode_READY(item) < 0)
                goto done;
            Py_ssize_t n = PyUnicode_GET_LENGTH(item);
            if (!ids_done && n == 44 && is_hash_id(item)) {
                int seen = PySet_Contains(ids_seen, item);
                if (seen < 0)
                    goto done;
                if (!seen) {
                    if (PySet_Add(ids_seen, item) < 0 || PyList_Append(ids, item) < 0)
                        goto done;
                    if (PyList_GET_SIZE(ids) >= max_ids)
                        ids_done = 1;
                }
            }
            if (!texts_done && n >= min_text && n <= max_text &&
                PyUnicode_FindChar(item, ' ', 0, n, 1) >= 0) {
                int seen = PySet_Contains(texts_seen, item);
                if (seen < 0)
                    goto done;
                if (!seen) {
                    total += n;
                    if (total > max_total || PyList_GET_SIZE(texts) >= max_ids)
                        texts_done = 1;
                    else if (PySet_Add(texts_seen, item) < 0 || PyList_Append(texts, item) < 0)
                        goto done;
                }
            }
            continue;
        }
        Py_ssize_t n;
        if (t == &PyDict_Type)
            n = PyDict_GET_SIZE(item);
        else if (t == &PyList_Type)
            n = PyList_GET_SIZE(item);
        else if (t == &PyTuple_Type)
            n = PyTuple_GET_SIZE(item);
        else if (PyUnicode_Check(item) || PyDict_Check(item) || PyList_Check(item) ||
                 PyTuple_Check(item)) {
            out = Py_NewRef(Py_None); /* a subclass: the reference walks it */
            goto done;
        }
        else
            continue; /* a number, a bool, None: no string */
        if (top + n > cap) {
            Py_ssize_t want = cap;
            while (top + n > want)
                want *= 2;
            PyObject **grown = PyMem_Realloc(stack, sizeof(PyObject *) * (size_t)want);
            if (grown == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            stack = grown;
            cap = want;
        }
        /* pushed last item first, so that the first is taken next: document order */
        if (t == &PyDict_Type) {
            Py_ssize_t pos = 0, i = top + n;
            PyObject *k, *v;
            while (PyDict_Next(item, &pos, &k, &v))
                stack[--i] = v;
        }
        else {
            PyObject **items = t == &PyList_Type ? ((PyListObject *)item)->ob_item
                                                 : ((PyTupleObject *)item)->ob_item;
            for (Py_ssize_t i = 0; i < n; i++)
                stack[top + n - 1 - i] = items[i];
        }
        top += n;
    }
    {
        PyObject *a = PyList_AsTuple(ids), *b = a == NULL ? NULL : PyList_AsTuple(texts);
        if (b != NULL)
            out = PyTuple_Pack(2, a, b);
        Py_XDECREF(a);
        Py_XDECREF(b);
    }
done:
    PyMem_Free(stack);
    Py_XDECREF(ids);
    Py_XDECREF(texts);
    Py_XDECREF(ids_seen);
    Py_XDECREF(texts_seen);
    return out;
}

/* sha256_digest(data: bytes) -> bytes: this module's SHA-256 (for the tests) */
static PyObject *
sha256_digest(PyObject *module, PyObject *data)
{
    if (!PyBytes_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "sha256_digest(data: bytes)");
        return NULL;
    }
    unsigned char digest[32];
    sha256((const unsigned char *)PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data),
           digest);
    return PyBytes_FromStringAndSize((const char *)digest, 32);
}

/* ------------------------------------------------------------------------------------ */
/* the decoder                                                                            */
/* ------------------------------------------------------------------------------------ */

typedef struct {
    const unsigned char *p, *end;
    Tables *t;
    PyObject *resolve; /* None or resolve(tag, n) -> str */
    int depth, max_depth;
    int has_prev;
    uint64_t prev; /* the base of the next timestamp delta */
} D;

enum { AT_TOP, AT_ELEMENT, AT_VALUE };

/* Every function below returns a new reference, or NULL: with an exception set (an
 * error of Python's: memory, a failing callback), or without one: FALLBACK. */

static int
head(D *d, int *major, int *info, uint64_t *arg)
{
    if (d->p >= d->end)
        return -1;
    unsigned char b = *d->p++;
    int n;
    *major = b >> 5;
    *info = b & 31;
    if (*info < 24) {
        *arg = (uint64_t)*info;
        return 0;
    }
    switch (*info) {
    case 24: n = 1; break;
    case 25: n = 2; break;
    case 26: n = 4; break;
    case 27: n = 8; break;
    default: return -1; /* reserved, or an indefinite length */
    }
    if (d->end - d->p < n)
        return -1;
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | d->p[i];
    d->p += n;
    *arg = v;
    return 0;
}

/* the next item's head, which must be a string of `want` major type; its bytes */
static int
string_of(D *d, int want, const unsigned char **s, Py_ssize_t *n)
{
    int major, info;
    uint64_t arg;
    if (head(d, &major, &info, &arg) < 0 || major != want)
        return -1;
    if (arg > (uint64_t)(d->end - d->p))
        return -1;
    *s = d->p;
    *n = (Py_ssize_t)arg;
    d->p += arg;
    return 0;
}

static PyObject *
b64(const unsigned char *s, Py_ssize_t n, const char *alphabet, char sigil)
{
    Py_ssize_t len = (n / 3) * 4 + (n % 3 ? n % 3 + 1 : 0) + (sigil ? 1 : 0);
    PyObject *u = PyUnicode_New(len, 127);
    if (u == NULL)
        return NULL;
    Py_UCS1 *w = PyUnicode_1BYTE_DATA(u);
    if (sigil)
        *w++ = (Py_UCS1)sigil;
    Py_ssize_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = ((uint32_t)s[i] << 16) | ((uint32_t)s[i + 1] << 8) | s[i + 2];
        *w++ = alphabet[(v >> 18) & 63];
        *w++ = alphabet[(v >> 12) & 63];
        *w++ = alphabet[(v >> 6) & 63];
        *w++ = alphabet[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)s[i] << 16;
        *w++ = alphabet[(v >> 18) & 63];
        *w++ = alphabet[(v >> 12) & 63];
    }
    else if (n - i == 2) {
        uint32_t v = ((uint32_t)s[i] << 16) | ((uint32_t)s[i + 1] << 8);
        *w++ = alphabet[(v >> 18) & 63];
        *w++ = alphabet[(v >> 12) & 63];
        *w++ = alphabet[(v >> 6) & 63];
    }
    return u;
}

static PyObject *
affixed(const Affix *a, const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t pn = PyBytes_GET_SIZE(a->prefix), sn = PyBytes_GET_SIZE(a->suffix);
    Py_ssize_t total = pn + n + sn;
    char stack[512];
    char *buf = total <= (Py_ssize_t)sizeof(stack) ? stack : PyMem_Malloc((size_t)total);
    if (buf == NULL)
        return PyErr_NoMemory();
    memcpy(buf, PyBytes_AS_STRING(a->prefix), (size_t)pn);
    memcpy(buf + pn, s, (size_t)n);
    memcpy(buf + pn + n, PyBytes_AS_STRING(a->suffix), (size_t)sn);
    /* strict: invalid UTF-8 in the text cannot be made valid by the ASCII at its ends */
    PyObject *u = PyUnicode_DecodeUTF8(buf, total, NULL);
    if (buf != stack)
        PyMem_Free(buf);
    return u;
}

/* one of our tags, at `where`: its content read and applied */
static PyObject *
tag(D *d, uint64_t tag, int where)
{
    const unsigned char *s;
    Py_ssize_t n;
    int major, info;
    uint64_t arg;
    if (d->depth >= d->max_depth)
        return NULL;
    if (tag < MAX_AFFIX_TAG && d->t->affix[tag].prefix != NULL) {
        if (string_of(d, 3, &s, &n) < 0)
            return NULL;
        return affixed(&d->t->affix[tag], s, n);
    }
    switch (tag) {
    case TAG_EVENT_ID_LIST: {
        if (string_of(d, 2, &s, &n) < 0 || n == 0 || n % 32)
            return NULL;
        PyObject *list = PyList_New(n / 32);
        if (list == NULL)
            return NULL;
        for (Py_ssize_t i = 0; i < n / 32; i++) {
            PyObject *id = b64(s + 32 * i, 32, B64_URL, '$');
            if (id == NULL) {
                Py_DECREF(list);
                return NULL;
            }
            PyList_SET_ITEM(list, i, id);
        }
        return list;
    }
    case TAG_EVENT_ID:
    case TAG_ROOM_HASH_ID:
        if (string_of(d, 2, &s, &n) < 0 || n != 32)
            return NULL;
        return b64(s, 32, B64_URL, tag == TAG_EVENT_ID ? '$' : '!');
    case TAG_SERVER:
        if (head(d, &major, &info, &arg) < 0 || major != 0)
            return NULL;
        if (arg >= (uint64_t)PyTuple_GET_SIZE(d->t->names))
            return NULL;
        return Py_NewRef(PyTuple_GET_ITEM(d->t->names, (Py_ssize_t)arg));
    case TAG_TS_DELTA: {
        uint64_t next;
        if (where == AT_TOP || !d->has_prev || head(d, &major, &info, &arg) < 0)
            return NULL;
        if (major == 0) {
            if (arg > UINT64_MAX - d->prev)
                return NULL;
            next = d->prev + arg;
        }
        else if (major == 1) { /* prev - 1 - arg, kept >= TS_LOW */
            if (arg >= d->prev - TS_LOW)
                return NULL;
            next = d->prev - 1 - arg;
        }
        else
            return NULL;
        d->prev = next;
        return PyLong_FromUnsignedLongLong(next);
    }
    case TAG_B64:
    case TAG_B64URL:
        if (string_of(d, 2, &s, &n) < 0)
            return NULL;
        return b64(s, n, tag == TAG_B64 ? B64_STD : B64_URL, 0);
    case TAG_DERIVED_SHA256:
        if (where != AT_VALUE || d->p >= d->end || *d->p != 0xf6) /* null */
            return NULL;
        d->p++;
        return Py_NewRef(DERIVED);
    case TAG_REF:
    case TAG_REF_WIDE: {
        if (d->resolve == Py_None || head(d, &major, &info, &arg) < 0 || major != 0)
            return NULL;
        PyObject *r = PyObject_CallFunction(d->resolve, "iK", (int)tag, (unsigned long long)arg);
        if (r != NULL && !PyUnicode_CheckExact(r)) {
            Py_DECREF(r);
            return NULL;
        }
        return r;
    }
    default:
        return NULL; /* bignums, and every tag that is not ours */
    }
}

static double
half(uint64_t h)
{
    unsigned e = (unsigned)(h >> 10) & 0x1f, m = (unsigned)h & 0x3ff;
    double v;
    if (e == 0)
        v = ldexp((double)m, -24);
    else if (e != 31)
        v = ldexp((double)(m + 1024), (int)e - 25);
    else
        v = m == 0 ? INFINITY : NAN;
    return (h & 0x8000) ? -v : v;
}

/* the text string of `n` bytes at the read position (its head already read) */
static PyObject *
text(D *d, uint64_t n)
{
    if (n > (uint64_t)(d->end - d->p))
        return NULL;
    const char *s = (const char *)d->p;
    d->p += n;
    return PyUnicode_DecodeUTF8(s, (Py_ssize_t)n, NULL);
}

/* a simple value of the value table (1-byte heads below 20, 2-byte ones from 32) */
static PyObject *
simple_value(D *d, int info, uint64_t arg)
{
    if ((info < 24 && arg < 20) || (info == 24 && arg >= 32)) {
        PyObject *v = d->t->simple[arg];
        return v == NULL ? NULL : Py_NewRef(v);
    }
    return NULL;
}

static PyObject *item(D *d, int where);

/* a map key: an integer of the key table, a text string, a value-table string, or a
 * tag whose value is text */
static PyObject *
key(D *d)
{
    int major, info;
    uint64_t arg;
    if (head(d, &major, &info, &arg) < 0)
        return NULL;
    Py_ssize_t nkeys = PyTuple_GET_SIZE(d->t->keys);
    switch (major) {
    case 0: /* zigzag: n >= 0 is index 2n, -1-a is index 2a+1 */
        if (arg >= (uint64_t)nkeys || 2 * arg >= (uint64_t)nkeys)
            return NULL;
        return Py_NewRef(PyTuple_GET_ITEM(d->t->keys, (Py_ssize_t)(2 * arg)));
    case 1:
        if (arg >= (uint64_t)nkeys || 2 * arg + 1 >= (uint64_t)nkeys)
            return NULL;
        return Py_NewRef(PyTuple_GET_ITEM(d->t->keys, (Py_ssize_t)(2 * arg + 1)));
    case 3:
        return text(d, arg);
    case 6: {
        if (arg == TAG_TS_DELTA)
            return NULL;
        PyObject *k = tag(d, arg, AT_ELEMENT);
        if (k != NULL && !PyUnicode_CheckExact(k)) {
            Py_DECREF(k);
            return NULL;
        }
        return k;
    }
    case 7:
        return simple_value(d, info, arg);
    default:
        return NULL;
    }
}

static PyObject *
map(D *d, uint64_t n)
{
    if (n == 0)
        return PyDict_New();
    if (n > (uint64_t)(d->end - d->p) / 2 || d->depth >= d->max_depth)
        return NULL;
    d->depth++;
    PyObject *dict = PyDict_New();
    if (dict == NULL)
        return NULL;
    int derived = 0;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *k = key(d);
        if (k == NULL)
            goto fail;
        PyObject *v = item(d, AT_VALUE);
        if (v == NULL) {
            Py_DECREF(k);
            goto fail;
        }
        if (v == DERIVED) {
            if (PyUnicode_Compare(k, S_HASHES) != 0) {
                Py_DECREF(k);
                Py_DECREF(v);
                goto fail; /* (a failed comparison of two str cannot happen) */
            }
            derived = 1;
        }
        Py_ssize_t before = PyDict_GET_SIZE(dict);
        int err = PyDict_SetItem(dict, k, v);
        Py_DECREF(k);
        Py_DECREF(v);
        if (err < 0 || PyDict_GET_SIZE(dict) == before)
            goto fail; /* a duplicate key, after the tables */
    }
    if (derived) {
        /* this module's hash; the tables' Python function for what it does not take */
        PyObject *h = c_content_hash(dict);
        if (h == NULL && !PyErr_Occurred())
            h = PyObject_CallOneArg(d->t->content_hash, dict);
        if (h == NULL)
            goto fail;
        if (!PyUnicode_CheckExact(h)) { /* None: not in canonical JSON */
            Py_DECREF(h);
            goto fail;
        }
        PyObject *inner = PyDict_New();
        int err = inner == NULL ? -1 : PyDict_SetItem(inner, S_SHA256, h);
        Py_DECREF(h);
        if (err == 0)
            err = PyDict_SetItem(dict, S_HASHES, inner);
        Py_XDECREF(inner);
        if (err < 0)
            goto fail;
    }
    d->depth--;
    return dict;
fail:
    Py_DECREF(dict);
    return NULL;
}

static PyObject *
array(D *d, uint64_t n)
{
    if (n == 0)
        return PyList_New(0);
    if (n > (uint64_t)(d->end - d->p) || d->depth >= d->max_depth)
        return NULL;
    d->depth++;
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < (Py_ssize_t)n; i++) {
        PyObject *v = item(d, AT_ELEMENT);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    d->depth--;
    return list;
}

static PyObject *
item(D *d, int where)
{
    int major, info;
    uint64_t arg;
    if (head(d, &major, &info, &arg) < 0)
        return NULL;
    switch (major) {
    case 0:
        if (where != AT_TOP && arg >= TS_LOW) {
            d->prev = arg;
            d->has_prev = 1;
        }
        return PyLong_FromUnsignedLongLong(arg);
    case 1:
        if (arg > (uint64_t)INT64_MAX)
            return NULL;
        return PyLong_FromLongLong(-1 - (long long)arg);
    case 3:
        return text(d, arg);
    case 4:
        return array(d, arg);
    case 5:
        return map(d, arg);
    case 6:
        return tag(d, arg, where);
    case 7:
        switch (info) {
        case 25:
            return PyFloat_FromDouble(half(arg));
        case 26: {
            uint32_t bits = (uint32_t)arg;
            float f;
            memcpy(&f, &bits, 4);
            return PyFloat_FromDouble((double)f);
        }
        case 27: {
            double v;
            memcpy(&v, &arg, 8);
            return PyFloat_FromDouble(v);
        }
        default:
            break;
        }
        if (arg == 20 && info < 24)
            Py_RETURN_FALSE;
        if (arg == 21 && info < 24)
            Py_RETURN_TRUE;
        if (arg == 22 && info < 24)
            Py_RETURN_NONE;
        return simple_value(d, info, arg);
    default: /* a byte string outside a tag */
        return NULL;
    }
}

static PyObject *
decode(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_CheckExact(args[0]) || !PyObject_TypeCheck(args[1], &TablesType) ||
        !PyLong_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "decode(data: bytes, tables: Tables, max_depth: int, "
                                         "resolve)");
        return NULL;
    }
    long max_depth = PyLong_AsLong(args[2]);
    if (max_depth == -1 && PyErr_Occurred())
        return NULL;
    D d;
    d.p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    d.end = d.p + PyBytes_GET_SIZE(args[0]);
    d.t = (Tables *)args[1];
    d.resolve = args[3];
    d.depth = 0;
    d.max_depth = max_depth > 1000 ? 1000 : (int)max_depth; /* (the C stack) */
    d.has_prev = 0;
    d.prev = 0;
    PyObject *v = item(&d, AT_TOP);
    if (v != NULL && d.p == d.end && v != DERIVED)
        return v;
    Py_XDECREF(v);
    if (PyErr_Occurred()) {
        /* Python's own trouble is passed on; anything else (a text string that is not
         * UTF-8, a resolver or content hash that raised) is for the other decoders */
        if (PyErr_ExceptionMatches(PyExc_MemoryError) ||
            !PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        PyErr_Clear();
    }
    return Py_NewRef(d.t->fallback);
}

static PyMethodDef methods[] = {
    {"dump_json", (PyCFunction)dump_json, METH_O,
     "dump_json(value) -> bytes | None: json.dumps(value, ensure_ascii=False, "
     "separators=(',', ':'), allow_nan=False) in UTF-8 (surrogatepass), or None where this "
     "writer does not take the value (a float, a lone surrogate, ...)."},
    {"content_hash", (PyCFunction)content_hash, METH_O,
     "content_hash(event: dict) -> str | None: the event's content hash as "
     "body_tables.content_hash gives it, or None where this module does not take it."},
    {"sha256_digest", (PyCFunction)sha256_digest, METH_O,
     "sha256_digest(data: bytes) -> bytes: this module's SHA-256."},
    {"request_strings", (PyCFunction)(void (*)(void))request_strings, METH_FASTCALL,
     "request_strings(value, max_ids, min_text, max_text, max_total) -> (ids, texts) | "
     "None: strings.py's identifiers and texts of a request's JSON value in one walk, or "
     "None where the value holds a subclass of dict, list, tuple or str."},
    {"decode", (PyCFunction)(void (*)(void))decode, METH_FASTCALL,
     "decode(data, tables, max_depth, resolve): the JSON value of a body's CBOR, or the "
     "tables' fallback object."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "synapse_coap.wire._cbody",
    "The body codec's C decoder (see the comment at the top of _cbody.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__cbody(void)
{
    if (PyType_Ready(&TablesType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    if (DERIVED == NULL) /* (a second initialisation keeps the first's) */
        DERIVED = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    if (S_HASHES == NULL)
        S_HASHES = PyUnicode_InternFromString("hashes");
    if (S_SHA256 == NULL)
        S_SHA256 = PyUnicode_InternFromString("sha256");
    PyObject *tags = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:K}", "TAG_REF", TAG_REF, "TAG_REF_WIDE",
        TAG_REF_WIDE, "TAG_EVENT_ID", TAG_EVENT_ID, "TAG_ROOM_HASH_ID", TAG_ROOM_HASH_ID,
        "TAG_B64", TAG_B64, "TAG_B64URL", TAG_B64URL, "TAG_SERVER", TAG_SERVER,
        "TAG_EVENT_ID_LIST", TAG_EVENT_ID_LIST, "TAG_TS_DELTA", TAG_TS_DELTA,
        "TAG_DERIVED_SHA256", TAG_DERIVED_SHA256, "_TS_LOW", (unsigned long long)TS_LOW);
    if (DERIVED == NULL || S_HASHES == NULL || S_SHA256 == NULL || tags == NULL ||
        PyModule_AddObject(m, "TAGS", tags) < 0) {
        Py_XDECREF(tags);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&TablesType);
    if (PyModule_AddObject(m, "Tables", (PyObject *)&TablesType) < 0) {
        Py_DECREF(&TablesType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
