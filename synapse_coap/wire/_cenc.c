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
 *
 * The module also holds response_ids (at the end): an answer's identifiers for the
 * session string table (wire/strings.py), from the same kind of pass over the text.
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

/* past JSON's whitespace from p (shared with response_ids' scan) */
static const unsigned char *
past_ws(const unsigned char *p, const unsigned char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static void
skip_ws(St *st)
{
    st->p = past_ws(st->p, st->end);
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

/* the character of JSON's two-character escape ``\c``, or 0: not one (``\u`` neither).
 * Shared with response_ids' scan. */
static unsigned char
simple_escape(unsigned char c)
{
    switch (c) {
    case '"': return '"';
    case '\\': return '\\';
    case '/': return '/';
    case 'b': return '\b';
    case 'f': return '\f';
    case 'n': return '\n';
    case 'r': return '\r';
    case 't': return '\t';
    default: return 0;
    }
}

/* Short ASCII strings seen before, as the str objects made for them: an answer's keys
 * and values repeat from one answer to the next (/versions' feature names, "user_id",
 * "m.room.message"), and a str from this table needs no UTF-8 decoding, allocation or
 * hashing (a str keeps its hash), which in the homeserver were most of the
 * transcoder's time. Direct-mapped on an FNV-1a hash of the bytes: a slot holds the
 * last string that hashed to it (a strong reference); any str with those exact bytes
 * is interchangeable with it. Bounded: INTERN_SLOTS strings of INTERN_MAX_LEN bytes at
 * most. Used with the GIL held. */
#define INTERN_SLOTS 1024
#define INTERN_MAX_LEN 64
static PyObject *interned[INTERN_SLOTS];

static PyObject *
ascii_str(const unsigned char *start, Py_ssize_t n, uint32_t hash)
{
    PyObject **slot = &interned[hash & (INTERN_SLOTS - 1)];
    PyObject *s = *slot;
    if (s != NULL && PyUnicode_GET_LENGTH(s) == n &&
        memcmp(PyUnicode_DATA(s), start, (size_t)n) == 0) {
        Py_INCREF(s);
        return s;
    }
    s = PyUnicode_FromStringAndSize((const char *)start, n);
    if (s == NULL)
        return NULL;
    Py_INCREF(s);
    Py_XSETREF(*slot, s);
    return s;
}

/* A JSON string at st->p (the opening quote) as a new str, or NULL: not taken (no
 * Python error set) or an error (set). */
static PyObject *
parse_string(St *st)
{
    const unsigned char *p = st->p + 1, *end = st->end, *start = p;
    uint32_t hash = 2166136261u, high = 0;
    while (p < end && *p != '"' && *p != '\\' && *p >= 0x20) {
        hash = (hash ^ *p) * 16777619u;
        high |= *p;
        p++;
    }
    if (p >= end || *p < 0x20)
        return NULL;
    if (*p == '"') {
        PyObject *s;
        if (high < 0x80 && p - start <= INTERN_MAX_LEN)
            s = ascii_str(start, p - start, hash);
        else
            s = PyUnicode_DecodeUTF8((const char *)start, p - start, "strict");
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
        if (c != 'u') {
            unsigned char simple = simple_escape(c);
            if (simple == 0)
                goto no;
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

/* past the whitespace and the comma or ``close`` after a container's item at *pp: 1 if
 * another item follows (after the comma), 0 if the container ended, NO if neither (not
 * JSON). Shared with response_ids' scan. */
static int
next_item(const unsigned char **pp, const unsigned char *end, unsigned char close)
{
    const unsigned char *p = past_ws(*pp, end);
    if (p >= end || (*p != ',' && *p != close))
        return NO;
    *pp = p + 1;
    return *p == ',';
}

static int
after_item(St *st, unsigned char close)
{
    return next_item(&st->p, st->end, close);
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

/* past ``word`` (true, false, null) at *pp: OK, or NO if it is not there. Shared with
 * response_ids' scan. */
static int
past_word(const unsigned char **pp, const unsigned char *end, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(end - *pp) < n || memcmp(*pp, word, n) != 0)
        return NO;
    *pp += n;
    return OK;
}

static int
literal(St *st, const char *word, unsigned char cbor)
{
    if (past_word(&st->p, st->end, word) < 0)
        return NO;
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

/* ------------------------------------------------------------------------------------
 * response_ids(body, limit): strings.response_identifiers in one pass over the JSON
 * text, without building the value.
 *
 * Every 2xx JSON answer on a session with a string table has its room and event ids
 * recorded (wire/strings.py): in Python that is json.loads of the whole answer and a
 * walk over every string of it, some 8 us for server keys and 21 us for /versions in
 * a loop (more than the answer's encoding), and more with the caches cold in the
 * homeserver.  This scan checks the JSON grammar, looks at every string (map keys
 * too, each before its value, document order) and keeps the 44-character "$"/"!"
 * hash ids, as _is_hash_id tells them, the first `limit` distinct rooms and events.
 *
 * It gives the reference's tuple, (rooms + events)[:limit], for what it takes, and
 * None for the rest, where the caller runs the reference (which then gives the tuple
 * or ()): anything that is not strict JSON (NaN, Infinity, trailing bytes, a BOM,
 * invalid UTF-8 after the "surrogatepass" decoding json.loads uses), a duplicate key
 * (json.loads keeps the last value), a key with an escape, a string of 44 or more
 * bytes with a \u escape (it might decode to an id), an integer of more than 4000
 * digits (Python's int limit), nesting past IDS_MAX_DEPTH.  A string with other
 * escapes only holds a character no id has, so it is no id.
 * Tests: tests/unit/test_cids.py (the reference on the corpora, golden bodies,
 * hypothesis: values, whitespace and mutated bytes).
 */
#define IDS_MAX_DEPTH 200
#define IDS_MAX_LIMIT 64
#define ID_LEN 44
#define IDS_INLINE_KEYS 32

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
    int nonascii;
    int limit;
    int n_rooms, n_events;
    const unsigned char *rooms[IDS_MAX_LIMIT];
    const unsigned char *events[IDS_MAX_LIMIT];
} Ids;

typedef struct {
    const unsigned char *s;
    Py_ssize_t n;
} Span;

/* the value of a base64url character, or -1 */
static int
b64url(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

static void
ids_ws(Ids *st)
{
    st->p = past_ws(st->p, st->end);
}

/* a string at st->p (its opening quote): its raw bytes between the quotes, whether they
 * hold an escape and a \u escape; NO if json.loads would not take it */
static int
ids_string(Ids *st, Span *raw, int *escaped, int *unicode)
{
    const unsigned char *p = st->p + 1, *end = st->end;
    *escaped = 0;
    *unicode = 0;
    raw->s = p;
    for (;;) {
        if (p >= end)
            return NO;
        unsigned char c = *p;
        if (c == '"')
            break;
        if (c < 0x20)
            return NO;
        if (c >= 0x80) {
            st->nonascii = 1;
            p++;
            continue;
        }
        if (c != '\\') {
            p++;
            continue;
        }
        *escaped = 1;
        if (p + 1 >= end)
            return NO;
        c = p[1];
        if (c == 'u') {
            unsigned int cp;
            if (end - p < 6 || hex4(p + 2, &cp) < 0)
                return NO;
            *unicode = 1;
            p += 6;
            continue;
        }
        if (simple_escape(c) == 0)
            return NO;
        p += 2;
    }
    raw->n = p - raw->s;
    st->p = p + 1;
    return OK;
}

/* _is_hash_id of a string's raw bytes, and its place among the rooms or events kept */
static int
ids_consider(Ids *st, const Span *raw, int escaped, int unicode)
{
    if (raw->n < ID_LEN)
        return OK;
    if (unicode)
        return NO; /* it might decode to an id: the reference decides */
    if (escaped || raw->n != ID_LEN)
        return OK; /* holds a character no id has, or is too long */
    const unsigned char *s = raw->s;
    if (s[0] != '$' && s[0] != '!')
        return OK;
    for (int i = 1; i < ID_LEN; i++)
        if (b64url(s[i]) < 0)
            return OK;
    /* 43 characters, 32 bytes: the last one's two low bits are not data (canonical) */
    if (b64url(s[ID_LEN - 1]) & 3)
        return OK;
    int room = s[0] == '!';
    const unsigned char **kept = room ? st->rooms : st->events;
    int *count = room ? &st->n_rooms : &st->n_events;
    if (*count >= st->limit)
        return OK;
    for (int i = 0; i < *count; i++)
        if (memcmp(kept[i], s, ID_LEN) == 0)
            return OK;
    kept[(*count)++] = s;
    return OK;
}

static uint64_t
span_hash(const Span *k)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (Py_ssize_t i = 0; i < k->n; i++) {
        h ^= k->s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* a set of an object's keys (raw bytes; keys with escapes are not taken): a few in a
 * list, more in an open-addressing table */
typedef struct {
    Span inline_keys[IDS_INLINE_KEYS];
    Py_ssize_t count;
    Span *table; /* NULL, or `cap` slots (s == NULL: free) */
    Py_ssize_t cap;
} KeySet;

static int
keyset_put(KeySet *ks, const Span *k, int *dup);

static int
keyset_grow(KeySet *ks)
{
    Py_ssize_t cap = ks->cap ? ks->cap * 2 : 4 * IDS_INLINE_KEYS;
    Span *old = ks->table;
    Py_ssize_t old_cap = ks->cap;
    Span *t = PyMem_Calloc((size_t)cap, sizeof(Span));
    if (t == NULL) {
        PyErr_NoMemory();
        return NO;
    }
    ks->table = t;
    ks->cap = cap;
    ks->count = 0;
    int dup;
    if (old == NULL) {
        for (Py_ssize_t i = 0; i < IDS_INLINE_KEYS; i++)
            keyset_put(ks, &ks->inline_keys[i], &dup);
    } else {
        for (Py_ssize_t i = 0; i < old_cap; i++)
            if (old[i].s != NULL)
                keyset_put(ks, &old[i], &dup);
        PyMem_Free(old);
    }
    return OK;
}

/* adds `k`; *dup: it was there already */
static int
keyset_put(KeySet *ks, const Span *k, int *dup)
{
    *dup = 0;
    if (ks->table == NULL) {
        for (Py_ssize_t i = 0; i < ks->count; i++)
            if (ks->inline_keys[i].n == k->n && memcmp(ks->inline_keys[i].s, k->s, k->n) == 0) {
                *dup = 1;
                return OK;
            }
        if (ks->count < IDS_INLINE_KEYS) {
            ks->inline_keys[ks->count++] = *k;
            return OK;
        }
        if (keyset_grow(ks) < 0)
            return NO;
    } else if (2 * (ks->count + 1) > ks->cap && keyset_grow(ks) < 0) {
        return NO;
    }
    Py_ssize_t mask = ks->cap - 1, i = (Py_ssize_t)(span_hash(k) & (uint64_t)mask);
    while (ks->table[i].s != NULL) {
        if (ks->table[i].n == k->n && memcmp(ks->table[i].s, k->s, k->n) == 0) {
            *dup = 1;
            return OK;
        }
        i = (i + 1) & mask;
    }
    ks->table[i] = *k;
    ks->count++;
    return OK;
}

static int ids_value(Ids *st, int depth);

static int
ids_object(Ids *st, int depth)
{
    st->p++; /* { */
    ids_ws(st);
    if (st->p < st->end && *st->p == '}') {
        st->p++;
        return OK;
    }
    KeySet ks;
    ks.count = 0;
    ks.table = NULL;
    ks.cap = 0;
    int r = NO;
    for (;;) {
        if (st->p >= st->end || *st->p != '"')
            goto done;
        Span key;
        int escaped, unicode, dup;
        if (ids_string(st, &key, &escaped, &unicode) < 0 || escaped)
            goto done; /* (a key with an escape: duplicates only the reference can tell) */
        if (keyset_put(&ks, &key, &dup) < 0 || dup)
            goto done;
        if (ids_consider(st, &key, 0, 0) < 0)
            goto done;
        ids_ws(st);
        if (st->p >= st->end || *st->p != ':')
            goto done;
        st->p++;
        ids_ws(st);
        if (ids_value(st, depth + 1) < 0)
            goto done;
        int more = next_item(&st->p, st->end, '}');
        if (more <= 0) {
            r = more;
            goto done;
        }
        ids_ws(st);
    }
done:
    PyMem_Free(ks.table);
    return r;
}

static int
ids_array(Ids *st, int depth)
{
    st->p++; /* [ */
    ids_ws(st);
    if (st->p < st->end && *st->p == ']') {
        st->p++;
        return OK;
    }
    for (;;) {
        if (ids_value(st, depth + 1) < 0)
            return NO;
        int more = next_item(&st->p, st->end, ']');
        if (more <= 0)
            return more; /* OK (0): the array ended */
        ids_ws(st);
    }
}

/* json's NUMBER_RE: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)? */
static int
ids_number(Ids *st)
{
    const unsigned char *p = st->p, *end = st->end;
    if (p < end && *p == '-')
        p++;
    const unsigned char *digits = p;
    if (p < end && *p == '0') {
        p++;
    } else if (p < end && *p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    } else {
        return NO; /* (-Infinity, or not a number) */
    }
    int integer = 1;
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9')
            return NO;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
        integer = 0;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || *p < '0' || *p > '9')
            return NO;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
        integer = 0;
    }
    if (integer && p - digits > 4000)
        return NO; /* past Python's int limit (4300 digits), the reference's ValueError */
    st->p = p;
    return OK;
}

static int
ids_value(Ids *st, int depth)
{
    if (depth >= IDS_MAX_DEPTH || st->p >= st->end)
        return NO;
    switch (*st->p) {
    case '{':
        return ids_object(st, depth);
    case '[':
        return ids_array(st, depth);
    case '"': {
        Span s;
        int escaped, unicode;
        if (ids_string(st, &s, &escaped, &unicode) < 0)
            return NO;
        return ids_consider(st, &s, escaped, unicode);
    }
    case 't':
        return past_word(&st->p, st->end, "true");
    case 'f':
        return past_word(&st->p, st->end, "false");
    case 'n':
        return past_word(&st->p, st->end, "null");
    default:
        return ids_number(st);
    }
}

/* response_ids(body, limit) -> (rooms + events)[:limit] as a tuple of str, or None */
static PyObject *
response_ids(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "response_ids(body: bytes, limit: int)");
        return NULL;
    }
    long limit = PyLong_AsLong(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    if (limit < 0 || limit > IDS_MAX_LIMIT) {
        PyErr_Format(PyExc_ValueError, "response_ids: limit %ld (allowed: 0-%d)", limit,
                     IDS_MAX_LIMIT);
        return NULL;
    }
    Ids st;
    st.p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    st.end = st.p + PyBytes_GET_SIZE(args[0]);
    st.nonascii = 0;
    st.limit = (int)limit;
    st.n_rooms = 0;
    st.n_events = 0;
    ids_ws(&st);
    int r = ids_value(&st, 0);
    if (r == OK) {
        ids_ws(&st);
        if (st.p != st.end)
            r = NO;
    }
    if (r == OK && st.nonascii) {
        /* json.loads decodes bytes as UTF-8 with "surrogatepass" before it parses */
        PyObject *text = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(args[0]),
                                              PyBytes_GET_SIZE(args[0]), "surrogatepass");
        if (text == NULL)
            r = NO;
        Py_XDECREF(text);
    }
    if (r != OK) {
        if (PyErr_Occurred() && PyErr_ExceptionMatches(PyExc_MemoryError))
            return NULL;
        PyErr_Clear(); /* the reference gives the answer */
        Py_RETURN_NONE;
    }
    int n = st.n_rooms + st.n_events;
    if (n > st.limit)
        n = st.limit;
    PyObject *out = PyTuple_New(n);
    if (out == NULL)
        return NULL;
    for (int i = 0; i < n; i++) {
        const unsigned char *s = i < st.n_rooms ? st.rooms[i] : st.events[i - st.n_rooms];
        PyObject *item = PyUnicode_DecodeASCII((const char *)s, ID_LEN, NULL);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, item);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"transcode", (PyCFunction)(void (*)(void))transcode, METH_FASTCALL,
     "transcode(body, key_bytes, value_bytes, cache, miss) -> the profile CBOR of the JSON "
     "body (as body_encode._encode_cbor of parse_json_exact), or None: not taken"},
    {"response_ids", (PyCFunction)(void (*)(void))response_ids, METH_FASTCALL,
     "response_ids(body, limit) -> strings.response_identifiers(body) (at most limit, "
     "0-64), or None: not taken"},
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
