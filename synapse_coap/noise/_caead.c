/* The Noise record path's ChaCha20-Poly1305 (RFC 8439, the IETF construction: a 96-bit
 * nonce, the 16-byte tag after the ciphertext) through libsodium.
 *
 * Part of the native build (synapse_coap/native.py, built by `synapse-coap
 * build-native`, which links it with libsodium: Debian's libsodium-dev, which
 * scripts/setup installs); used by synapse_coap/noise/records.py (aead_for) for every
 * record sealed and opened, in place of cryptography's ChaCha20Poly1305 object, which
 * the plain-Python sources (and a build without this module) keep using.
 *
 * Same construction, same bytes: seal(key, nonce, plaintext, ad) is
 * ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad), and open() its decrypt(), with
 * None for a record that does not authenticate (cryptography raises InvalidTag).  Why:
 * in the homeserver each record went through cryptography's binding (argument
 * extraction, an OpenSSL cipher context copied and freed, its allocations) with the
 * CPU's caches cold: with the AEAD left out altogether (an experiment, bench/inbound.py
 * side by side) the small endpoints' CoAP+Noise cost fell by 2-5%.  libsodium's
 * function is one call on the caller's buffers.
 *
 * Nothing is kept between calls: no key schedule (ChaCha20 has none worth keeping), no
 * state.  The nonce is the caller's (records.nonce: the packet number; never reused
 * under one key, as before).
 *
 * Tests: tests/unit/test_caead.py (RFC 8439's AEAD vector, the same bytes as
 * cryptography's on hypothesis inputs, every tampered byte refused).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sodium.h>

#define KEY_BYTES crypto_aead_chacha20poly1305_ietf_KEYBYTES
#define NONCE_BYTES crypto_aead_chacha20poly1305_ietf_NPUBBYTES
#define TAG_BYTES crypto_aead_chacha20poly1305_ietf_ABYTES

static void
release(Py_buffer *key, Py_buffer *nonce, Py_buffer *data, Py_buffer *ad)
{
    PyBuffer_Release(key);
    PyBuffer_Release(nonce);
    PyBuffer_Release(data);
    PyBuffer_Release(ad);
}

/* the four arguments as buffers: key (32 bytes), nonce (12), data, ad */
static int
buffers(PyObject *const *args, Py_ssize_t nargs, Py_buffer *key, Py_buffer *nonce,
        Py_buffer *data, Py_buffer *ad, const char *name)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "%s(key, nonce, data, ad) takes 4 arguments", name);
        return -1;
    }
    Py_buffer *views[4] = {key, nonce, data, ad};
    for (int i = 0; i < 4; i++) {
        if (PyObject_GetBuffer(args[i], views[i], PyBUF_SIMPLE) < 0) {
            for (int j = 0; j < i; j++)
                PyBuffer_Release(views[j]);
            return -1;
        }
    }
    if (key->len != KEY_BYTES || nonce->len != NONCE_BYTES) {
        PyErr_Format(PyExc_ValueError, "%s: the key is %d bytes and the nonce %d", name,
                     (int)KEY_BYTES, (int)NONCE_BYTES);
        release(key, nonce, data, ad);
        return -1;
    }
    return 0;
}

/* seal (sealing: ciphertext + tag of a plaintext) or open (the plaintext of a
 * ciphertext + tag, or None if it does not authenticate: too short, or a tag that does
 * not match; libsodium checks the tag before it writes any plaintext) */
static PyObject *
aead_run(PyObject *const *args, Py_ssize_t nargs, int sealing)
{
    Py_buffer key, nonce, data, ad;
    if (buffers(args, nargs, &key, &nonce, &data, &ad, sealing ? "seal" : "open") < 0)
        return NULL;
    PyObject *out = NULL;
    const unsigned char *in = (const unsigned char *)data.buf;
    const unsigned char *a = (const unsigned char *)ad.buf;
    const unsigned char *n = (const unsigned char *)nonce.buf;
    const unsigned char *k = (const unsigned char *)key.buf;
    unsigned long long written = 0;
    if (sealing) {
        if ((size_t)data.len > crypto_aead_chacha20poly1305_ietf_MESSAGEBYTES_MAX ||
            data.len > PY_SSIZE_T_MAX - TAG_BYTES) {
            PyErr_SetString(PyExc_OverflowError, "seal: plaintext too long");
            goto done;
        }
        out = PyBytes_FromStringAndSize(NULL, data.len + TAG_BYTES);
        if (out == NULL)
            goto done;
        crypto_aead_chacha20poly1305_ietf_encrypt(
            (unsigned char *)PyBytes_AS_STRING(out), &written, in, (unsigned long long)data.len,
            a, (unsigned long long)ad.len, NULL, n, k);
        if (written != (unsigned long long)(data.len + TAG_BYTES)) { /* (never: its contract) */
            Py_CLEAR(out);
            PyErr_SetString(PyExc_RuntimeError, "seal: unexpected ciphertext length");
        }
        goto done;
    }
    if (data.len >= TAG_BYTES) {
        out = PyBytes_FromStringAndSize(NULL, data.len - TAG_BYTES);
        if (out == NULL)
            goto done;
        if (crypto_aead_chacha20poly1305_ietf_decrypt(
                (unsigned char *)PyBytes_AS_STRING(out), &written, NULL, in,
                (unsigned long long)data.len, a, (unsigned long long)ad.len, n, k) == 0 &&
            written == (unsigned long long)(data.len - TAG_BYTES))
            goto done;
        Py_DECREF(out);
    }
    out = Py_None;
    Py_INCREF(out);
done:
    release(&key, &nonce, &data, &ad);
    return out;
}

/* seal(key, nonce, plaintext, ad) -> ciphertext + tag */
static PyObject *
seal(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    return aead_run(args, nargs, 1);
}

/* open(key, nonce, ciphertext + tag, ad) -> plaintext, or None if it does not authenticate */
static PyObject *
open_(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    return aead_run(args, nargs, 0);
}

static PyMethodDef methods[] = {
    {"seal", (PyCFunction)(void (*)(void))seal, METH_FASTCALL,
     "seal(key, nonce, plaintext, ad) -> ciphertext + 16-byte tag (ChaCha20-Poly1305, "
     "RFC 8439)"},
    {"open", (PyCFunction)(void (*)(void))open_, METH_FASTCALL,
     "open(key, nonce, ciphertext + tag, ad) -> plaintext, or None if it does not "
     "authenticate"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_caead",
    "The Noise record path's ChaCha20-Poly1305 through libsodium (see the source).", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__caead(void)
{
    if (sodium_init() < 0) {
        PyErr_SetString(PyExc_ImportError, "_caead: libsodium could not be initialised");
        return NULL;
    }
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "TAG_BYTES", TAG_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
