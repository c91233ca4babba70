/*
 * The arguments of Engine.install, checked, with errors that name the field, the value and the fix
 * (the style of ipsecstack.errors.ConfigError): CPython-facing helpers of _engine.c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "engine.h"
#include "pyglue.h"

static int bad_value(const char *field, PyObject *value, const char *fix)
{
    PyErr_Format(PyExc_ValueError, "%s = %R: %s", field, value, fix);
    return -1;
}

static int get_u64(PyObject *o, const char *field, uint64_t lo, uint64_t hi, const char *fix, uint64_t *out)
{
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.50s", field, Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    uint64_t u;
    if (overflow > 0) {
        u = PyLong_AsUnsignedLongLong(o);
        if (PyErr_Occurred()) {
            PyErr_Clear();
            return bad_value(field, o, fix);
        }
    } else if (overflow < 0 || v < 0) {
        return bad_value(field, o, fix);
    } else {
        u = (uint64_t)v;
    }
    if (u < lo || u > hi)
        return bad_value(field, o, fix);
    *out = u;
    return 0;
}

static int get_limit(PyObject *o, const char *field, uint64_t *out)
{
    if (o == Py_None) {
        *out = IPS_NO_LIMIT;
        return 0;
    }
    return get_u64(o, field, 0, IPS_NO_LIMIT - 1, "give a count >= 0, or None for no limit", out);
}

int ips_get_dir(const char *s, uint8_t *dir)
{
    if (strcmp(s, "in") == 0)
        *dir = IPS_IN;
    else if (strcmp(s, "out") == 0)
        *dir = IPS_OUT;
    else {
        PyErr_Format(PyExc_ValueError, "direction = '%s': use 'in' or 'out'", s);
        return -1;
    }
    return 0;
}

int ips_get_spi(PyObject *o, uint32_t *spi)
{
    uint64_t v;
    if (get_u64(o, "spi", 1, 0xFFFFFFFFu, "use 1..4294967295; SPI 0 is reserved (RFC 4303 §2.1)", &v) != 0)
        return -1;
    *spi = (uint32_t)v;
    return 0;
}

/* A packed IPv4 (4 bytes) or IPv6 (16 bytes) address; returns its IP version or -1. */
static int get_addr(PyObject *o, const char *field, uint8_t out[16])
{
    if (!PyBytes_Check(o) || (PyBytes_GET_SIZE(o) != 4 && PyBytes_GET_SIZE(o) != 16))
        return bad_value(field, o, "give the packed address: 4 bytes (IPv4) or 16 bytes (IPv6)");
    memcpy(out, PyBytes_AS_STRING(o), (size_t)PyBytes_GET_SIZE(o));
    return PyBytes_GET_SIZE(o) == 4 ? 4 : 6;
}

static int get_encap(PyObject *o, ips_sa_params *p)
{
    uint64_t sport, dport;
    p->udp = 0;
    if (o == Py_None)
        return 0;
    const char *fix = "give (source_port, destination_port), e.g. (4500, 4500)";
    if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != 2)
        return bad_value("udp_encap", o, fix);
    if (get_u64(PyTuple_GET_ITEM(o, 0), "udp_encap", 1, 65535, fix, &sport) != 0 ||
        get_u64(PyTuple_GET_ITEM(o, 1), "udp_encap", 1, 65535, fix, &dport) != 0)
        return -1;
    p->udp = 1;
    p->sport = (uint16_t)sport;
    p->dport = (uint16_t)dport;
    return 0;
}

static int get_mode(const char *mode, PyObject *src, PyObject *dst, ips_sa_params *p)
{
    if (strcmp(mode, "transport") == 0) {
        p->tunnel = 0;
        return 0;
    }
    if (strcmp(mode, "tunnel") != 0) {
        PyErr_Format(PyExc_ValueError, "mode = '%s': use 'tunnel' or 'transport'", mode);
        return -1;
    }
    p->tunnel = 1;
    if (src == Py_None || dst == Py_None)
        return bad_value(src == Py_None ? "tunnel_src" : "tunnel_dst", Py_None,
                         "tunnel mode needs tunnel_src and tunnel_dst (the gateways' outer addresses)");
    int vs = get_addr(src, "tunnel_src", p->outer_src);
    if (vs < 0)
        return -1;
    int vd = get_addr(dst, "tunnel_dst", p->outer_dst);
    if (vd < 0)
        return -1;
    if (vs != vd)
        return bad_value("tunnel_dst", dst, "tunnel_src and tunnel_dst must be the same IP family");
    p->outer_version = (uint8_t)vs;
    return 0;
}

static int get_header_rules(const char *ecn, const char *df, ips_sa_params *p)
{
    if (strcmp(ecn, "normal") == 0 || strcmp(ecn, "compat") == 0) {
        p->ecn_normal = ecn[0] == 'n';
    } else {
        PyErr_Format(PyExc_ValueError, "ecn = '%s': %s", ecn, "use 'normal' (RFC 6040 §4.1) or 'compat' (RFC 6040 §4.1.2)");
        return -1;
    }
    if (strcmp(df, "copy") == 0)
        p->df_flags = -1;
    else if (strcmp(df, "set") == 0)
        p->df_flags = 0x4000;
    else if (strcmp(df, "clear") == 0)
        p->df_flags = 0;
    else {
        PyErr_Format(PyExc_ValueError, "df = '%s': %s", df, "use 'copy', 'set' or 'clear' (RFC 4301 §8.1)");
        return -1;
    }
    return 0;
}

static const ips_suite *get_suite(const char *transform, Py_ssize_t key_len)
{
    const ips_suite *s = ips_suite_find(transform);
    if (s == NULL) {
        PyErr_Format(PyExc_ValueError, "transform = '%s': the native engine implements ESP with AES-GCM-16, "
                     "ChaCha20-Poly1305, AES-CBC or NULL with HMAC-SHA2 (canonical keywords, see TRANSFORMS)",
                     transform);
        return NULL;
    }
    Py_ssize_t want = s->key_len + s->salt_len + s->integ_key_len;
    if (key_len != want) {
        PyErr_Format(PyExc_ValueError, "key = '<%zd bytes>': %s needs %zd bytes of key material %s", key_len,
                     transform, want, "(cipher key, then salt or integrity key: RFC 7296 §2.17)");
        return NULL;
    }
    return s;
}

static int parse_numbers(PyObject *window, PyObject *seq, PyObject *top, int ttl, PyObject *lim[4],
                         ips_sa_params *p)
{
    uint64_t w, seq_max = p->esn ? UINT64_MAX : 0xFFFFFFFFu;
    if (get_u64(window, "replay_window", 0, 1u << 20, "use 0 (disabled) or 32..1048576; default is 64", &w) != 0)
        return -1;
    if (w > 0 && w < 32)
        return bad_value("replay_window", window, "RFC 4303 §3.4.3 requires at least 32; the default is 64");
    p->replay_window = (uint32_t)w;
    if (get_u64(seq, "seq", 0, seq_max, "the last sequence number sent: 0..2^32-1, or 0..2^64-1 with ESN",
                &p->seq) != 0 ||
        get_u64(top, "replay_top", 0, seq_max, "the highest sequence number received: 0..2^32-1 (2^64-1 with ESN)",
                &p->replay_top) != 0)
        return -1;
    if (ttl < 1 || ttl > 255) {
        PyErr_Format(PyExc_ValueError, "ttl = %d: use 1..255", ttl);
        return -1;
    }
    p->ttl = (uint8_t)ttl;
    if (get_limit(lim[0], "soft_bytes", &p->soft.bytes) != 0 || get_limit(lim[1], "soft_packets", &p->soft.packets) != 0 ||
        get_limit(lim[2], "hard_bytes", &p->hard.bytes) != 0 || get_limit(lim[3], "hard_packets", &p->hard.packets) != 0)
        return -1;
    return 0;
}

/* Carry over a window's state (ReplayWindow.snapshot()): numbers received below the top. */
int ips_mark_seen(ips_replay *w, PyObject *seen)
{
    PyObject *fast = PySequence_Fast(seen, "replay_seen must be a sequence of ints");
    if (fast == NULL)
        return -1;
    uint64_t lo = w->size && w->top >= w->size ? w->top - w->size + 1 : 1;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); i++) {
        uint64_t s;
        if (get_u64(PySequence_Fast_GET_ITEM(fast, i), "replay_seen", lo, w->top,
                    "sequence numbers inside the window: replay_top - replay_window < s <= replay_top", &s) != 0) {
            Py_DECREF(fast);
            return -1;
        }
        ips_replay_update(w, s);
    }
    Py_DECREF(fast);
    return 0;
}

int ips_parse_install(PyObject *args, PyObject *kwargs, ips_install_args *a)
{
    static char *kwlist[] = {"spi", "direction", "transform", "key", "mode", "tunnel_src", "tunnel_dst", "esn",
                             "replay_window", "udp_encap", "soft_bytes", "soft_packets", "hard_bytes",
                             "hard_packets", "seq", "replay_top", "replay_seen", "ttl", "copy_dscp", "ecn", "df",
                             NULL};
    PyObject *spi_o, *src = Py_None, *dst = Py_None, *encap = Py_None, *lim[4] = {Py_None, Py_None, Py_None, Py_None};
    PyObject *window = NULL, *seq = NULL, *top = NULL;
    const char *direction, *transform, *mode = "tunnel", *ecn = "normal", *df = "copy";
    int esn = 0, ttl = 64, copy_dscp = 1;
    ips_sa_params *p = &a->p;
    memset(a, 0, sizeof(*a));
    a->seen = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Ossy*|$sOOpOOOOOOOOOipss", kwlist, &spi_o, &direction, &transform,
                                     &a->key, &mode, &src, &dst, &esn, &window, &encap, &lim[0], &lim[1], &lim[2],
                                     &lim[3], &seq, &top, &a->seen, &ttl, &copy_dscp, &ecn, &df))
        return -1;
    PyObject *zero = PyLong_FromLong(0), *w64 = PyLong_FromLong(64);
    p->esn = (uint8_t)esn;
    p->copy_dscp = (uint8_t)copy_dscp;
    int rc = -1;
    if (zero != NULL && w64 != NULL && ips_get_spi(spi_o, &p->spi) == 0 && ips_get_dir(direction, &p->dir) == 0 &&
        (a->suite = get_suite(transform, a->key.len)) != NULL && get_mode(mode, src, dst, p) == 0 &&
        get_encap(encap, p) == 0 && get_header_rules(ecn, df, p) == 0 &&
        parse_numbers(window ? window : w64, seq ? seq : zero, top ? top : zero, ttl, lim, p) == 0)
        rc = 0;
    Py_XDECREF(zero);
    Py_XDECREF(w64);
    if (rc != 0)
        PyBuffer_Release(&a->key);
    return rc;
}
