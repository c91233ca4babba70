/*
 * ipsecstack.native._engine: the CPython face of the native ESP engine (see engine.h for the
 * theory of operation of the whole engine).
 *
 * Engine() holds a table of SAs keyed by (direction, SPI) and offers:
 *   install(spi, direction, transform, key, *, mode, tunnel_src, tunnel_dst, esn, replay_window,
 *           udp_encap, soft_bytes, soft_packets, hard_bytes, hard_packets, seq, replay_top,
 *           replay_seen, ttl, copy_dscp, ecn, df)   add an SA (ValueError names the field and the fix)
 *   remove(direction, spi) -> bool
 *   protect(spi, packets, rand=None)       -> list of bytes (protected) or str (drop reason)
 *   unprotect(packets)                     -> list of bytes (inner packet) or str (drop reason)
 *   expire(direction, spi, hard) -> bool   fire a time lifetime (the owner has the clock)
 *   sa_stats(direction, spi) -> dict, stats() -> dict, sas() -> list, poll_events() -> list
 *
 * A batch call runs in three phases: with the GIL, the packets are copied into one C arena and
 * the output bytes objects are allocated at their largest size; without the GIL, the SA table is
 * read-locked, each SA used is locked, and every packet is processed from the arena into its
 * output object (not yet visible to any other thread); with the GIL again, each output is trimmed
 * to its length or replaced by the interned reason string.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "engine.h"

const char *const ips_reason_name[IPS_R_COUNT] = {
    [IPS_OK] = "ok",
    [IPS_R_TRUNCATED] = "truncated",
    [IPS_R_MALFORMED] = "malformed",
    [IPS_R_BAD_IP_VERSION] = "bad_ip_version",
    [IPS_R_FRAGMENT] = "fragment",
    [IPS_R_UNKNOWN_SPI] = "unknown_spi",
    [IPS_R_SA_EXPIRED] = "sa_expired",
    [IPS_R_SEQ_EXHAUSTED] = "seq_exhausted",
    [IPS_R_ENCAP_MISMATCH] = "encap_mismatch",
    [IPS_R_REPLAY] = "replay",
    [IPS_R_TOO_OLD] = "too_old",
    [IPS_R_BAD_ICV] = "bad_icv",
    [IPS_R_BAD_PADDING] = "bad_padding",
    [IPS_R_BAD_LENGTH] = "bad_length",
    [IPS_R_BAD_NEXT_HEADER] = "bad_next_header",
    [IPS_R_DUMMY] = "dummy",
    [IPS_R_NAT_KEEPALIVE] = "nat_keepalive",
    [IPS_R_ECN_DROP] = "ecn_drop",
    [IPS_R_CRYPTO_ERROR] = "crypto_error",
};

static const char *const trigger_name[] = {"seconds", "bytes", "packets", "seq"};
static const char *const dir_name[] = {"in", "out"};

#define EVENT_QUEUE 4096
#define INITIAL_BUCKETS 64

static PyObject *reason_str[IPS_R_COUNT]; /* interned, created at import */

typedef struct {
    PyObject_HEAD
    pthread_rwlock_t table_lock; /* the buckets and every chain */
    ips_sa **buckets;
    size_t nbuckets, count;
    ips_events events;
    pthread_mutex_t stats_lock; /* the engine-wide counters below */
    uint64_t drops[IPS_R_COUNT];
    uint64_t in_packets, out_packets;
    int ready;
} EngineObject;

/* ---- the SA table (callers hold table_lock) ------------------------------------------------- */

static size_t bucket_of(size_t nbuckets, uint8_t dir, uint32_t spi)
{
    return ((spi * 2654435761u) ^ dir) & (nbuckets - 1);
}

static ips_sa *table_find(EngineObject *e, uint8_t dir, uint32_t spi)
{
    for (ips_sa *sa = e->buckets[bucket_of(e->nbuckets, dir, spi)]; sa != NULL; sa = sa->next)
        if (sa->spi == spi && sa->dir == dir)
            return sa;
    return NULL;
}

static void table_grow(EngineObject *e)
{
    size_t n = e->nbuckets * 2;
    ips_sa **b = calloc(n, sizeof(*b));
    if (b == NULL)
        return; /* longer chains, still correct */
    for (size_t i = 0; i < e->nbuckets; i++) {
        ips_sa *sa = e->buckets[i];
        while (sa != NULL) {
            ips_sa *next = sa->next;
            size_t j = bucket_of(n, sa->dir, sa->spi);
            sa->next = b[j];
            b[j] = sa;
            sa = next;
        }
    }
    free(e->buckets);
    e->buckets = b;
    e->nbuckets = n;
}

static int table_insert(EngineObject *e, ips_sa *sa)
{
    if (table_find(e, sa->dir, sa->spi) != NULL)
        return -1;
    if (e->count >= e->nbuckets)
        table_grow(e);
    size_t i = bucket_of(e->nbuckets, sa->dir, sa->spi);
    sa->next = e->buckets[i];
    e->buckets[i] = sa;
    e->count++;
    return 0;
}

static ips_sa *table_unlink(EngineObject *e, uint8_t dir, uint32_t spi)
{
    ips_sa **link = &e->buckets[bucket_of(e->nbuckets, dir, spi)];
    for (; *link != NULL; link = &(*link)->next) {
        ips_sa *sa = *link;
        if (sa->spi == spi && sa->dir == dir) {
            *link = sa->next;
            e->count--;
            return sa;
        }
    }
    return NULL;
}

/* Every section that takes a lock runs between Py_BEGIN_ALLOW_THREADS and Py_END_ALLOW_THREADS and
 * calls no Python API: no lock is ever waited for, or held, with the GIL held. */

static int locked_insert(EngineObject *e, ips_sa *sa)
{
    pthread_rwlock_wrlock(&e->table_lock);
    int rc = table_insert(e, sa);
    pthread_rwlock_unlock(&e->table_lock);
    return rc;
}

static ips_sa *locked_unlink(EngineObject *e, uint8_t dir, uint32_t spi)
{
    pthread_rwlock_wrlock(&e->table_lock);
    ips_sa *sa = table_unlink(e, dir, spi);
    pthread_rwlock_unlock(&e->table_lock);
    return sa;
}

/* ---- argument helpers ----------------------------------------------------------------------- */

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

static int get_dir(const char *s, uint8_t *dir)
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

static int get_spi(PyObject *o, uint32_t *spi)
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

/* ---- install / remove ----------------------------------------------------------------------- */

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
static int mark_seen(ips_replay *w, PyObject *seen)
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

static PyObject *Engine_install(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"spi", "direction", "transform", "key", "mode", "tunnel_src", "tunnel_dst", "esn",
                             "replay_window", "udp_encap", "soft_bytes", "soft_packets", "hard_bytes",
                             "hard_packets", "seq", "replay_top", "replay_seen", "ttl", "copy_dscp", "ecn", "df",
                             NULL};
    PyObject *spi_o, *src = Py_None, *dst = Py_None, *encap = Py_None, *lim[4] = {Py_None, Py_None, Py_None, Py_None};
    PyObject *window = NULL, *seq = NULL, *top = NULL, *seen = Py_None;
    const char *direction, *transform, *mode = "tunnel", *ecn = "normal", *df = "copy";
    int esn = 0, ttl = 64, copy_dscp = 1;
    Py_buffer key;
    ips_sa_params p;
    memset(&p, 0, sizeof(p));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Ossy*|$sOOpOOOOOOOOOipss", kwlist, &spi_o, &direction, &transform,
                                     &key, &mode, &src, &dst, &esn, &window, &encap, &lim[0], &lim[1], &lim[2],
                                     &lim[3], &seq, &top, &seen, &ttl, &copy_dscp, &ecn, &df))
        return NULL;
    PyObject *zero = PyLong_FromLong(0), *w64 = PyLong_FromLong(64);
    const ips_suite *suite = NULL;
    ips_sa *sa = NULL;
    const char *why = "";
    p.esn = (uint8_t)esn;
    p.copy_dscp = (uint8_t)copy_dscp;
    if (zero == NULL || w64 == NULL || get_spi(spi_o, &p.spi) != 0 || get_dir(direction, &p.dir) != 0 ||
        (suite = get_suite(transform, key.len)) == NULL || get_mode(mode, src, dst, &p) != 0 ||
        get_encap(encap, &p) != 0 || get_header_rules(ecn, df, &p) != 0 ||
        parse_numbers(window ? window : w64, seq ? seq : zero, top ? top : zero, ttl, lim, &p) != 0)
        goto done;
    sa = ips_sa_new(&p, suite, key.buf, &self->events, &why);
    if (sa == NULL) {
        PyErr_Format(PyExc_RuntimeError, "cannot install SA 0x%08x: %s", p.spi, why);
        goto done;
    }
    if (seen != Py_None && mark_seen(&sa->replay, seen) != 0) {
        ips_sa_free(sa);
        goto done;
    }
    int dup;
    Py_BEGIN_ALLOW_THREADS
    dup = locked_insert(self, sa);
    Py_END_ALLOW_THREADS
    if (dup != 0) {
        ips_sa_free(sa);
        PyErr_Format(PyExc_ValueError, "spi = 0x%08x: an %s SA with this SPI is installed; remove it first", p.spi,
                     p.dir == IPS_IN ? "inbound" : "outbound");
    }
done:
    PyBuffer_Release(&key); /* the SA keeps only what its OpenSSL contexts derived (and the salt) */
    Py_XDECREF(zero);
    Py_XDECREF(w64);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_remove(EngineObject *self, PyObject *args)
{
    const char *direction;
    PyObject *spi_o;
    uint8_t dir;
    uint32_t spi;
    if (!PyArg_ParseTuple(args, "sO", &direction, &spi_o) || get_dir(direction, &dir) != 0 ||
        get_spi(spi_o, &spi) != 0)
        return NULL;
    ips_sa *sa;
    Py_BEGIN_ALLOW_THREADS
    sa = locked_unlink(self, dir, spi);
    ips_sa_free(sa); /* nobody else can reach it: batches hold the read lock while they use an SA */
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(sa != NULL);
}

/* ---- batches -------------------------------------------------------------------------------- */

typedef struct {
    size_t in_off, len, orig; /* copied bytes at arena + in_off, of an object orig bytes long */
    PyObject *obj;            /* the output bytes object (len + headroom bytes), or NULL */
    uint8_t *out;
    size_t cap, out_len;
    ips_reason reason;
} slot;

typedef struct {
    Py_ssize_t n;
    slot *slots;
    uint8_t *arena;
} batch;

static void batch_free(batch *b)
{
    for (Py_ssize_t i = 0; b->slots != NULL && i < b->n; i++)
        Py_XDECREF(b->slots[i].obj);
    PyMem_Free(b->slots);
    PyMem_RawFree(b->arena);
    b->slots = NULL;
    b->arena = NULL;
}

static int batch_copy_in(batch *b, PyObject *fast)
{
    Py_buffer *views = PyMem_Calloc((size_t)b->n + 1, sizeof(Py_buffer));
    Py_ssize_t got = 0;
    size_t total = 0;
    int rc = -1;
    if (views == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (; got < b->n; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, got), &views[got], PyBUF_SIMPLE) != 0) {
            PyErr_Format(PyExc_TypeError, "packets[%zd] is not a bytes-like object", got);
            goto out;
        }
        slot *s = &b->slots[got];
        s->orig = (size_t)views[got].len;
        s->len = s->orig < IPS_MAX_DATAGRAM ? s->orig : IPS_MAX_DATAGRAM;
        s->in_off = total;
        total += s->len;
    }
    b->arena = PyMem_RawMalloc(total ? total : 1);
    if (b->arena == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < b->n; i++)
        memcpy(b->arena + b->slots[i].in_off, views[i].buf, b->slots[i].len);
    rc = 0;
out:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    return rc;
}

/* Phase 1 (GIL held): copy the packets in, allocate each output at len + headroom bytes. */
static int batch_init(batch *b, PyObject *packets, size_t headroom)
{
    memset(b, 0, sizeof(*b));
    PyObject *fast = PySequence_Fast(packets, "packets must be a list or tuple of bytes-like objects");
    if (fast == NULL)
        return -1;
    b->n = PySequence_Fast_GET_SIZE(fast);
    b->slots = PyMem_Calloc((size_t)b->n + 1, sizeof(slot));
    if (b->slots == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    int rc = batch_copy_in(b, fast);
    Py_DECREF(fast);
    for (Py_ssize_t i = 0; rc == 0 && i < b->n; i++) {
        slot *s = &b->slots[i];
        s->cap = s->len + headroom;
        if (s->cap < 20)
            continue; /* no IP packet fits: it is refused before anything is written */
        s->obj = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)s->cap);
        if (s->obj == NULL)
            rc = -1;
        else
            s->out = (uint8_t *)PyBytes_AS_STRING(s->obj);
    }
    if (rc != 0)
        batch_free(b);
    return rc;
}

/* Phase 3 (GIL held): the result list; consumes the batch. */
static PyObject *batch_results(batch *b)
{
    PyObject *list = PyList_New(b->n);
    for (Py_ssize_t i = 0; list != NULL && i < b->n; i++) {
        slot *s = &b->slots[i];
        PyObject *item;
        if (s->reason == IPS_OK && s->obj != NULL) {
            item = s->obj;
            s->obj = NULL;
            if (s->out_len != s->cap && _PyBytes_Resize(&item, (Py_ssize_t)s->out_len) != 0) {
                Py_CLEAR(list);
                break;
            }
        } else {
            item = Py_NewRef(reason_str[s->reason == IPS_OK ? IPS_R_CRYPTO_ERROR : s->reason]);
        }
        PyList_SET_ITEM(list, i, item);
    }
    batch_free(b);
    return list;
}

static void count_batch(EngineObject *e, const uint64_t *drops, Py_ssize_t n, int outbound)
{
    pthread_mutex_lock(&e->stats_lock);
    for (int r = 1; r < IPS_R_COUNT; r++)
        e->drops[r] += drops[r];
    if (outbound)
        e->out_packets += (uint64_t)n;
    else
        e->in_packets += (uint64_t)n;
    pthread_mutex_unlock(&e->stats_lock);
}

/* Phase 2 of protect (no GIL). Returns 0 when no outbound SA has this SPI. */
static int run_protect(EngineObject *e, uint32_t spi, batch *b, const uint8_t *rand)
{
    uint64_t drops[IPS_R_COUNT] = {0};
    uint8_t *own_rand = NULL;
    pthread_rwlock_rdlock(&e->table_lock);
    ips_sa *sa = table_find(e, IPS_OUT, spi);
    if (sa == NULL) {
        pthread_rwlock_unlock(&e->table_lock);
        return 0;
    }
    if (sa->cipher.suite->kind == IPS_CBC && rand == NULL && b->n > 0 && b->n <= INT_MAX / 16) {
        /* one draw for the batch; packet i that reaches the cipher uses the next 16 bytes */
        own_rand = malloc(16 * (size_t)b->n);
        if (own_rand != NULL && RAND_bytes(own_rand, 16 * (int)b->n) != 1) {
            free(own_rand);
            own_rand = NULL; /* each packet then asks RAND_bytes itself */
        }
        rand = own_rand;
    }
    size_t used = 0;
    pthread_mutex_lock(&sa->lock);
    for (Py_ssize_t i = 0; i < b->n; i++) {
        slot *s = &b->slots[i];
        const uint8_t *r16 = rand != NULL ? rand + 16 * used : NULL;
        s->reason = s->obj == NULL ? IPS_R_BAD_LENGTH
                                   : ips_protect(sa, b->arena + s->in_off, s->len, s->orig, s->out, s->cap,
                                                 &s->out_len, r16);
        if (s->reason == IPS_OK || s->reason == IPS_R_CRYPTO_ERROR)
            used++;
        if (s->reason != IPS_OK) {
            sa->drops[s->reason]++;
            drops[s->reason]++;
        }
    }
    pthread_mutex_unlock(&sa->lock);
    pthread_rwlock_unlock(&e->table_lock);
    free(own_rand);
    count_batch(e, drops, b->n, 1);
    return 1;
}

static PyObject *Engine_protect(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"spi", "packets", "rand", NULL};
    PyObject *spi_o, *packets, *rand_o = Py_None;
    uint32_t spi;
    batch b;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O", kwlist, &spi_o, &packets, &rand_o) ||
        get_spi(spi_o, &spi) != 0 || batch_init(&b, packets, IPS_HEADROOM) != 0)
        return NULL;
    uint8_t *rand = NULL;
    if (rand_o != Py_None) {
        /* test mode: the CBC seeds come from the caller, 16 bytes per packet, in order */
        if (!PyBytes_Check(rand_o) || PyBytes_GET_SIZE(rand_o) != 16 * b.n) {
            batch_free(&b);
            PyErr_Format(PyExc_ValueError, "rand must be bytes, 16 per packet (%zd bytes)", 16 * b.n);
            return NULL;
        }
        rand = PyMem_RawMalloc((size_t)PyBytes_GET_SIZE(rand_o) + 1);
        if (rand == NULL) {
            batch_free(&b);
            return PyErr_NoMemory();
        }
        memcpy(rand, PyBytes_AS_STRING(rand_o), (size_t)PyBytes_GET_SIZE(rand_o));
    }
    int found;
    Py_BEGIN_ALLOW_THREADS
    found = run_protect(self, spi, &b, rand);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(rand);
    if (!found) {
        batch_free(&b);
        PyErr_Format(PyExc_KeyError, "no outbound SA with SPI 0x%08x", spi);
        return NULL;
    }
    return batch_results(&b);
}

/* Phase 2 of unprotect (no GIL): each packet finds its inbound SA by SPI. */
static void run_unprotect(EngineObject *e, batch *b)
{
    uint64_t drops[IPS_R_COUNT] = {0};
    pthread_rwlock_rdlock(&e->table_lock);
    for (Py_ssize_t i = 0; i < b->n; i++) {
        slot *s = &b->slots[i];
        ips_located loc;
        const uint8_t *pkt = b->arena + s->in_off;
        s->reason = ips_locate(pkt, s->len, s->orig, &loc);
        if (s->reason == IPS_OK) {
            ips_sa *sa = table_find(e, IPS_IN, loc.spi);
            if (sa == NULL) {
                s->reason = IPS_R_UNKNOWN_SPI;
            } else {
                pthread_mutex_lock(&sa->lock);
                s->reason = ips_unprotect(sa, pkt, &loc, s->out, s->cap, &s->out_len);
                if (s->reason != IPS_OK)
                    sa->drops[s->reason]++;
                pthread_mutex_unlock(&sa->lock);
            }
        }
        if (s->reason != IPS_OK)
            drops[s->reason]++;
    }
    pthread_rwlock_unlock(&e->table_lock);
    count_batch(e, drops, b->n, 0);
}

static PyObject *Engine_unprotect(EngineObject *self, PyObject *packets)
{
    batch b;
    if (batch_init(&b, packets, 0) != 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    run_unprotect(self, &b);
    Py_END_ALLOW_THREADS
    return batch_results(&b);
}

/* ---- lifetimes, counters, events ------------------------------------------------------------ */

static int locked_expire(EngineObject *e, uint8_t dir, uint32_t spi, int hard)
{
    pthread_rwlock_rdlock(&e->table_lock);
    ips_sa *sa = table_find(e, dir, spi);
    if (sa != NULL) {
        pthread_mutex_lock(&sa->lock);
        if (hard)
            ips_sa_expire_hard(sa, IPS_TRIG_SECONDS);
        else
            ips_sa_expire_soft(sa, IPS_TRIG_SECONDS);
        pthread_mutex_unlock(&sa->lock);
    }
    pthread_rwlock_unlock(&e->table_lock);
    return sa != NULL;
}

static PyObject *Engine_expire(EngineObject *self, PyObject *args)
{
    const char *direction;
    PyObject *spi_o;
    int hard;
    uint8_t dir;
    uint32_t spi;
    if (!PyArg_ParseTuple(args, "sOp", &direction, &spi_o, &hard) || get_dir(direction, &dir) != 0 ||
        get_spi(spi_o, &spi) != 0)
        return NULL;
    int found;
    Py_BEGIN_ALLOW_THREADS
    found = locked_expire(self, dir, spi, hard);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(found);
}

static PyObject *drops_dict(const uint64_t *drops)
{
    PyObject *d = PyDict_New();
    for (int r = 1; d != NULL && r < IPS_R_COUNT; r++) {
        if (drops[r] == 0)
            continue;
        PyObject *v = PyLong_FromUnsignedLongLong(drops[r]);
        if (v == NULL || PyDict_SetItem(d, reason_str[r], v) != 0)
            Py_CLEAR(d);
        Py_XDECREF(v);
    }
    return d;
}

/* A snapshot of an SA's counters and state, by value (its pointers are not followed). */
static int locked_copy(EngineObject *e, uint8_t dir, uint32_t spi, ips_sa *copy)
{
    pthread_rwlock_rdlock(&e->table_lock);
    ips_sa *sa = table_find(e, dir, spi);
    if (sa != NULL) {
        pthread_mutex_lock(&sa->lock);
        *copy = *sa;
        pthread_mutex_unlock(&sa->lock);
    }
    pthread_rwlock_unlock(&e->table_lock);
    return sa != NULL;
}

static PyObject *Engine_sa_stats(EngineObject *self, PyObject *args)
{
    const char *direction;
    PyObject *spi_o;
    uint8_t dir;
    uint32_t spi;
    ips_sa copy;
    if (!PyArg_ParseTuple(args, "sO", &direction, &spi_o) || get_dir(direction, &dir) != 0 ||
        get_spi(spi_o, &spi) != 0)
        return NULL;
    int found;
    Py_BEGIN_ALLOW_THREADS
    found = locked_copy(self, dir, spi, &copy);
    Py_END_ALLOW_THREADS
    if (!found) {
        PyErr_Format(PyExc_KeyError, "no %s SA with SPI 0x%08x", dir == IPS_IN ? "inbound" : "outbound", spi);
        return NULL;
    }
    PyObject *drops = drops_dict(copy.drops);
    if (drops == NULL)
        return NULL;
    return Py_BuildValue("{s:k,s:s,s:s,s:s,s:K,s:K,s:N,s:K,s:K,s:O,s:O}", "spi", (unsigned long)copy.spi,
                         "direction", dir_name[dir], "transform", copy.cipher.suite->keyword, "mode",
                         copy.tunnel ? "tunnel" : "transport", "packets", (unsigned long long)copy.packets, "bytes",
                         (unsigned long long)copy.bytes, "drops", drops, "seq", (unsigned long long)copy.seq,
                         "replay_top", (unsigned long long)copy.replay.top, "soft_fired",
                         copy.soft_fired ? Py_True : Py_False, "dead", copy.dead ? Py_True : Py_False);
}

static PyObject *Engine_stats(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    uint64_t drops[IPS_R_COUNT], in_p, out_p, lost;
    size_t count;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->stats_lock);
    memcpy(drops, self->drops, sizeof(drops));
    in_p = self->in_packets;
    out_p = self->out_packets;
    pthread_mutex_unlock(&self->stats_lock);
    pthread_rwlock_rdlock(&self->table_lock);
    count = self->count;
    pthread_rwlock_unlock(&self->table_lock);
    lost = ips_events_lost(&self->events);
    Py_END_ALLOW_THREADS
    PyObject *d = drops_dict(drops);
    if (d == NULL)
        return NULL;
    return Py_BuildValue("{s:n,s:K,s:K,s:N,s:K}", "sas", (Py_ssize_t)count, "in_packets", (unsigned long long)in_p,
                         "out_packets", (unsigned long long)out_p, "drops", d, "events_lost",
                         (unsigned long long)lost);
}

typedef struct {
    uint8_t dir;
    uint32_t spi;
} sa_id;

static sa_id *locked_ids(EngineObject *e, size_t *k)
{
    pthread_rwlock_rdlock(&e->table_lock);
    size_t n = e->count;
    sa_id *ids = malloc((n + 1) * sizeof(*ids));
    *k = 0;
    for (size_t i = 0; ids != NULL && i < e->nbuckets; i++)
        for (ips_sa *sa = e->buckets[i]; sa != NULL && *k < n; sa = sa->next, (*k)++) {
            ids[*k].dir = sa->dir;
            ids[*k].spi = sa->spi;
        }
    pthread_rwlock_unlock(&e->table_lock);
    return ids;
}

static PyObject *Engine_sas(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    sa_id *ids;
    size_t k;
    Py_BEGIN_ALLOW_THREADS
    ids = locked_ids(self, &k);
    Py_END_ALLOW_THREADS
    if (ids == NULL)
        return PyErr_NoMemory();
    PyObject *list = PyList_New((Py_ssize_t)k);
    for (size_t i = 0; list != NULL && i < k; i++) {
        PyObject *t = Py_BuildValue("(sk)", dir_name[ids[i].dir], (unsigned long)ids[i].spi);
        if (t == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    free(ids);
    return list;
}

static PyObject *Engine_poll_events(EngineObject *self, PyObject *Py_UNUSED(ignored))
{
    ips_event ev[EVENT_QUEUE];
    uint32_t n;
    Py_BEGIN_ALLOW_THREADS
    n = ips_events_take(&self->events, ev, EVENT_QUEUE);
    Py_END_ALLOW_THREADS
    PyObject *list = PyList_New(n);
    for (uint32_t i = 0; list != NULL && i < n; i++) {
        PyObject *t = Py_BuildValue("(ssks)", ev[i].kind == IPS_EV_HARD ? "hard" : "soft", dir_name[ev[i].dir],
                                    (unsigned long)ev[i].spi, trigger_name[ev[i].trigger]);
        if (t == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

/* ---- the type and the module ---------------------------------------------------------------- */

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "", kwlist))
        return NULL;
    EngineObject *self = (EngineObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->buckets = calloc(INITIAL_BUCKETS, sizeof(ips_sa *));
    self->nbuckets = INITIAL_BUCKETS;
    if (self->buckets == NULL || ips_events_init(&self->events, EVENT_QUEUE) != 0 ||
        pthread_rwlock_init(&self->table_lock, NULL) != 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    if (pthread_mutex_init(&self->stats_lock, NULL) != 0) {
        pthread_rwlock_destroy(&self->table_lock);
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->ready = 1;
    return (PyObject *)self;
}

static void Engine_dealloc(EngineObject *self)
{
    /* the last reference is gone, so no batch runs: every SA can go */
    for (size_t i = 0; self->buckets != NULL && i < self->nbuckets; i++) {
        ips_sa *sa = self->buckets[i];
        while (sa != NULL) {
            ips_sa *next = sa->next;
            ips_sa_free(sa);
            sa = next;
        }
    }
    free(self->buckets);
    ips_events_free(&self->events);
    if (self->ready) {
        pthread_rwlock_destroy(&self->table_lock);
        pthread_mutex_destroy(&self->stats_lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Engine_methods[] = {
    {"install", (PyCFunction)(void (*)(void))Engine_install, METH_VARARGS | METH_KEYWORDS,
     "install(spi, direction, transform, key, *, mode='tunnel', tunnel_src=None, tunnel_dst=None, esn=False, "
     "replay_window=64, udp_encap=None, soft_bytes=None, soft_packets=None, hard_bytes=None, hard_packets=None, "
     "seq=0, replay_top=0, replay_seen=None, ttl=64, copy_dscp=True, ecn='normal', df='copy')\n--\n\nAdd an ESP SA."},
    {"remove", (PyCFunction)Engine_remove, METH_VARARGS, "remove(direction, spi) -> bool"},
    {"protect", (PyCFunction)(void (*)(void))Engine_protect, METH_VARARGS | METH_KEYWORDS,
     "protect(spi, packets, rand=None) -> list of bytes or drop-reason str"},
    {"unprotect", (PyCFunction)Engine_unprotect, METH_O, "unprotect(packets) -> list of bytes or drop-reason str"},
    {"expire", (PyCFunction)Engine_expire, METH_VARARGS, "expire(direction, spi, hard) -> bool"},
    {"sa_stats", (PyCFunction)Engine_sa_stats, METH_VARARGS, "sa_stats(direction, spi) -> dict"},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "stats() -> dict"},
    {"sas", (PyCFunction)Engine_sas, METH_NOARGS, "sas() -> list of (direction, spi)"},
    {"poll_events", (PyCFunction)Engine_poll_events, METH_NOARGS,
     "poll_events() -> list of (kind, direction, spi, trigger)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ipsecstack.native._engine.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The native ESP engine: SAs, batch protect/unprotect with the GIL released, counters, events.",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT, .m_name = "ipsecstack.native._engine", .m_doc = "The native ESP engine (see engine.h).",
    .m_size = -1,
};

static PyObject *string_tuple(const char *(*at)(size_t), size_t first)
{
    PyObject *list = PyList_New(0);
    for (size_t i = first; list != NULL && at(i) != NULL; i++) {
        PyObject *s = PyUnicode_FromString(at(i));
        if (s == NULL || PyList_Append(list, s) != 0)
            Py_CLEAR(list);
        Py_XDECREF(s);
    }
    if (list == NULL)
        return NULL;
    PyObject *t = PyList_AsTuple(list);
    Py_DECREF(list);
    return t;
}

static const char *reason_at(size_t i)
{
    return i < IPS_R_COUNT ? ips_reason_name[i] : NULL;
}

static const char *suite_at(size_t i)
{
    const ips_suite *s = ips_suite_at(i);
    return s ? s->keyword : NULL;
}

PyMODINIT_FUNC PyInit__engine(void)
{
    for (int r = 0; r < IPS_R_COUNT; r++)
        if ((reason_str[r] = PyUnicode_InternFromString(ips_reason_name[r])) == NULL)
            return NULL;
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&engine_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObject(m, "REASONS", string_tuple(reason_at, 1)) < 0 ||
        PyModule_AddObject(m, "TRANSFORMS", string_tuple(suite_at, 0)) < 0 ||
        PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0 ||
        PyModule_AddIntConstant(m, "MAX_DATAGRAM", IPS_MAX_DATAGRAM) < 0 ||
        PyModule_AddIntConstant(m, "EVENT_QUEUE", EVENT_QUEUE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
