/*
 * The NFQUEUE methods of Engine (see nfq.h and fwd_nfq.c) and the codec's test entry points:
 *
 *   nfq_start(queues, *, batch=64, punt_capacity=4096, cache_size=65536, encap_ports=(4500,), coalesce=True,
 *             raw4=None, raw6=None, esp4=None, esp6=None, inject=None)
 *       -> the punt eventfd. queues: ("out" | "in" | "tcp", netlink fd, queue number, mark | None) for
 *       each bound queue; sets each queue's copy range to 0xFFFF (and NFQA_CFG_F_GSO on a "tcp" queue,
 *       whose ESP packets leave by the IPPROTO_RAW sockets raw4/raw6: fwd_nfq_gso.c), then starts one
 *       thread per queue. esp4/esp6 (raw IPPROTO_ESP sockets) with inject (a TUN fd, with or without
 *       the virtio header): the forwarder's inbound thread (fwd_in.c) reads the host's ESP from the
 *       sockets instead of a queue and writes what it decrypts into the TUN, TCP coalesced into
 *       super-packets when the TUN has the header; "in" and "outer" punts come from it.
 *   nfq_send(packet) -> bool
 *       Python's answer to a "qseg" punt: the packet (ESP, or plaintext let through) sent on the raw
 *       socket of its IP version. False when there is none or the kernel refused it.
 *       Stopped by fwd_stop() (nfq_stop is the same call); the punts, learn_*, flush, fwd_stats are
 *       the forwarder's (pyfwd.c).
 *   nfq_verdict(queue_num, packet_id, payload | None, mark=None) -> bool
 *       Python's answer to a "q*" punt: ACCEPT with payload as the packet (and mark), or DROP (None).
 *       False when the kernel refused it (counted in fwd_stats()["nfq"]["tx_errors"]).
 *   nfq_parse(data) -> list, nfq_build_verdict(...) -> bytes, nfq_config_copy(...) / nfq_config_flags(...) -> bytes
 *       module functions: the codec on Python buffers, for tests and fuzzing.
 *
 * As in pyfwd.c: arguments are checked with the GIL held, sockets are used with it released, and a
 * call using the forwarder's memory without the GIL counts itself in fwd_users.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdlib.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "fwd.h"
#include "pyglue.h"

#define COPY_RANGE 0xFFFF

static int long_in(PyObject *o, const char *name, long lo, long hi, long *v)
{
    *v = PyLong_AsLong(o);
    if (*v == -1 && PyErr_Occurred())
        return -1;
    if (*v < lo || *v > hi) {
        PyErr_Format(PyExc_ValueError, "%s = %ld: use %ld..%ld", name, *v, lo, hi);
        return -1;
    }
    return 0;
}

static int get_mark(PyObject *o, uint8_t *has, uint32_t *mark)
{
    *has = 0;
    *mark = 0;
    if (o == NULL || o == Py_None)
        return 0;
    unsigned long v = PyLong_AsUnsignedLong(o);
    if (v == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (v > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_ValueError, "mark must fit 32 bits");
        return -1;
    }
    *has = 1;
    *mark = (uint32_t)v;
    return 0;
}

static int check_netlink(int fd, Py_ssize_t i)
{
    int domain = 0, proto = 0;
    socklen_t len = sizeof(int);
    if (fcntl(fd, F_GETFL) < 0) {
        PyErr_Format(PyExc_OSError, "queues[%zd]: fd %d: %s", i, fd, strerror(errno));
        return -1;
    }
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 ||
        getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &proto, &len) != 0 || domain != AF_NETLINK ||
        proto != NETLINK_NETFILTER) {
        PyErr_Format(PyExc_ValueError, "queues[%zd]: fd %d is not a netfilter netlink socket (NfqueuePort._fd)", i,
                     fd);
        return -1;
    }
    return 0;
}

static int parse_queues(PyObject *queues, ips_nfq_queue *out, uint32_t *n)
{
    PyObject *fast = PySequence_Fast(queues, "queues must be a sequence of (kind, fd, queue_num, mark) tuples");
    if (fast == NULL)
        return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fast);
    int rc = 0;
    if (count < 1 || count > IPS_NFQ_QUEUES) {
        PyErr_Format(PyExc_ValueError, "give 1..%d queues, not %zd", IPS_NFQ_QUEUES, count);
        rc = -1;
    }
    for (Py_ssize_t i = 0; rc == 0 && i < count; i++) {
        const char *kind;
        int fd;
        long num;
        PyObject *num_o, *mark_o;
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        ips_nfq_queue *q = &out[i];
        memset(q, 0, sizeof(*q));
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "siOO", &kind, &fd, &num_o, &mark_o)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "queues[%zd] must be a (kind, fd, queue_num, mark) tuple", i);
            rc = -1;
        } else if (strcmp(kind, "out") != 0 && strcmp(kind, "in") != 0 && strcmp(kind, "tcp") != 0) {
            PyErr_Format(PyExc_ValueError, "queues[%zd]: kind %R: use 'out', 'in' or 'tcp'", i,
                         PyTuple_GET_ITEM(item, 0));
            rc = -1;
        } else if (long_in(num_o, "queue_num", 0, 0xFFFF, &num) != 0 || get_mark(mark_o, &q->has_mark, &q->mark) != 0 ||
                   check_netlink(fd, i) != 0) {
            rc = -1;
        } else {
            q->fd = fd;
            q->queue_num = (uint16_t)num;
            q->inbound = strcmp(kind, "in") == 0;
            q->gso = strcmp(kind, "tcp") == 0;
            for (Py_ssize_t j = 0; j < i; j++)
                if (out[j].queue_num == q->queue_num) {
                    PyErr_Format(PyExc_ValueError, "queues[%zd]: queue %ld is given twice", i, num);
                    rc = -1;
                }
        }
    }
    *n = rc == 0 ? (uint32_t)count : 0;
    Py_DECREF(fast);
    return rc;
}

static int parse_encap(PyObject *o, uint16_t *ports, uint32_t *n)
{
    *n = 0;
    if (o == NULL) {
        ports[(*n)++] = 4500; /* RFC 3948 */
        return 0;
    }
    PyObject *fast = PySequence_Fast(o, "encap_ports must be a sequence of UDP ports");
    if (fast == NULL)
        return -1;
    int rc = 0;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fast);
    if (count > IPS_NFQ_ENCAP) {
        PyErr_Format(PyExc_ValueError, "at most %d encap_ports", IPS_NFQ_ENCAP);
        rc = -1;
    }
    for (Py_ssize_t i = 0; rc == 0 && i < count; i++) {
        long v;
        if (long_in(PySequence_Fast_GET_ITEM(fast, i), "encap port", 1, 0xFFFF, &v) != 0)
            rc = -1;
        else
            ports[(*n)++] = (uint16_t)v;
    }
    Py_DECREF(fast);
    return rc;
}

/* NFQNL_MSG_CONFIG: copy whole packets (up to 64 KiB) instead of NetfilterQueue's 4016 bytes. */
static int send_config(const ips_nfq_queue *q, const uint8_t *buf, size_t n)
{
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    ssize_t r;
    do
        r = sendto(q->fd, buf, n, 0, (struct sockaddr *)&kernel, sizeof(kernel));
    while (r < 0 && errno == EINTR);
    return r == (ssize_t)n ? 0 : -1;
}

/* The copy range, and on the TCP queue GSO packets handed over whole (NFQA_CFG_F_GSO). */
static int set_copy_range(const ips_nfq_queue *q)
{
    uint8_t buf[40];
    if (send_config(q, buf, ips_nfq_config_copy(buf, q->queue_num, COPY_RANGE)) != 0)
        return -1;
    if (q->gso) {
        size_t n = ips_nfq_config_flags(buf, q->queue_num, IPS_NFQ_CFG_F_GSO, IPS_NFQ_CFG_F_GSO);
        return send_config(q, buf, n);
    }
    return 0;
}

/* A raw socket of this family and protocol (IPPROTO_RAW to send, IPPROTO_ESP to receive), or None (-1). */
static int raw_fd(PyObject *o, const char *name, int family, int protocol, int *fd)
{
    *fd = -1;
    if (o == NULL || o == Py_None)
        return 0;
    long v;
    if (long_in(o, name, 0, 1 << 30, &v) != 0)
        return -1;
    int domain = 0, type = 0, proto = 0;
    socklen_t len = sizeof(int);
    if (getsockopt((int)v, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 ||
        getsockopt((int)v, SOL_SOCKET, SO_TYPE, &type, &len) != 0 ||
        getsockopt((int)v, SOL_SOCKET, SO_PROTOCOL, &proto, &len) != 0 || domain != family || type != SOCK_RAW ||
        proto != protocol) {
        PyErr_Format(PyExc_ValueError, "%s = %ld is not an IPPROTO_%s socket of its family", name, v,
                     protocol == IPPROTO_RAW ? "RAW" : "ESP");
        return -1;
    }
    *fd = (int)v;
    return 0;
}

PyObject *ips_py_nfq_start(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"queues", "batch", "punt_capacity", "cache_size", "encap_ports", "coalesce",
                             "raw4",   "raw6",  "esp4",          "esp6",       "inject",      NULL};
    PyObject *queues, *batch_o = NULL, *cap_o = NULL, *cache_o = NULL, *encap_o = NULL, *raw4_o = NULL,
                      *raw6_o = NULL, *esp4_o = NULL, *esp6_o = NULL, *inject_o = NULL;
    long batch = 64, cap = 4096, cache = 65536, inject = -1;
    int coalesce = 1, raw4 = -1, raw6 = -1, esp4 = -1, esp6 = -1, vnet_len = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$OOOOpOOOOO", kwlist, &queues, &batch_o, &cap_o, &cache_o,
                                     &encap_o, &coalesce, &raw4_o, &raw6_o, &esp4_o, &esp6_o, &inject_o) ||
        raw_fd(raw4_o, "raw4", AF_INET, IPPROTO_RAW, &raw4) != 0 ||
        raw_fd(raw6_o, "raw6", AF_INET6, IPPROTO_RAW, &raw6) != 0 ||
        raw_fd(esp4_o, "esp4", AF_INET, IPPROTO_ESP, &esp4) != 0 ||
        raw_fd(esp6_o, "esp6", AF_INET6, IPPROTO_ESP, &esp6) != 0 ||
        (inject_o && inject_o != Py_None && long_in(inject_o, "inject", 0, 1 << 30, &inject) != 0) ||
        (batch_o && long_in(batch_o, "batch", 1, 256, &batch) != 0) ||
        (cap_o && long_in(cap_o, "punt_capacity", 1, 1 << 20, &cap) != 0) ||
        (cache_o && long_in(cache_o, "cache_size", 1, 1 << 24, &cache) != 0))
        return NULL;
    if (self->fwd != NULL && self->fwd->running) {
        PyErr_SetString(PyExc_ValueError, "the forwarder is already running; call fwd_stop() first");
        return NULL;
    }
    if (self->fwd_users > 0) {
        PyErr_SetString(PyExc_ValueError, "the forwarder is in use by another thread; try again");
        return NULL;
    }
    if ((esp4 >= 0 || esp6 >= 0) != (inject >= 0)) {
        PyErr_SetString(PyExc_ValueError, "esp4/esp6 and inject go together: the ESP the raw sockets receive "
                                          "is decrypted into the inject TUN");
        return NULL;
    }
    if (inject >= 0 && (vnet_len = ips_vnet_len_of((int)inject)) < 0)
        return NULL;
    ips_nfq_queue qs[IPS_NFQ_QUEUES];
    uint16_t encap[IPS_NFQ_ENCAP];
    uint32_t nq = 0, nencap = 0;
    if (parse_queues(queues, qs, &nq) != 0 || parse_encap(encap_o, encap, &nencap) != 0)
        return NULL;
    for (uint32_t i = 0; i < nq; i++)
        if (qs[i].gso && raw4 < 0 && raw6 < 0) {
            PyErr_SetString(PyExc_ValueError, "a 'tcp' queue sends on raw sockets: give raw4 and/or raw6");
            return NULL;
        }
    for (uint32_t i = 0; i < nq; i++)
        if (set_copy_range(&qs[i]) != 0)
            return PyErr_Format(PyExc_OSError, "NFQUEUE %u: cannot set the copy range: %s", qs[i].queue_num,
                                strerror(errno));
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
        memcpy(f->nfq, qs, sizeof(qs[0]) * nq);
        f->nnfq = nq;
        memcpy(f->encap_ports, encap, sizeof(encap[0]) * nencap);
        f->nencap = nencap;
        f->coalesce = coalesce;
        f->nfq_raw[0] = raw4;
        f->nfq_raw[1] = raw6;
        f->port[K_ESP4].fd = esp4;
        f->port[K_ESP6].fd = esp6;
        f->tun_fd = (int)inject;
        f->tso = vnet_len > 0; /* the inject TUN: decrypted TCP coalesced into super-packets (fwd_coal.c) */
        f->vnet_len = vnet_len;
        rc = ips_nfq_run(f, &why);
    }
    Py_END_ALLOW_THREADS
    if (f == NULL)
        return PyErr_Format(PyExc_OSError, "cannot start the NFQUEUE forwarder: %s", why);
    self->fwd = f;
    if (rc != 0)
        return PyErr_Format(PyExc_OSError, "cannot start the NFQUEUE forwarder: %s", why);
    return PyLong_FromLong(f->punts.efd);
}

PyObject *ips_py_nfq_verdict(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"queue_num", "packet_id", "payload", "mark", NULL};
    PyObject *num_o, *id_o, *payload_o, *mark_o = Py_None;
    long num;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|O", kwlist, &num_o, &id_o, &payload_o, &mark_o) ||
        long_in(num_o, "queue_num", 0, 0xFFFF, &num) != 0)
        return NULL;
    unsigned long id = PyLong_AsUnsignedLong(id_o);
    if (id == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (id > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_ValueError, "packet_id must fit 32 bits");
        return NULL;
    }
    uint8_t has_mark;
    uint32_t mark;
    if (get_mark(mark_o, &has_mark, &mark) != 0)
        return NULL;
    ips_fwd *f = self->fwd;
    const ips_nfq_queue *q = NULL;
    for (uint32_t i = 0; f != NULL && i < f->nnfq; i++)
        if (f->nfq[i].queue_num == (uint16_t)num)
            q = &f->nfq[i];
    if (q == NULL)
        return PyErr_Format(PyExc_ValueError, "queue %ld is not one nfq_start was given", num);
    Py_buffer view = {0};
    int has_payload = payload_o != Py_None;
    if (has_payload && PyObject_GetBuffer(payload_o, &view, PyBUF_SIMPLE) != 0)
        return NULL;
    uint8_t hdr[IPS_NFQ_VERDICT_HDR];
    size_t plen = has_payload ? (size_t)view.len : 0;
    size_t hlen = ips_nfq_verdict_hdr(hdr, q->queue_num, (uint32_t)id, has_payload ? IPS_NFQ_ACCEPT : IPS_NFQ_DROP,
                                      has_payload && has_mark, mark, has_payload, plen);
    if (hlen == 0) { /* too long for an attribute: the packet is dropped instead */
        has_payload = 0;
        plen = 0;
        hlen = ips_nfq_verdict_hdr(hdr, q->queue_num, (uint32_t)id, IPS_NFQ_DROP, 0, 0, 0, 0);
    }
    static const uint8_t zeros[4] = {0};
    struct iovec iov[3] = {{.iov_base = hdr, .iov_len = hlen}};
    size_t n = 1;
    if (plen > 0)
        iov[n++] = (struct iovec){.iov_base = view.buf, .iov_len = plen};
    size_t pad = ips_nfq_pad(hlen + plen);
    if (pad)
        iov[n++] = (struct iovec){.iov_base = (void *)zeros, .iov_len = pad};
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    struct msghdr m = {.msg_name = &kernel, .msg_namelen = sizeof(kernel), .msg_iov = iov, .msg_iovlen = n};
    int fd = q->fd;
    ssize_t r;
    self->fwd_users++;
    Py_BEGIN_ALLOW_THREADS
    do
        r = sendmsg(fd, &m, MSG_DONTWAIT);
    while (r < 0 && errno == EINTR);
    pthread_mutex_lock(&f->stats_lock);
    f->c.nfq_py_verdicts++;
    f->c.syscalls++;
    if (r < 0)
        f->c.nfq_tx_errors++;
    else if (has_payload)
        f->c.nfq_accept++;
    else
        f->c.nfq_drop++;
    pthread_mutex_unlock(&f->stats_lock);
    Py_END_ALLOW_THREADS
    self->fwd_users--;
    if (payload_o != Py_None)
        PyBuffer_Release(&view);
    return PyBool_FromLong(r >= 0);
}

PyObject *ips_py_nfq_send(EngineObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) != 0)
        return NULL;
    ips_fwd *f = self->fwd;
    const uint8_t *p = view.buf;
    int v6 = view.len >= 40 && p[0] >> 4 == 6;
    int fd = f == NULL || !f->running ? -1 : f->nfq_raw[v6];
    if (fd < 0 || view.len < 20 || (!v6 && p[0] >> 4 != 4)) {
        PyBuffer_Release(&view);
        Py_RETURN_FALSE;
    }
    struct sockaddr_in6 name;
    socklen_t namelen = ips_raw_dest(p, &name);
    ssize_t r;
    self->fwd_users++;
    Py_BEGIN_ALLOW_THREADS
    do
        r = sendto(fd, p, (size_t)view.len, MSG_DONTWAIT, (struct sockaddr *)&name, namelen);
    while (r < 0 && errno == EINTR);
    pthread_mutex_lock(&f->stats_lock);
    f->c.syscalls++;
    if (r < 0)
        f->c.tx_errors[v6 ? K_RAW6 : K_RAW4]++;
    else {
        f->c.nfq_raw_sent++;
        f->c.packets[IPS_OUT]++;
        f->c.bytes[IPS_OUT] += (uint64_t)view.len;
    }
    pthread_mutex_unlock(&f->stats_lock);
    Py_END_ALLOW_THREADS
    self->fwd_users--;
    PyBuffer_Release(&view);
    return PyBool_FromLong(r >= 0);
}

/* ---- the codec on Python buffers (tests, fuzzing) ------------------------------------------- */

static PyObject *packet_tuple(const char *what, const ips_nfq_packet *p)
{
    PyObject *payload = Py_None, *mark = Py_None;
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    if (p->payload != NULL) {
        Py_DECREF(payload);
        payload = PyBytes_FromStringAndSize((const char *)p->payload, (Py_ssize_t)p->payload_len);
    }
    if (p->has_mark) {
        Py_DECREF(mark);
        mark = PyLong_FromUnsignedLong(p->mark);
    }
    if (payload == NULL || mark == NULL) {
        Py_XDECREF(payload);
        Py_XDECREF(mark);
        return NULL;
    }
    return Py_BuildValue("(sIkNkNk)", what, (unsigned)p->queue_num, (unsigned long)p->id, payload,
                         (unsigned long)p->cap_len, mark, (unsigned long)p->skbinfo);
}

/* tcp_merge(packets, max_segments=16, max_bytes=24576) -> list: the in queue's coalescing (fwd_coal.c
 * ips_merge) on Python bytes, for tests: per packet, the packet its verdict carries, or None (absorbed). */
PyObject *ips_py_tcp_merge(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"packets", "max_segments", "max_bytes", NULL};
    PyObject *seq;
    unsigned int max_count = 16, max_bytes = 24576;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|II", kwlist, &seq, &max_count, &max_bytes))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "packets must be a sequence of bytes");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > 4096) {
        Py_DECREF(fast);
        return PyErr_Format(PyExc_ValueError, "at most 4096 packets");
    }
    const size_t slot = 65536 + 2048;
    uint8_t *buf = malloc((size_t)(n ? n : 1) * slot);
    ips_delivery *d = calloc((size_t)(n ? n : 1), sizeof(*d));
    uint8_t *absorbed = calloc((size_t)(n ? n : 1), 1);
    PyObject *out = NULL;
    if (buf == NULL || d == NULL || absorbed == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        char *b;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(PySequence_Fast_GET_ITEM(fast, i), &b, &len) != 0)
            goto done;
        if (len > 65535) {
            PyErr_SetString(PyExc_ValueError, "a packet is longer than 65535 bytes");
            goto done;
        }
        memcpy(buf + (size_t)i * slot, b, (size_t)len);
        d[i] = (ips_delivery){.pkt = buf + (size_t)i * slot, .len = (uint32_t)len};
    }
    ips_fwd_counters c;
    memset(&c, 0, sizeof(c));
    ips_merge(&c, d, (uint32_t)n, absorbed, max_count, max_bytes);
    out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *item = absorbed[i] ? Py_NewRef(Py_None) : PyBytes_FromStringAndSize((char *)d[i].pkt, d[i].len);
        if (item == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, item);
    }
done:
    free(buf);
    free(d);
    free(absorbed);
    Py_DECREF(fast);
    return out;
}

PyObject *ips_py_nfq_parse(PyObject *Py_UNUSED(module), PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) != 0)
        return NULL;
    PyObject *list = PyList_New(0);
    size_t off = 0;
    for (int guard = 0; list != NULL && guard < 100000; guard++) {
        ips_nfq_packet p;
        int err;
        ips_nfq_kind k = ips_nfq_next(view.buf, (size_t)view.len, &off, &p, &err);
        if (k == IPS_NFQ_END)
            break;
        PyObject *t = NULL;
        switch (k) {
        case IPS_NFQ_PACKET:
            t = packet_tuple("packet", &p);
            break;
        case IPS_NFQ_BAD_PACKET:
            t = packet_tuple("bad_packet", &p);
            break;
        case IPS_NFQ_ERROR:
            t = Py_BuildValue("(si)", "error", err);
            break;
        case IPS_NFQ_OTHER:
            t = Py_BuildValue("(s)", "other");
            break;
        default:
            t = Py_BuildValue("(s)", "malformed");
            break;
        }
        if (t == NULL || PyList_Append(list, t) != 0)
            Py_CLEAR(list);
        Py_XDECREF(t);
        if (k == IPS_NFQ_MALFORMED)
            break;
    }
    PyBuffer_Release(&view);
    return list;
}

PyObject *ips_py_nfq_build_verdict(PyObject *Py_UNUSED(module), PyObject *args)
{
    long num;
    unsigned long id, verdict;
    PyObject *num_o, *payload_o, *mark_o;
    if (!PyArg_ParseTuple(args, "OkkOO", &num_o, &id, &verdict, &payload_o, &mark_o) ||
        long_in(num_o, "queue_num", 0, 0xFFFF, &num) != 0)
        return NULL;
    uint8_t has_mark;
    uint32_t mark;
    if (get_mark(mark_o, &has_mark, &mark) != 0)
        return NULL;
    Py_buffer view = {0};
    int has_payload = payload_o != Py_None;
    if (has_payload && PyObject_GetBuffer(payload_o, &view, PyBUF_SIMPLE) != 0)
        return NULL;
    size_t plen = has_payload ? (size_t)view.len : 0;
    uint8_t hdr[IPS_NFQ_VERDICT_HDR];
    size_t hlen = ips_nfq_verdict_hdr(hdr, (uint16_t)num, (uint32_t)id, (uint32_t)verdict, has_mark, mark,
                                      has_payload, plen);
    PyObject *out = NULL;
    if (hlen == 0) {
        PyErr_SetString(PyExc_ValueError, "payload too long for a netlink attribute");
    } else {
        size_t total = hlen + plen, pad = ips_nfq_pad(total);
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(total + pad));
        if (out != NULL) {
            char *b = PyBytes_AS_STRING(out);
            memcpy(b, hdr, hlen);
            if (plen)
                memcpy(b + hlen, view.buf, plen);
            memset(b + total, 0, pad);
        }
    }
    if (has_payload)
        PyBuffer_Release(&view);
    return out;
}

PyObject *ips_py_nfq_config_copy(PyObject *Py_UNUSED(module), PyObject *args)
{
    long num;
    unsigned long range;
    PyObject *num_o;
    if (!PyArg_ParseTuple(args, "Ok", &num_o, &range) || long_in(num_o, "queue_num", 0, 0xFFFF, &num) != 0)
        return NULL;
    uint8_t buf[32];
    size_t n = ips_nfq_config_copy(buf, (uint16_t)num, (uint32_t)range);
    return PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)n);
}

PyObject *ips_py_nfq_config_flags(PyObject *Py_UNUSED(module), PyObject *args)
{
    long num;
    unsigned long flags, mask;
    PyObject *num_o;
    if (!PyArg_ParseTuple(args, "Okk", &num_o, &flags, &mask) || long_in(num_o, "queue_num", 0, 0xFFFF, &num) != 0)
        return NULL;
    uint8_t buf[40];
    size_t n = ips_nfq_config_flags(buf, (uint16_t)num, (uint32_t)flags, (uint32_t)mask);
    return PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)n);
}

/* inet_sum(data, start=0) -> int: the folded ones' complement sum of data's network-order words added to
 * start (fwd_seg.c ips_csum_add, which every checksum the forwarder writes uses), for tests. */
PyObject *ips_py_inet_sum(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer view;
    unsigned int start = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &view, &start))
        return NULL;
    uint32_t s = ips_csum_add(start, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(s);
}
