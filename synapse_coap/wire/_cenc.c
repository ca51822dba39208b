/* The body codec's C transcoder: a JSON body's bytes to the profile's CBOR in one pass.
 *
 * Part of the native build (synapse_coap/native.py, built by `synapse-coap
 * build-native`); used by synapse_coap/wire/body_encode.py (encode_json_fast) before
 * the reference path, parse_json_exact + _encode_cbor.
 *
 * In the homeserver, encoding an answer's JSON body cost more CPU than the rest of the
 * CoAP path around Synapse (bench/inbound.py, side by side: taking the answer's
 * encoding out saved 30-70 us per request on the small endpoints), most of it in
 * parse_json_exact (Python objects for every item, a hook call per object) and the
 * encoder's walk over them.  This file parses the JSON text and writes the CBOR as it
 * goes, with what _Encoder (body_encode.py) does to each item: the key table, the
 * value table, the shared string cache (a miss calls the Python encoder's string(),
 * which applies identifiers, sigils, server names, base64 and fills the cache), and
 * the timestamp deltas.
 *
 * It takes a subset of what the reference path takes and gives exactly its bytes for
 * it.  Everything else gives None, and the caller runs the reference path, which then
 * gives the answer or the error: a float, an integer outside [-2**64, 2**64), a
 * string with an escaped lone surrogate, a raw control character or invalid UTF-8, a
 * duplicate key, a key "hashes" (a derived content hash, body_encode.derived_hash), an
 * array whose first item is a 44-character string starting with "$" (an event id
 * list), nesting at _MAX_ENCODE_DEPTH, anything that is not JSON, trailing bytes.  So
 * this file never decides that a body is bad.
 *
 * Tests: tests/unit/test_cenc.py (differential against the reference path on the
 * corpora, golden vectors and hypothesis properties).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define TAG_TS_DELTA 21
#define MAX_DEPTH 400 /* body_tables._MAX_ENCODE_DEPTH */
#define TS_LOW (((uint64_t)1) << 32)
#define OK 0
#define NO -1 /* not taken (or an error: the caller tells them apart) */

static PyObject *S_HASHES = NULL; /* "hashes" */

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
    unsigned char *buf;
    Py_ssize_t len;
    Py_ssize_t cap;
    PyObject *key_bytes;   /* dict: key -> its integer key */
    PyObject *value_bytes; /* dict: value-table string -> its simple value */
    PyObject *cache;       /* dict: string -> its encoding (shared with the Python encoder) */
    PyObject *miss;        /* callable: string -> its encoding (the Python encoder's string()) */
    int have_prev;
    uint64_t prev_big;
} St;

static int
grow(St *st, Py_ssize_t more)
{
    if (st->len + more <= st->cap)
        return OK;
    Py_ssize_t cap = st->cap * 2;
    while (cap < st->len + more)
        cap *= 2;
    unsigned char *b = PyMem_Realloc(st->buf, (size_t)cap);
    if (b == NULL) {
        PyErr_NoMemory();
        return NO;
    }
    st->buf = b;
    st->cap = cap;
    return OK;
}

static int
put(St *st, const void *data, Py_ssize_t n)
{
    if (grow(st, n) < 0)
        return NO;
    memcpy(st->buf + st->len, data, (size_t)n);
    st->len += n;
    return OK;
}

/* the length of cbor.head(major, arg) */
static int
head_len(uint64_t arg)
{
    return arg < 24 ? 1 : arg < 0x100 ? 2 : arg < 0x10000 ? 3 : arg < 0x100000000ULL ? 5 : 9;
}

static void
write_head(unsigned char *out, int major, uint64_t arg)
{
    unsigned char m = (unsigned char)(major << 5);
    int n = head_len(arg);
    if (n == 1) {
        out[0] = (unsigned char)(m | arg);
        return;
    }
    out[0] = (unsigned char)(m | (n == 2 ? 24 : n == 3 ? 25 : n == 5 ? 26 : 27));
    for (int i = 1; i < n; i++)
        out[i] = (unsigned char)(arg >> (8 * (n - 1 - i)));
}

static int
put_head(St *st, int major, uint64_t arg)
{
    if (grow(st, 9) < 0)
        return NO;
    write_head(st->buf + st->len, major, arg);
    st->len += head_len(arg);
    return OK;
}

static int
put_bytes_obj(St *st, PyObject *b)
{
    if (!PyBytes_Check(b))
        return NO;
    return put(st, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
}

/* A container's head, written once its item count is known: ``at`` is where its one
 * reserved byte is; a head longer than a byte moves the items up. */
static int
close_container(St *st, Py_ssize_t at, int major, uint64_t count)
{
    int n = head_len(count);
    if (n > 1) {
        if (grow(st, n - 1) < 0)
            return NO;
        memmove(st->buf + at + n, st->buf + at + 1, (size_t)(st->len - at - 1));
        st->len += n - 1;
    }
    write_head(st->buf + at, major, count);
    return OK;
}

static void
skip_ws(St *st)
{
    while (st->p < st->end &&
           (*st->p == ' ' || *st->p == '\t' || *st->p == '\n' || *st->p == '\r'))
        st->p++;
}

static int
hex4(const unsigned char *p, unsigned int *out)
{
    unsigned int v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned int)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned int)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned int)(c - 'A' + 10);
        else
            return NO;
    }
    *out = v;
    return OK;
}

/* A JSON string at st->p (the opening quote) as a new str, or NULL: not taken (no
 * Python error set) or an error (set). */
static PyObject *
parse_string(St *st)
{
    const unsigned char *p = st->p + 1, *end = st->end, *start = p;
    while (p < end && *p != '"' && *p != '\\' && *p >= 0x20)
        p++;
    if (p >= end || *p < 0x20)
        return NULL;
    if (*p == '"') {
        PyObject *s = PyUnicode_DecodeUTF8((const char *)start, p - start, "strict");
        if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            PyErr_Clear();
        st->p = p + 1;
        return s;
    }
    /* escapes: the UTF-8 of the string, built in a scratch buffer */
    Py_ssize_t cap = (end - start) + 4, n = p - start;
    unsigned char *tmp = PyMem_Malloc((size_t)cap);
    if (tmp == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(tmp, start, (size_t)n);
    while (p < end) {
        unsigned char c = *p;
        if (c == '"')
            break;
        if (c < 0x20)
            goto no;
        if (c != '\\') {
            tmp[n++] = c;
            p++;
            continue;
        }
        if (p + 1 >= end)
            goto no;
        c = p[1];
        p += 2;
        unsigned char simple = 0;
        switch (c) {
        case '"': simple = '"'; break;
        case '\\': simple = '\\'; break;
        case '/': simple = '/'; break;
        case 'b': simple = '\b'; break;
        case 'f': simple = '\f'; break;
        case 'n': simple = '\n'; break;
        case 'r': simple = '\r'; break;
        case 't': simple = '\t'; break;
        case 'u': break;
        default: goto no;
        }
        if (c != 'u') {
            tmp[n++] = simple;
            continue;
        }
        unsigned int cp, lo;
        if (end - p < 4 || hex4(p, &cp) < 0)
            goto no;
        p += 4;
        if (cp >= 0xDC00 && cp <= 0xDFFF)
            goto no; /* a lone low surrogate */
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            /* json combines a high and a low surrogate; anything else is lone */
            if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, &lo) < 0 ||
                lo < 0xDC00 || lo > 0xDFFF)
                goto no;
            p += 6;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        if (cp < 0x80) {
            tmp[n++] = (unsigned char)cp;
        } else if (cp < 0x800) {
            tmp[n++] = (unsigned char)(0xC0 | (cp >> 6));
            tmp[n++] = (unsigned char)(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            tmp[n++] = (unsigned char)(0xE0 | (cp >> 12));
            tmp[n++] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
            tmp[n++] = (unsigned char)(0x80 | (cp & 0x3F));
        } else {
            tmp[n++] = (unsigned char)(0xF0 | (cp >> 18));
            tmp[n++] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
            tmp[n++] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
            tmp[n++] = (unsigned char)(0x80 | (cp & 0x3F));
        }
    }
    if (p >= end)
        goto no;
    {
        PyObject *s = PyUnicode_DecodeUTF8((const char *)tmp, n, "strict");
        if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            PyErr_Clear();
        PyMem_Free(tmp);
        st->p = p + 1;
        return s;
    }
no:
    PyMem_Free(tmp);
    return NULL;
}

/* _Encoder.string(s) without references: the value table, "", the string cache, then
 * the Python encoder (which fills the cache) */
static int
emit_string(St *st, PyObject *s)
{
    PyObject *enc = PyDict_GetItemWithError(st->value_bytes, s);
    if (enc != NULL)
        return put_bytes_obj(st, enc);
    if (PyErr_Occurred())
        return NO;
    if (PyUnicode_GET_LENGTH(s) == 0) {
        unsigned char empty = 0x60;
        return put(st, &empty, 1);
    }
    enc = PyDict_GetItemWithError(st->cache, s);
    if (enc != NULL)
        return put_bytes_obj(st, enc);
    if (PyErr_Occurred())
        return NO;
    PyObject *fresh = PyObject_CallOneArg(st->miss, s);
    if (fresh == NULL)
        return NO;
    int r = put_bytes_obj(st, fresh);
    Py_DECREF(fresh);
    return r;
}

/* _Encoder.integer: a non-negative ``mag`` (negative: -1 - value = mag - 1) */
static int
emit_integer(St *st, int negative, uint64_t mag)
{
    if (negative) {
        if (mag == 0)
            return put_head(st, 0, 0); /* "-0" is the int 0 */
        return put_head(st, 1, mag - 1);
    }
    if (mag >= TS_LOW) {
        int had = st->have_prev;
        uint64_t prev = st->prev_big;
        st->have_prev = 1;
        st->prev_big = mag;
        if (had) {
            if (mag >= prev && mag - prev < TS_LOW) {
                if (put_head(st, 6, TAG_TS_DELTA) < 0)
                    return NO;
                return put_head(st, 0, mag - prev);
            }
            if (mag < prev && prev - mag < TS_LOW) {
                if (put_head(st, 6, TAG_TS_DELTA) < 0)
                    return NO;
                return put_head(st, 1, prev - mag - 1);
            }
        }
    }
    return put_head(st, 0, mag);
}

static int
parse_number(St *st)
{
    const unsigned char *p = st->p, *end = st->end;
    int negative = 0;
    if (*p == '-') {
        negative = 1;
        p++;
    }
    if (p >= end || *p < '0' || *p > '9')
        return NO;
    uint64_t mag = 0;
    if (*p == '0') {
        p++;
    } else {
        while (p < end && *p >= '0' && *p <= '9') {
            unsigned int d = (unsigned int)(*p - '0');
            if (mag > (UINT64_MAX - d) / 10)
                return NO; /* 2**64 and over: bignums, the reference path's */
            mag = mag * 10 + d;
            p++;
        }
    }
    if (p < end && (*p == '.' || *p == 'e' || *p == 'E'))
        return NO; /* a float */
    st->p = p;
    return emit_integer(st, negative, mag);
}

/* After an item of a container closed by ``close``: 1 if another item follows (after
 * a comma), 0 if the container ended, NO if neither (not JSON). */
static int
after_item(St *st, unsigned char close)
{
    skip_ws(st);
    if (st->p >= st->end)
        return NO;
    if (*st->p == ',') {
        st->p++;
        return 1;
    }
    if (*st->p != close)
        return NO;
    st->p++;
    return 0;
}

static int parse_value(St *st, int depth);

static int
parse_object(St *st, int depth)
{
    if (depth >= MAX_DEPTH)
        return NO;
    st->p++; /* { */
    if (grow(st, 1) < 0)
        return NO;
    Py_ssize_t at = st->len++;
    uint64_t count = 0;
    PyObject *seen = NULL;
    PyObject *first = NULL;
    int r = NO;
    skip_ws(st);
    if (st->p < st->end && *st->p == '}') {
        st->p++;
        r = close_container(st, at, 5, 0);
        goto done;
    }
    for (;;) {
        skip_ws(st);
        if (st->p >= st->end || *st->p != '"')
            goto done;
        PyObject *k = parse_string(st);
        if (k == NULL)
            goto done;
        /* a duplicate key: the first is kept for comparison, a set made at the second */
        if (count == 0) {
            first = k;
            Py_INCREF(first);
        } else {
            if (seen == NULL) {
                int eq = PyUnicode_Compare(first, k) == 0;
                if (eq || PyErr_Occurred()) {
                    Py_DECREF(k);
                    goto done;
                }
                seen = PySet_New(NULL);
                if (seen == NULL || PySet_Add(seen, first) < 0) {
                    Py_DECREF(k);
                    goto done;
                }
            } else {
                int has = PySet_Contains(seen, k);
                if (has != 0) {
                    Py_DECREF(k);
                    goto done;
                }
            }
            if (PySet_Add(seen, k) < 0) {
                Py_DECREF(k);
                goto done;
            }
        }
        int is_hashes = PyUnicode_Compare(k, S_HASHES) == 0;
        if (is_hashes) {
            Py_DECREF(k);
            goto done; /* maybe a derived content hash: the reference path's */
        }
        PyObject *kb = PyDict_GetItemWithError(st->key_bytes, k);
        int w;
        if (kb != NULL)
            w = put_bytes_obj(st, kb);
        else if (PyErr_Occurred())
            w = NO;
        else
            w = emit_string(st, k);
        Py_DECREF(k);
        if (w < 0)
            goto done;
        skip_ws(st);
        if (st->p >= st->end || *st->p != ':')
            goto done;
        st->p++;
        skip_ws(st);
        if (parse_value(st, depth + 1) < 0)
            goto done;
        count++;
        int more = after_item(st, '}');
        if (more < 0)
            goto done;
        if (!more)
            break;
    }
    r = close_container(st, at, 5, count);
done:
    Py_XDECREF(seen);
    Py_XDECREF(first);
    return r;
}

static int
parse_array(St *st, int depth)
{
    if (depth >= MAX_DEPTH)
        return NO;
    st->p++; /* [ */
    if (grow(st, 1) < 0)
        return NO;
    Py_ssize_t at = st->len++;
    uint64_t count = 0;
    skip_ws(st);
    if (st->p < st->end && *st->p == ']') {
        st->p++;
        return close_container(st, at, 4, 0);
    }
    for (;;) {
        skip_ws(st);
        if (st->p >= st->end)
            return NO;
        if (count == 0 && *st->p == '"') {
            PyObject *s = parse_string(st);
            if (s == NULL)
                return NO;
            if (PyUnicode_GET_LENGTH(s) == 44 && PyUnicode_READ_CHAR(s, 0) == '$') {
                Py_DECREF(s);
                return NO; /* maybe an event id list: the reference path's */
            }
            int w = emit_string(st, s);
            Py_DECREF(s);
            if (w < 0)
                return NO;
        } else if (parse_value(st, depth + 1) < 0) {
            return NO;
        }
        count++;
        int more = after_item(st, ']');
        if (more < 0)
            return NO;
        if (!more)
            break;
    }
    return close_container(st, at, 4, count);
}

static int
literal(St *st, const char *word, unsigned char cbor)
{
    size_t n = strlen(word);
    if ((size_t)(st->end - st->p) < n || memcmp(st->p, word, n) != 0)
        return NO;
    st->p += n;
    return put(st, &cbor, 1);
}

static int
parse_value(St *st, int depth)
{
    if (st->p >= st->end)
        return NO;
    switch (*st->p) {
    case '{':
        return parse_object(st, depth);
    case '[':
        return parse_array(st, depth);
    case '"': {
        PyObject *s = parse_string(st);
        if (s == NULL)
            return NO;
        int w = emit_string(st, s);
        Py_DECREF(s);
        return w;
    }
    case 't':
        return literal(st, "true", 0xF5);
    case 'f':
        return literal(st, "false", 0xF4);
    case 'n':
        return literal(st, "null", 0xF6);
    default:
        return parse_number(st);
    }
}

/* transcode(body, key_bytes, value_bytes, cache, miss) -> bytes | None */
static PyObject *
transcode(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyBytes_Check(args[0]) || !PyDict_Check(args[1]) ||
        !PyDict_Check(args[2]) || !PyDict_Check(args[3]) || !PyCallable_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "transcode(body: bytes, key_bytes: dict, value_bytes: dict, "
                        "cache: dict, miss: callable)");
        return NULL;
    }
    St st;
    st.p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    st.end = st.p + PyBytes_GET_SIZE(args[0]);
    st.cap = PyBytes_GET_SIZE(args[0]) + 64;
    st.len = 0;
    st.buf = PyMem_Malloc((size_t)st.cap);
    if (st.buf == NULL)
        return PyErr_NoMemory();
    st.key_bytes = args[1];
    st.value_bytes = args[2];
    st.cache = args[3];
    st.miss = args[4];
    st.have_prev = 0;
    st.prev_big = 0;
    skip_ws(&st);
    int r = parse_value(&st, 0);
    if (r == OK) {
        skip_ws(&st);
        if (st.p != st.end)
            r = NO;
    }
    PyObject *out;
    if (r == OK) {
        out = PyBytes_FromStringAndSize((const char *)st.buf, st.len);
    } else if (PyErr_Occurred() && PyErr_ExceptionMatches(PyExc_MemoryError)) {
        out = NULL;
    } else {
        PyErr_Clear(); /* the reference path gives the answer or the error */
        Py_INCREF(Py_None);
        out = Py_None;
    }
    PyMem_Free(st.buf);
    return out;
}

static PyMethodDef methods[] = {
    {"transcode", (PyCFunction)(void (*)(void))transcode, METH_FASTCALL,
     "transcode(body, key_bytes, value_bytes, cache, miss) -> the profile CBOR of the JSON "
     "body (as body_encode._encode_cbor of parse_json_exact), or None: not taken"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_cenc", "The body codec's JSON-to-CBOR transcoder (see the source).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__cenc(void)
{
    if (S_HASHES == NULL) {
        S_HASHES = PyUnicode_InternFromString("hashes");
        if (S_HASHES == NULL)
            return NULL;
    }
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "TAG_TS_DELTA", TAG_TS_DELTA) < 0 ||
        PyModule_AddIntConstant(m, "MAX_DEPTH", MAX_DEPTH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
