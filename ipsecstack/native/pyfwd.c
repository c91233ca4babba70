/*
 * The forwarder's methods of Engine (see fwd.h for the theory of operation):
 *
 *   fwd_start(tun_fd, outer, *, batch=64, punt_capacity=4096, cache_size=65536,
 *             tso=False, coalesce=False, gso=False, gro=False) -> eventfd
 *   fwd_stop()                       stop and join the threads; idempotent (dealloc calls it)
 *   learn_out(pkt, spi | None, *, mtu=0)  pkt's flow: protect with outbound SA spi, or discard;
 *                                    mtu: the NFQUEUE threads punt what would exceed it (fwd_nfq.c)
 *   learn_in(spi, inner)             inner's flow passed the inbound policy check for SA spi
 *   flush()                          forget both flow caches (O(1))
 *   take_punts(max=256) -> list      ("out", pkt) | ("in", spi, inner) | ("outer", pkt), in order
 *   fwd_stats() -> dict              counters (see _engine.pyi)
 *
 * Arguments are checked with the GIL held; every lock is taken with the GIL released. A method that
 * uses the forwarder's memory without the GIL counts itself in fwd_users (with the GIL held), and
 * fwd_start/fwd_stop refuse to replace or tear down what such a call is using.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <linux/if_tun.h>
#include <net/if.h>

#include "fwd.h"
#include "pyglue.h"

static const char *const punt_kind_name[IPS_PUNT_KINDS] = {"out", "in", "outer", "qout", "qin", "qouter", "qseg"};

static int in_range(PyObject *o, const char *name, long lo, long hi, long *v)
{
    if (o == NULL)
        return 0;
    *v = PyLong_AsLong(o);
    if (*v == -1 && PyErr_Occurred())
        return -1;
    if (*v < lo || *v > hi) {
        PyErr_Format(PyExc_ValueError, "%s = %ld: use %ld..%ld", name, *v, lo, hi);
        return -1;
    }
    return 0;
}

static int kind_of(const char *s)
{
    for (int k = 0; k < K_TUN; k++)
        if (strcmp(s, ips_fd_kind_name[k]) == 0)
            return k;
    return -1;
}

/* Check one outer socket against its kind and read what the inbound thread needs of it. */
static int check_port(int kind, int fd, ips_fwd_port *p)
{
    int domain = 0, type = 0;
    socklen_t len = sizeof(int);
    if (fcntl(fd, F_GETFL) < 0) {
        PyErr_Format(PyExc_OSError, "outer %s fd %d: %s", ips_fd_kind_name[kind], fd, strerror(errno));
        return -1;
    }
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 ||
        getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) {
        PyErr_Format(PyExc_ValueError, "outer %s fd %d is not a socket", ips_fd_kind_name[kind], fd);
        return -1;
    }
    int want_af = kind % 2 == 0 ? AF_INET : AF_INET6;
    int want_type = kind <= K_UDP6 ? SOCK_DGRAM : SOCK_RAW;
    if (domain != want_af || type != want_type) {
        PyErr_Format(PyExc_ValueError, "outer %s fd %d: want an %s %s socket", ips_fd_kind_name[kind], fd,
                     want_af == AF_INET ? "AF_INET" : "AF_INET6", want_type == SOCK_DGRAM ? "UDP" : "raw");
        return -1;
    }
    p->fd = fd;
    if (kind >= K_RAW4)
        return 0;
    struct sockaddr_in6 sa;
    socklen_t slen = sizeof(sa);
    memset(&sa, 0, sizeof(sa));
    if (getsockname(fd, (struct sockaddr *)&sa, &slen) != 0) {
        PyErr_Format(PyExc_OSError, "outer %s fd %d: getsockname: %s", ips_fd_kind_name[kind], fd, strerror(errno));
        return -1;
    }
    static const uint8_t zero[16] = {0};
    if (want_af == AF_INET) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&sa;
        memcpy(p->local, &s4->sin_addr, 4);
        p->port = ntohs(s4->sin_port);
        p->bound = memcmp(p->local, zero, 4) != 0;
    } else {
        memcpy(p->local, &sa.sin6_addr, 16);
        p->port = ntohs(sa.sin6_port);
        p->bound = memcmp(p->local, zero, 16) != 0;
    }
    if (kind <= K_UDP6 && p->port == 0) {
        PyErr_Format(PyExc_ValueError, "outer %s fd %d is not bound to a port", ips_fd_kind_name[kind], fd);
        return -1;
    }
    return 0;
}

static int parse_outer(PyObject *outer, ips_fwd_port *ports)
{
    PyObject *fast = PySequence_Fast(outer, "outer must be a sequence of (kind, fd) pairs");
    if (fast == NULL)
        return -1;
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PySequence_Fast_GET_SIZE(fast); i++) {
        const char *name;
        int fd;
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "si", &name, &fd)) {
            if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError, "outer[%zd] must be a (kind, fd) tuple", i);
            }
            rc = -1;
            break;
        }
        int k = kind_of(name);
        if (k < 0) {
            PyErr_Format(PyExc_ValueError, "outer[%zd]: kind %R: use udp4, udp6, esp4, esp6, raw4 or raw6", i,
                         PyTuple_GET_ITEM(item, 0));
            rc = -1;
        } else if (ports[k].fd >= 0) {
            PyErr_Format(PyExc_ValueError, "outer[%zd]: a second %s socket; give each kind once", i, name);
            rc = -1;
        } else {
            rc = check_port(k, fd, &ports[k]);
        }
    }
    Py_DECREF(fast);
    return rc;
}

/* tso: the virtio_net_hdr size of a TUN opened with IFF_VNET_HDR; another packet fd (a socketpair in
 * the tests) is taken to carry the 10-byte header. -1 with an exception when the TUN has none. */
int ips_vnet_len_of(int fd)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    if (ioctl(fd, TUNGETIFF, &ifr) != 0)
        return 10; /* not a TUN */
    if (!(ifr.ifr_flags & IFF_VNET_HDR)) {
        PyErr_Format(PyExc_ValueError, "tso=True: the TUN %s has no virtio_net_hdr; open it with "
                     "TunPort(..., vnet_hdr=True)", ifr.ifr_name);
        return -1;
    }
    int sz = 0;
    if (ioctl(fd, TUNGETVNETHDRSZ, &sz) != 0 || (sz != 10 && sz != 12)) {
        PyErr_Format(PyExc_ValueError, "tso=True: the TUN's virtio_net_hdr is %d bytes; use 10 or 12", sz);
        return -1;
    }
    return sz;
}

static int set_gro(const ips_fwd_port *ports, int on)
{
    int k = ips_fwd_ports_opt(ports, K_UDP4, K_UDP6, SOL_UDP, UDP_GRO, on);
    if (k >= 0) {
        PyErr_Format(PyExc_OSError, "gro=True: setsockopt(UDP_GRO) on the %s socket: %s", ips_fd_kind_name[k],
                     strerror(errno));
        return -1;
    }
    return 0;
}

/* SO_TIMESTAMPNS on the ESP receive sockets: CoDel's sojourn times (fwd_in.c); fwd_stop turns it off */
static int set_timestamps(const ips_fwd_port *ports, int on)
{
    return ips_fwd_ports_opt(ports, K_UDP4, K_RX_LAST, SOL_SOCKET, SO_TIMESTAMPNS, on) < 0 ? 0 : -1;
}

PyObject *ips_py_fwd_start(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"tun_fd", "outer", "batch", "punt_capacity", "cache_size",
                             "tso", "coalesce", "gso", "gro", "codel_target_us", "codel_interval_us", NULL};
    int tun_fd;
    PyObject *outer, *batch_o = NULL, *cap_o = NULL, *cache_o = NULL, *target_o = NULL, *interval_o = NULL;
    long batch = 64, cap = 4096, cache = 65536, target = 0, interval = 100000;
    int tso = 0, coalesce = 0, gso = 0, gro = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iO|$OOOppppOO", kwlist, &tun_fd, &outer, &batch_o, &cap_o,
                                     &cache_o, &tso, &coalesce, &gso, &gro, &target_o, &interval_o) ||
        in_range(batch_o, "batch", 1, 1024, &batch) != 0 || in_range(cap_o, "punt_capacity", 1, 1 << 20, &cap) != 0 ||
        in_range(cache_o, "cache_size", 1, 1 << 24, &cache) != 0 ||
        in_range(target_o, "codel_target_us", 0, 10000000, &target) != 0 ||
        in_range(interval_o, "codel_interval_us", 1000, 60000000, &interval) != 0)
        return NULL;
    if (target > 0 && target >= interval) {
        PyErr_SetString(PyExc_ValueError, "codel_target_us must be below codel_interval_us (RFC 8289: 5-10 % of it)");
        return NULL;
    }
    if (self->fwd != NULL && self->fwd->running) {
        PyErr_SetString(PyExc_ValueError, "the forwarder is already running; call fwd_stop() first");
        return NULL;
    }
    if (self->fwd_users > 0) {
        PyErr_SetString(PyExc_ValueError, "the forwarder is in use by another thread; try again");
        return NULL;
    }
    int fl = fcntl(tun_fd, F_GETFL);
    if (fl < 0)
        return PyErr_Format(PyExc_OSError, "tun_fd %d: %s", tun_fd, strerror(errno));
    if (!(fl & O_NONBLOCK))
        return PyErr_Format(PyExc_ValueError, "tun_fd %d is blocking; make it non-blocking (os.set_blocking)", tun_fd);
    ips_fwd_port ports[K_KINDS];
    memset(ports, 0, sizeof(ports));
    for (int k = 0; k < K_KINDS; k++)
        ports[k].fd = -1;
    if (parse_outer(outer, ports) != 0)
        return NULL;
    if (coalesce && !tso) {
        PyErr_SetString(PyExc_ValueError, "coalesce=True needs tso=True (a TUN with a virtio_net_hdr)");
        return NULL;
    }
    int vnet_len = tso ? ips_vnet_len_of(tun_fd) : 0;
    if (vnet_len < 0 || (gro && set_gro(ports, 1) != 0))
        return NULL;
    if (target > 0 && set_timestamps(ports, 1) != 0) {
        PyErr_Format(PyExc_OSError, "codel: setsockopt(SO_TIMESTAMPNS): %s", strerror(errno));
        (void)set_timestamps(ports, 0);
        if (gro)
            (void)set_gro(ports, 0);
        return NULL;
    }
    uint32_t slots = 16;
    while (slots < (uint32_t)cache)
        slots <<= 1;
    const char *why = "";
    ips_fwd *f;
    int rc = 0;
    ips_fwd *old = self->fwd;
    self->fwd = NULL;
    Py_BEGIN_ALLOW_THREADS
    ips_fwd_free(old);
    f = ips_fwd_new((uint32_t)batch, (uint32_t)cap, slots, &why);
    if (f != NULL) {
        f->engine = self;
        f->tun_fd = tun_fd;
        f->tso = tso;
        f->vnet_len = vnet_len;
        f->coalesce = coalesce;
        f->gso = gso;
        f->gro = gro;
        f->codel_target = (uint64_t)target * 1000;
        f->codel_interval = (uint64_t)interval * 1000;
        memcpy(f->port, ports, sizeof(ports));
        rc = ips_fwd_run(f, &why);
    }
    Py_END_ALLOW_THREADS
    if (f == NULL) {
        if (gro)
            (void)set_gro(ports, 0);
        if (target > 0)
            (void)set_timestamps(ports, 0);
        PyErr_Clear();
        return PyErr_Format(PyExc_OSError, "cannot start the forwarder: %s", why);
    }
    self->fwd = f;
    if (rc != 0)
        return PyErr_Format(PyExc_OSError, "cannot start the forwarder: %s", why);
    return PyLong_FromLong(f->punts.efd);
}

PyObject *ips_py_fwd_stop(EngineObject *self, PyObject *Py_UNUSED(unused))
{
    ips_fwd *f = self->fwd;
    if (f == NULL)
        Py_RETURN_NONE;
    if (self->fwd_users > 0) {
        PyErr_SetString(PyExc_ValueError, "the forwarder is in use by another thread; try again");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    ips_fwd_stop(f);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

void ips_fwd_dealloc(EngineObject *self)
{
    ips_fwd *f = self->fwd;
    self->fwd = NULL;
    if (f == NULL)
        return;
    Py_BEGIN_ALLOW_THREADS
    ips_fwd_free(f);
    Py_END_ALLOW_THREADS
}

/* learn_*: the flow key is read with the GIL held (the buffer is Python's), inserted without it. */
static PyObject *learn(EngineObject *self, int dir, PyObject *pkt_o, uint32_t key_spi, uint32_t value, uint32_t aux)
{
    Py_buffer view;
    if (PyObject_GetBuffer(pkt_o, &view, PyBUF_SIMPLE) != 0)
        return NULL;
    ips_flow k;
    int ok = ips_flow_of(view.buf, (size_t)view.len, key_spi, &k) == 0;
    PyBuffer_Release(&view);
    ips_fwd *f = self->fwd;
    if (!ok || f == NULL)
        Py_RETURN_NONE;
    self->fwd_users++;
    Py_BEGIN_ALLOW_THREADS
    ips_flowcache *c = &f->cache[dir];
    pthread_mutex_lock(&c->lock);
    ips_fc_insert(c, &k, value, aux);
    pthread_mutex_unlock(&c->lock);
    Py_END_ALLOW_THREADS
    self->fwd_users--;
    Py_RETURN_NONE;
}

PyObject *ips_py_learn_out(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"pkt", "spi", "mtu", NULL};
    PyObject *pkt, *spi_o, *mtu_o = NULL;
    uint32_t spi = 0;
    long mtu = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$O", kwlist, &pkt, &spi_o, &mtu_o) ||
        (spi_o != Py_None && ips_get_spi(spi_o, &spi) != 0) || in_range(mtu_o, "mtu", 0, 1 << 20, &mtu) != 0)
        return NULL;
    return learn(self, IPS_OUT, pkt, 0, spi, (uint32_t)mtu);
}

PyObject *ips_py_learn_in(EngineObject *self, PyObject *args)
{
    PyObject *pkt, *spi_o;
    uint32_t spi;
    if (!PyArg_ParseTuple(args, "OO", &spi_o, &pkt) || ips_get_spi(spi_o, &spi) != 0)
        return NULL;
    return learn(self, IPS_IN, pkt, spi, 1, 0);
}

PyObject *ips_py_flush(EngineObject *self, PyObject *Py_UNUSED(unused))
{
    ips_fwd *f = self->fwd;
    if (f == NULL)
        Py_RETURN_NONE;
    self->fwd_users++;
    Py_BEGIN_ALLOW_THREADS
    for (int d = 0; d < 2; d++) {
        pthread_mutex_lock(&f->cache[d].lock);
        ips_fc_flush(&f->cache[d]);
        if (d == IPS_OUT)
            f->flushes++;
        pthread_mutex_unlock(&f->cache[d].lock);
    }
    Py_END_ALLOW_THREADS
    self->fwd_users--;
    Py_RETURN_NONE;
}

static PyObject *punt_tuple(const ips_punt *p)
{
    PyObject *data = PyBytes_FromStringAndSize((const char *)p->data, (Py_ssize_t)p->len);
    if (data == NULL)
        return NULL;
    if (p->kind == IPS_PUNT_IN)
        return Py_BuildValue("(skN)", punt_kind_name[p->kind], (unsigned long)p->spi, data);
    if (p->kind == IPS_PUNT_QIN) /* (kind, queue_num, packet id, spi, inner): the packet waits for nfq_verdict */
        return Py_BuildValue("(sIkkN)", punt_kind_name[p->kind], (unsigned)p->queue_num, (unsigned long)p->id,
                             (unsigned long)p->spi, data);
    if (p->kind == IPS_PUNT_QSEG) /* (kind, segment): a cut super-packet's piece, answered with nfq_send */
        return Py_BuildValue("(sN)", punt_kind_name[p->kind], data);
    if (p->kind >= IPS_PUNT_QOUT)
        return Py_BuildValue("(sIkN)", punt_kind_name[p->kind], (unsigned)p->queue_num, (unsigned long)p->id, data);
    return Py_BuildValue("(sN)", punt_kind_name[p->kind], data);
}

PyObject *ips_py_take_punts(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"max", NULL};
    PyObject *max_o = NULL;
    long max = 256;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O", kwlist, &max_o) ||
        in_range(max_o, "max", 1, 1 << 20, &max) != 0)
        return NULL;
    ips_fwd *f = self->fwd;
    PyObject *list = PyList_New(0);
    if (list == NULL || f == NULL || !f->punts.ready)
        return list;
    ips_punt *chain;
    self->fwd_users++;
    Py_BEGIN_ALLOW_THREADS
    chain = ips_pq_take(&f->punts, (uint32_t)max, ips_events_pending(&self->events));
    Py_END_ALLOW_THREADS
    self->fwd_users--;
    for (ips_punt *p = chain; p != NULL && list != NULL; p = p->next) {
        PyObject *t = punt_tuple(p);
        if (t == NULL || PyList_Append(list, t) != 0)
            Py_CLEAR(list);
        Py_XDECREF(t);
    }
    ips_punt_free_chain(chain);
    return list;
}

/* ---- fwd_stats ------------------------------------------------------------------------------- */

typedef struct {
    ips_fwd_counters c;
    uint64_t entries[2], hits[2], misses[2], flushes;
    uint64_t queued[IPS_PUNT_KINDS], dropped, waiting, nnfq;
    int running, failed, tso, coalesce, gso, gro;
} fwd_snapshot;

static void snapshot(ips_fwd *f, fwd_snapshot *s)
{
    memset(s, 0, sizeof(*s));
    if (f == NULL)
        return;
    s->running = f->running;
    s->nnfq = f->nnfq;
    pthread_mutex_lock(&f->stats_lock);
    s->c = f->c;
    pthread_mutex_unlock(&f->stats_lock);
    for (int d = 0; d < 2; d++) {
        ips_flowcache *c = &f->cache[d];
        pthread_mutex_lock(&c->lock);
        s->entries[d] = c->entries;
        s->hits[d] = c->hits;
        s->misses[d] = c->misses;
        if (d == IPS_OUT)
            s->flushes = f->flushes;
        pthread_mutex_unlock(&c->lock);
    }
    if (f->punts.ready) {
        pthread_mutex_lock(&f->punts.lock);
        memcpy(s->queued, f->punts.queued, sizeof(s->queued));
        s->dropped = f->punts.dropped;
        s->waiting = f->punts.count;
        pthread_mutex_unlock(&f->punts.lock);
    } else { /* stopped: the threads are joined, the queue's counters stay as they were */
        memcpy(s->queued, f->punts.queued, sizeof(s->queued));
        s->dropped = f->punts.dropped;
    }
    s->failed = f->failed;
    s->tso = f->tso;
    s->coalesce = f->coalesce;
    s->gso = f->gso;
    s->gro = f->gro;
}

static PyObject *per_kind(const uint64_t *v)
{
    PyObject *d = PyDict_New();
    for (int k = 0; d != NULL && k < K_KINDS; k++) {
        PyObject *n = PyLong_FromUnsignedLongLong(v[k]);
        if (n == NULL || PyDict_SetItemString(d, ips_fd_kind_name[k], n) != 0)
            Py_CLEAR(d);
        Py_XDECREF(n);
    }
    return d;
}

static PyObject *reasons(const uint64_t *drops)
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

#define U(x) ((unsigned long long)(x))

PyObject *ips_py_fwd_stats(EngineObject *self, PyObject *Py_UNUSED(unused))
{
    fwd_snapshot s;
    ips_fwd *f = self->fwd;
    self->fwd_users++;
    Py_BEGIN_ALLOW_THREADS
    snapshot(f, &s);
    Py_END_ALLOW_THREADS
    self->fwd_users--;
    const ips_fwd_counters *c = &s.c;
    PyObject *d = Py_BuildValue(
        "{s:O,s:O,s:{s:O,s:O,s:O,s:O},s:{s:K,s:K,s:K},s:{s:K,s:K},s:{s:K,s:K},s:{s:K,s:K}}", "failed",
        s.failed ? Py_True : Py_False, "vnet_hdr", s.tso ? Py_True : Py_False, "offloads", "tso",
        s.tso ? Py_True : Py_False, "coalesce", s.coalesce ? Py_True : Py_False, "gso", s.gso ? Py_True : Py_False,
        "gro", s.gro ? Py_True : Py_False, "tso", "super", U(c->tso_super), "segments", U(c->tso_segments),
        "csum_completed", U(c->csum_completed), "gso", "sends", U(c->gso_sends), "segments", U(c->gso_segments),
        "gro", "super", U(c->gro_super), "segments", U(c->gro_segments), "coalesced", "writes", U(c->coal_writes),
        "segments", U(c->coal_segments));
    if (d == NULL)
        return NULL;
    PyObject *base = Py_BuildValue(
        "{s:O,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:{s:K,s:K,s:K},s:K,s:K,s:N,s:N,"
        "s:{s:{s:K,s:K,s:K},s:{s:K,s:K,s:K},s:K},s:N,"
        "s:{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:{s:K,s:K,s:K,s:K}}}",
        "running", s.running ? Py_True : Py_False, "out_packets", U(c->packets[IPS_OUT]), "out_bytes",
        U(c->bytes[IPS_OUT]), "in_packets", U(c->packets[IPS_IN]), "in_bytes", U(c->bytes[IPS_IN]), "syscalls",
        U(c->syscalls), "batches_out", U(c->batches[IPS_OUT]), "batches_in", U(c->batches[IPS_IN]), "punts", "out",
        U(s.queued[IPS_PUNT_OUT]), "in", U(s.queued[IPS_PUNT_IN]), "outer", U(s.queued[IPS_PUNT_OUTER]),
        "punt_dropped", U(s.dropped), "punt_waiting", U(s.waiting), "tx_errors", per_kind(c->tx_errors),
        "rx_errors", per_kind(c->rx_errors), "cache", "out", "entries", U(s.entries[IPS_OUT]), "hits",
        U(s.hits[IPS_OUT]), "misses", U(s.misses[IPS_OUT]), "in", "entries", U(s.entries[IPS_IN]), "hits",
        U(s.hits[IPS_IN]), "misses", U(s.misses[IPS_IN]), "flushes", U(s.flushes), "drops", reasons(c->drops),
        "nfq", "queues", U(s.nnfq), "received", U(c->nfq_rx), "accepted", U(c->nfq_accept), "dropped",
        U(c->nfq_drop), "python_verdicts", U(c->nfq_py_verdicts), "kernel_errors", U(c->nfq_kernel_errors),
        "malformed", U(c->nfq_malformed), "tx_errors", U(c->nfq_tx_errors), "truncated", U(c->nfq_truncated),
        "too_big", U(c->nfq_too_big), "qout", U(s.queued[IPS_PUNT_QOUT]), "qin", U(s.queued[IPS_PUNT_QIN]),
        "qouter", U(s.queued[IPS_PUNT_QOUTER]), "qseg", U(s.queued[IPS_PUNT_QSEG]), "tcp_queue", "super",
        U(c->nfq_gso_super), "segments", U(c->nfq_gso_segments), "csum_finished", U(c->nfq_csum_finished),
        "raw_sent", U(c->nfq_raw_sent));
    if (base == NULL || PyDict_Update(base, d) != 0)
        Py_CLEAR(base);
    Py_DECREF(d);
    return base;
}

/* codel_trace(target_ns, interval_ns, dequeues) -> list[bool]: codel.c's decision per (now_ns, sojourn_ns)
 * dequeue, in order, for tests (the state machine alone, without a socket) */
PyObject *ips_py_codel_trace(PyObject *Py_UNUSED(module), PyObject *args)
{
    unsigned long long target, interval;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "KKO", &target, &interval, &seq))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "dequeues must be a sequence of (now_ns, sojourn_ns) pairs");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject *out = PyList_New(n);
    ips_codel c;
    ips_codel_init(&c, target, interval);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        unsigned long long now, sojourn;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KK", &now, &sojourn)) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, PyBool_FromLong(ips_codel_drop(&c, now, sojourn)));
    }
    Py_DECREF(fast);
    return out;
}
