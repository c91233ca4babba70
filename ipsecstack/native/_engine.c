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
 *   rearm_seen(spis)                       the next packet of these inbound SAs raises a "seen" event
 *
 * A batch call runs in three phases: with the GIL, the packets are copied into one C arena and
 * the output bytes objects are allocated at their largest size (batch.c); without the GIL, the SA
 * table is read-locked, each SA used is locked, and every packet is processed from the arena into
 * its output object, not yet visible to any other thread (here); with the GIL again, each output is
 * trimmed to its length or replaced by the interned reason string (batch.c). Arguments of install
 * are checked in params.c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "engine.h"
#include "engine_obj.h"
#include "pyglue.h"

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
    [IPS_R_POLICY_DISCARD] = "policy_discard",
    [IPS_R_QUEUE_DELAY] = "queue_delay",
};

static const char *const trigger_name[] = {"seconds", "bytes", "packets", "seq"};
static const char *const dir_name[] = {"in", "out"};

#define EVENT_QUEUE 4096
#define INITIAL_BUCKETS 64

PyObject *ips_reason_str[IPS_R_COUNT]; /* interned, created at import */

/* Every section that takes a lock runs between Py_BEGIN_ALLOW_THREADS and Py_END_ALLOW_THREADS and
 * calls no Python API: no lock is ever waited for, or held, with the GIL held. */

static int locked_insert(EngineObject *e, ips_sa *sa)
{
    pthread_rwlock_wrlock(&e->table_lock);
    int rc = ips_table_insert(e, sa);
    pthread_rwlock_unlock(&e->table_lock);
    return rc;
}

static ips_sa *locked_unlink(EngineObject *e, uint8_t dir, uint32_t spi)
{
    pthread_rwlock_wrlock(&e->table_lock);
    ips_sa *sa = ips_table_unlink(e, dir, spi);
    pthread_rwlock_unlock(&e->table_lock);
    return sa;
}

/* ---- install / remove ----------------------------------------------------------------------- */

static PyObject *Engine_install(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    ips_install_args a;
    const char *why = "";
    if (ips_parse_install(args, kwargs, &a) != 0)
        return NULL;
    ips_sa *sa = ips_sa_new(&a.p, a.suite, a.key.buf, &self->events, &why);
    PyBuffer_Release(&a.key); /* the SA keeps only what its OpenSSL contexts derived (and the salt) */
    if (sa == NULL) {
        PyErr_Format(PyExc_RuntimeError, "cannot install SA 0x%08x: %s", a.p.spi, why);
        return NULL;
    }
    if (a.seen != Py_None && ips_mark_seen(&sa->replay, a.seen) != 0) {
        ips_sa_free(sa);
        return NULL;
    }
    int dup;
    Py_BEGIN_ALLOW_THREADS
    dup = locked_insert(self, sa);
    Py_END_ALLOW_THREADS
    if (dup != 0) {
        ips_sa_free(sa);
        PyErr_Format(PyExc_ValueError, "spi = 0x%08x: an %s SA with this SPI is installed; remove it first", a.p.spi,
                     a.p.dir == IPS_IN ? "inbound" : "outbound");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_remove(EngineObject *self, PyObject *args)
{
    const char *direction;
    PyObject *spi_o;
    uint8_t dir;
    uint32_t spi;
    if (!PyArg_ParseTuple(args, "sO", &direction, &spi_o) || ips_get_dir(direction, &dir) != 0 ||
        ips_get_spi(spi_o, &spi) != 0)
        return NULL;
    ips_sa *sa;
    Py_BEGIN_ALLOW_THREADS
    sa = locked_unlink(self, dir, spi);
    ips_sa_free(sa); /* nobody else can reach it: batches hold the read lock while they use an SA */
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(sa != NULL);
}

/* Phase 2 of protect (no GIL). Returns 0 when no outbound SA has this SPI. */
static int run_protect(EngineObject *e, uint32_t spi, batch *b, const uint8_t *rand)
{
    uint64_t drops[IPS_R_COUNT] = {0};
    uint8_t *own_rand = NULL;
    pthread_rwlock_rdlock(&e->table_lock);
    ips_sa *sa = ips_table_find(e, IPS_OUT, spi);
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
    ips_engine_count(e, drops, (uint64_t)b->n, 1);
    return 1;
}

static PyObject *Engine_protect(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"spi", "packets", "rand", NULL};
    PyObject *spi_o, *packets, *rand_o = Py_None;
    uint32_t spi;
    batch b;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O", kwlist, &spi_o, &packets, &rand_o) ||
        ips_get_spi(spi_o, &spi) != 0 || batch_init(&b, packets, IPS_HEADROOM) != 0)
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
            ips_sa *sa = ips_table_find(e, IPS_IN, loc.spi);
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
    ips_engine_count(e, drops, (uint64_t)b->n, 0);
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
    ips_sa *sa = ips_table_find(e, dir, spi);
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
    if (!PyArg_ParseTuple(args, "sOp", &direction, &spi_o, &hard) || ips_get_dir(direction, &dir) != 0 ||
        ips_get_spi(spi_o, &spi) != 0)
        return NULL;
    int found;
    Py_BEGIN_ALLOW_THREADS
    found = locked_expire(self, dir, spi, hard);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(found);
}

/* RFC 7296 §2.23 (and MOBIKE, RFC 4555): the peer's address or NAT port changed; an outbound SA follows it
 * under its lock, so no packet is built half with the old endpoint and half with the new one. */
static int locked_move(EngineObject *e, uint32_t spi, const uint8_t *dst, size_t dst_len, long dport)
{
    int r = 0;
    pthread_rwlock_rdlock(&e->table_lock);
    ips_sa *sa = ips_table_find(e, IPS_OUT, spi);
    if (sa == NULL) {
        r = -1;
    } else {
        pthread_mutex_lock(&sa->lock);
        if (dst != NULL) {
            if (!sa->tunnel || dst_len != (sa->outer_version == 4 ? 4u : 16u))
                r = -2;
            else
                memcpy(sa->outer_dst, dst, dst_len);
        }
        if (r == 0 && dport >= 0 && sa->udp)
            sa->dport = (uint16_t)dport;
        pthread_mutex_unlock(&sa->lock);
    }
    pthread_rwlock_unlock(&e->table_lock);
    return r;
}

static PyObject *Engine_move(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"spi", "tunnel_dst", "dport", NULL};
    PyObject *spi_o, *dst_o = Py_None, *dport_o = Py_None;
    uint32_t spi;
    long dport = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|OO", kwlist, &spi_o, &dst_o, &dport_o) ||
        ips_get_spi(spi_o, &spi) != 0)
        return NULL;
    if (dst_o != Py_None && !PyBytes_Check(dst_o)) {
        PyErr_SetString(PyExc_TypeError, "tunnel_dst must be the packed address (bytes) or None");
        return NULL;
    }
    if (dport_o != Py_None) {
        dport = PyLong_AsLong(dport_o);
        if (dport == -1 && PyErr_Occurred())
            return NULL;
        if (dport < 1 || dport > 65535) {
            PyErr_Format(PyExc_ValueError, "dport = %ld: use a UDP port 1..65535", dport);
            return NULL;
        }
    }
    const uint8_t *dst = dst_o == Py_None ? NULL : (const uint8_t *)PyBytes_AS_STRING(dst_o);
    size_t dst_len = dst_o == Py_None ? 0 : (size_t)PyBytes_GET_SIZE(dst_o);
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = locked_move(self, spi, dst, dst_len, dport);
    Py_END_ALLOW_THREADS
    if (r == -1) {
        PyErr_Format(PyExc_KeyError, "no outbound SA with SPI 0x%08x", spi);
        return NULL;
    }
    if (r == -2) {
        PyErr_SetString(PyExc_ValueError,
                        "tunnel_dst: a tunnel-mode SA moves within its address family (4 or 16 bytes)");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *drops_dict(const uint64_t *drops)
{
    PyObject *d = PyDict_New();
    for (int r = 1; d != NULL && r < IPS_R_COUNT; r++) {
        if (drops[r] == 0)
            continue;
        PyObject *v = PyLong_FromUnsignedLongLong(drops[r]);
        if (v == NULL || PyDict_SetItem(d, ips_reason_str[r], v) != 0)
            Py_CLEAR(d);
        Py_XDECREF(v);
    }
    return d;
}

/* A snapshot of an SA's counters and state, by value (its pointers are not followed). */
static int locked_copy(EngineObject *e, uint8_t dir, uint32_t spi, ips_sa *copy)
{
    pthread_rwlock_rdlock(&e->table_lock);
    ips_sa *sa = ips_table_find(e, dir, spi);
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
    if (!PyArg_ParseTuple(args, "sO", &direction, &spi_o) || ips_get_dir(direction, &dir) != 0 ||
        ips_get_spi(spi_o, &spi) != 0)
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
        static const char *const kind_name[] = {[IPS_EV_SOFT] = "soft", [IPS_EV_HARD] = "hard",
                                                 [IPS_EV_SEEN] = "seen"};
        PyObject *t = Py_BuildValue("(ssks)", kind_name[ev[i].kind], dir_name[ev[i].dir], (unsigned long)ev[i].spi,
                                    trigger_name[ev[i].trigger]);
        if (t == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

/* Re-arm the inbound SAs named (a sequence of SPIs): each raises one "seen" event on its next packet. SPIs
 * no longer installed are skipped. */
static PyObject *Engine_rearm_seen(EngineObject *self, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "rearm_seen() takes a sequence of SPIs");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint32_t *spis = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(*spis));
    if (spis == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (ips_get_spi(PySequence_Fast_GET_ITEM(seq, i), &spis[i]) != 0) {
            PyMem_Free(spis);
            Py_DECREF(seq);
            return NULL;
        }
    Py_DECREF(seq);
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_rdlock(&self->table_lock);
    for (Py_ssize_t i = 0; i < n; i++) {
        ips_sa *sa = ips_table_find(self, IPS_IN, spis[i]);
        if (sa != NULL)
            ips_sa_rearm_seen(sa);
    }
    pthread_rwlock_unlock(&self->table_lock);
    Py_END_ALLOW_THREADS
    PyMem_Free(spis);
    Py_RETURN_NONE;
}

/* ---- the type and the module ---------------------------------------------------------------- */

/* Writers first: the forwarder's two threads hold the read lock for whole batches, in turns that may
 * overlap for as long as traffic flows; install/remove must still get in between. Nothing takes the
 * read lock twice in one thread, so a waiting writer cannot deadlock a reader. */
static int init_table_lock(pthread_rwlock_t *lock)
{
    pthread_rwlockattr_t attr;
    if (pthread_rwlockattr_init(&attr) != 0)
        return -1;
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    int rc = pthread_rwlock_init(lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    return rc;
}

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
        init_table_lock(&self->table_lock) != 0) {
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
    ips_fwd_dealloc(self); /* the forwarder's threads use the table: they go first */
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
    {"move", (PyCFunction)(void (*)(void))Engine_move, METH_VARARGS | METH_KEYWORDS,
     "move(spi, tunnel_dst=None, dport=None): an outbound SA follows its peer to a new address/NAT port"},
    {"sa_stats", (PyCFunction)Engine_sa_stats, METH_VARARGS, "sa_stats(direction, spi) -> dict"},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "stats() -> dict"},
    {"sas", (PyCFunction)Engine_sas, METH_NOARGS, "sas() -> list of (direction, spi)"},
    {"poll_events", (PyCFunction)Engine_poll_events, METH_NOARGS,
     "poll_events() -> list of (kind, direction, spi, trigger); kind soft | hard (lifetimes) | seen"},
    {"rearm_seen", (PyCFunction)Engine_rearm_seen, METH_O,
     "rearm_seen(spis): these inbound SAs raise one \"seen\" event on their next packet"},
    {"fwd_start", (PyCFunction)(void (*)(void))ips_py_fwd_start, METH_VARARGS | METH_KEYWORDS,
     "fwd_start(tun_fd, outer, *, batch=64, punt_capacity=4096, cache_size=65536) -> eventfd\n--\n\n"
     "Start the forwarder's threads on the inner fd and the outer sockets (see fwd.h)."},
    {"fwd_stop", (PyCFunction)ips_py_fwd_stop, METH_NOARGS, "fwd_stop(): stop and join the threads (idempotent)"},
    {"learn_out", (PyCFunction)(void (*)(void))ips_py_learn_out, METH_VARARGS | METH_KEYWORDS,
     "learn_out(pkt, spi): pkt's flow is protected with outbound SA spi, or discarded (None)"},
    {"learn_in", (PyCFunction)ips_py_learn_in, METH_VARARGS,
     "learn_in(spi, inner): inner's flow passed the inbound policy check for SA spi"},
    {"flush", (PyCFunction)ips_py_flush, METH_NOARGS, "flush(): forget both flow caches"},
    {"take_punts", (PyCFunction)(void (*)(void))ips_py_take_punts, METH_VARARGS | METH_KEYWORDS,
     "take_punts(max=256) -> list of ('out', pkt) | ('in', spi, inner) | ('outer', pkt)"},
    {"fwd_stats", (PyCFunction)ips_py_fwd_stats, METH_NOARGS, "fwd_stats() -> dict"},
    {"nfq_start", (PyCFunction)(void (*)(void))ips_py_nfq_start, METH_VARARGS | METH_KEYWORDS,
     "nfq_start(queues, *, batch=64, punt_capacity=4096, cache_size=65536, encap_ports=(4500,), coalesce=True,"
     " raw4=None, raw6=None, esp4=None, esp6=None, inject=None) -> eventfd\n--\n\n"
     "Start one thread per bound NFQUEUE: queues are ('out' | 'in' | 'tcp', netlink fd, queue_num, mark | None);"
     " a 'tcp' queue sends on the IPPROTO_RAW sockets raw4/raw6. esp4/esp6 (raw IPPROTO_ESP sockets) with"
     " inject (a TUN fd): an inbound thread decrypts the ESP they receive into the TUN."},
    {"nfq_stop", (PyCFunction)ips_py_fwd_stop, METH_NOARGS, "nfq_stop(): fwd_stop() (idempotent)"},
    {"nfq_verdict", (PyCFunction)(void (*)(void))ips_py_nfq_verdict, METH_VARARGS | METH_KEYWORDS,
     "nfq_verdict(queue_num, packet_id, payload, mark=None) -> bool: accept with payload, or drop (None)"},
    {"nfq_send", (PyCFunction)ips_py_nfq_send, METH_O,
     "nfq_send(packet) -> bool: a 'qseg' punt's answer, sent on the raw socket of its IP version"},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef module_functions[] = {
    {"tcp_merge", (PyCFunction)(void (*)(void))ips_py_tcp_merge, METH_VARARGS | METH_KEYWORDS,
     "tcp_merge(packets, max_segments=16, max_bytes=24576) -> list: the NFQUEUE in queue's TCP coalescing\n"
     "(fwd_coal.c) on bytes, for tests: per packet, what its verdict carries, or None when another took it in"},
    {"codel_trace", (PyCFunction)ips_py_codel_trace, METH_VARARGS,
     "codel_trace(target_ns, interval_ns, dequeues) -> list: CoDel's drop decision (codel.c) per\n"
     "(now_ns, sojourn_ns) dequeue, in order, for tests"},
    {"nfq_parse", (PyCFunction)ips_py_nfq_parse, METH_O,
     "nfq_parse(data) -> list: the NFQUEUE netlink messages of one datagram (nfq.c), for tests"},
    {"nfq_build_verdict", (PyCFunction)ips_py_nfq_build_verdict, METH_VARARGS,
     "nfq_build_verdict(queue_num, packet_id, verdict, payload | None, mark | None) -> bytes"},
    {"nfq_config_copy", (PyCFunction)ips_py_nfq_config_copy, METH_VARARGS,
     "nfq_config_copy(queue_num, copy_range) -> bytes: NFQNL_MSG_CONFIG with NFQA_CFG_PARAMS"},
    {"inet_sum", (PyCFunction)ips_py_inet_sum, METH_VARARGS,
     "inet_sum(data, start=0) -> int: the folded ones' complement sum of data's 16-bit words plus start"},
    {"nfq_config_flags", (PyCFunction)ips_py_nfq_config_flags, METH_VARARGS,
     "nfq_config_flags(queue_num, flags, mask) -> bytes: NFQNL_MSG_CONFIG with NFQA_CFG_MASK and NFQA_CFG_FLAGS"},
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
    .m_size = -1, .m_methods = module_functions,
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
        if ((ips_reason_str[r] = PyUnicode_InternFromString(ips_reason_name[r])) == NULL)
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
