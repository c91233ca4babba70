/*
 * The inbound thread's writes to the inner fd (see fwd.h), and TCP coalescing for a vnet_hdr TUN.
 *
 * Without coalescing every decrypted packet is one write() (on a vnet_hdr TUN with an all-zero
 * virtio_net_hdr in the room before it: an ordinary packet whose checksums the kernel checks).
 *
 * With coalescing (fwd_start(tso=True, coalesce=True)), consecutive in-order TCP segments of one flow
 * in a round become one super-packet written with one writev(): the first segment's headers (IP total
 * or payload length and the IPv4 checksum fixed, PSH taken from the last segment, the TCP checksum
 * field set to the pseudo-header sum) and every segment's payload, with a virtio_net_hdr saying
 * GSO_TCPV4/6, gso_size = the first segment's payload and NEEDS_CSUM at the TCP checksum. The kernel
 * then takes the whole run into its stack at once, as its own GRO would (and re-segments it if it
 * forwards it). Nothing is copied: the iovecs point into the arena. A segment joins a run only as
 * GRO would take it: the next sequence number, a payload no larger than the run's segment size (a
 * shorter one ends the run), the same IP header fields (TOS, TTL or hop limit, DF, flow label), the
 * same TCP acknowledgment, window and options, flags ACK (PSH ends the run); IPv4 without options and
 * IPv6 without extension headers only. The inner packets' integrity was checked by ESP (the ICV
 * covers them), which is why the kernel may skip the per-segment checksums. Up to IPS_COAL_OPEN
 * flows are coalesced at once (so interleaved streams coalesce too); a flow's run is written before
 * the next run of that flow starts, so the order within a flow is kept (other flows may pass).
 */
#define _GNU_SOURCE 1
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <linux/virtio_net.h>

#include "fwd.h"

static unsigned be16(const uint8_t *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

static uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

typedef struct {
    uint32_t l3, hdrs, payload, seq;
    uint8_t flags;
} tcp_seg;

typedef struct {
    uint32_t idx[IPS_COAL_MAX];
    uint32_t count, gso, next_seq, bytes;
    tcp_seg first;
    int closed; /* the last segment was short or had PSH: nothing more joins */
} run;

typedef struct {
    uint32_t max_count, max_bytes; /* a run's limits: segments, payload bytes */
    void (*sink)(void *ctx, ips_delivery *d, const run *r); /* a run of one: an ordinary packet */
    void *ctx;
} planner;

static void write_one(ips_fwd *f, ips_fwd_counters *c, const ips_delivery *d)
{
    size_t vl = f->tso ? (size_t)f->vnet_len : 0;
    if (vl)
        ips_vnet_write(d->pkt - vl, vl, NULL);
    ssize_t w;
    do
        w = write(f->tun_fd, d->pkt - vl, d->len + vl);
    while (w < 0 && errno == EINTR);
    c->syscalls++;
    if (w < 0) {
        c->tx_errors[K_TUN]++;
    } else {
        c->packets[IPS_IN]++;
        c->bytes[IPS_IN] += d->len;
    }
}

/* A TCP segment that may be coalesced: 1 and *t, or 0. */
static int tcp_of(const ips_delivery *d, tcp_seg *t)
{
    const uint8_t *p = d->pkt;
    size_t n = d->len;
    if (n < 40)
        return 0;
    if (p[0] == 0x45) {
        if (p[9] != 6 || be16(p + 2) != n || (be16(p + 6) & 0xBFFF) != 0)
            return 0; /* not TCP, a length that does not match, or a fragment */
        t->l3 = 20;
    } else if (p[0] >> 4 == 6) {
        if (n < 60 || p[6] != 6 || 40 + be16(p + 4) != n)
            return 0;
        t->l3 = 40;
    } else {
        return 0;
    }
    const uint8_t *th = p + t->l3;
    size_t thl = (size_t)(th[12] >> 4) * 4;
    if (thl < 20 || t->l3 + thl > n)
        return 0;
    t->hdrs = (uint32_t)(t->l3 + thl);
    t->payload = (uint32_t)(n - t->hdrs);
    t->seq = be32(th + 4);
    t->flags = th[13];
    return 1;
}

static int same_flow(const ips_delivery *a, const ips_delivery *b, uint32_t l3)
{
    if ((a->pkt[0] >> 4) != (b->pkt[0] >> 4))
        return 0;
    if (l3 == 20)
        return memcmp(a->pkt + 12, b->pkt + 12, 8) == 0 && memcmp(a->pkt + 20, b->pkt + 20, 4) == 0;
    return memcmp(a->pkt + 8, b->pkt + 8, 32) == 0 && memcmp(a->pkt + 40, b->pkt + 40, 4) == 0;
}

/* May segment t (packet b) follow run r (first packet a)? */
static int joins(const planner *lim, const run *r, const ips_delivery *a, const ips_delivery *b, const tcp_seg *t)
{
    const tcp_seg *h = &r->first;
    if (r->closed || r->count == lim->max_count || t->payload == 0 || t->payload > r->gso || t->seq != r->next_seq ||
        t->hdrs != h->hdrs || (t->flags & ~0x08) != 0x10 || r->bytes + t->payload > lim->max_bytes)
        return 0;
    const uint8_t *x = a->pkt, *y = b->pkt;
    if (h->l3 == 20) { /* TOS, DF, TTL */
        if (x[1] != y[1] || (x[6] & 0x40) != (y[6] & 0x40) || x[8] != y[8])
            return 0;
    } else if (memcmp(x, y, 4) != 0 || x[7] != y[7]) { /* traffic class, flow label, hop limit */
        return 0;
    }
    const uint8_t *tx = x + h->l3, *ty = y + h->l3;
    /* acknowledgment, data offset, window; urgent pointer; options */
    return memcmp(tx + 8, ty + 8, 5) == 0 && memcmp(tx + 14, ty + 14, 2) == 0 && memcmp(tx + 18, ty + 18, 2) == 0 &&
           memcmp(tx + 20, ty + 20, h->hdrs - h->l3 - 20) == 0;
}

/* The first segment's headers made the run's: lengths, the IPv4 checksum, PSH of the last segment, the
 * pseudo-header sum in the TCP checksum field. The run's length. */
static size_t run_headers(ips_delivery *d, const run *r)
{
    const tcp_seg *h = &r->first;
    uint8_t *p = d[r->idx[0]].pkt;
    size_t total = h->hdrs + r->bytes;
    if (h->l3 == 20) {
        put16(p + 2, (unsigned)total);
        put16(p + 10, 0);
        put16(p + 10, ips_csum_fold(ips_csum_add(0, p, 20)));
    } else {
        put16(p + 4, (unsigned)(total - 40));
    }
    const ips_delivery *last = &d[r->idx[r->count - 1]];
    p[h->l3 + 13] |= last->pkt[h->l3 + 13] & 0x08;
    uint32_t ps = ips_pseudo_sum(p, 6, total - h->l3);
    while (ps >> 16)
        ps = (ps & 0xFFFF) + (ps >> 16);
    put16(p + h->l3 + 16, ps); /* the rest of the sum: the kernel (NEEDS_CSUM) or ips_csum_complete */
    return total;
}

typedef struct {
    ips_fwd *f;
    ips_fwd_counters *c;
} tun_sink_ctx;

static void tun_sink(void *ctx, ips_delivery *d, const run *r)
{
    ips_fwd *f = ((tun_sink_ctx *)ctx)->f;
    ips_fwd_counters *c = ((tun_sink_ctx *)ctx)->c;
    ips_delivery *a = &d[r->idx[0]];
    if (r->count == 1) {
        write_one(f, c, a);
        return;
    }
    const tcp_seg *h = &r->first;
    uint8_t *p = a->pkt;
    run_headers(d, r);
    size_t vl = (size_t)f->vnet_len;
    ips_vnet v = {
        .flags = VIRTIO_NET_HDR_F_NEEDS_CSUM,
        .gso_type = h->l3 == 20 ? VIRTIO_NET_HDR_GSO_TCPV4 : VIRTIO_NET_HDR_GSO_TCPV6,
        .hdr_len = h->hdrs,
        .gso_size = r->gso,
        .csum_start = h->l3,
        .csum_offset = 16,
    };
    ips_vnet_write(p - vl, vl, &v);
    struct iovec iov[IPS_COAL_MAX];
    iov[0].iov_base = p - vl;
    iov[0].iov_len = vl + a->len;
    for (uint32_t i = 1; i < r->count; i++) {
        const ips_delivery *s = &d[r->idx[i]];
        iov[i].iov_base = s->pkt + h->hdrs;
        iov[i].iov_len = s->len - h->hdrs;
    }
    ssize_t w;
    do
        w = writev(f->tun_fd, iov, (int)r->count);
    while (w < 0 && errno == EINTR);
    c->syscalls++;
    if (w < 0) {
        c->tx_errors[K_TUN] += r->count;
        return;
    }
    c->packets[IPS_IN] += r->count;
    c->bytes[IPS_IN] += r->count * (uint64_t)h->hdrs + r->bytes;
    c->coal_writes++;
    c->coal_segments += r->count;
}

/* Packet i as a run of one (only count and idx[0] are read): an ordinary packet for the sink. */
static void single(const planner *pl, ips_delivery *d, uint32_t i)
{
    run one;
    one.count = 1;
    one.idx[0] = i;
    pl->sink(pl->ctx, d, &one);
}

static void plan(const planner *pl, ips_delivery *d, uint32_t n)
{
    run open[IPS_COAL_OPEN];
    uint32_t nopen = 0;
    for (uint32_t i = 0; i < n; i++) {
        tcp_seg t;
        if (!tcp_of(&d[i], &t)) {
            single(pl, d, i);
            continue;
        }
        uint32_t k = 0;
        while (k < nopen && (open[k].first.l3 != t.l3 || !same_flow(&d[open[k].idx[0]], &d[i], t.l3)))
            k++;
        if (k < nopen) {
            run *r = &open[k];
            if (joins(pl, r, &d[r->idx[0]], &d[i], &t)) {
                r->idx[r->count++] = i;
                r->bytes += t.payload;
                r->next_seq = t.seq + t.payload;
                r->closed = t.payload < r->gso || (t.flags & 0x08);
                continue;
            }
            pl->sink(pl->ctx, d, r); /* this flow's older run goes first */
            open[k] = open[--nopen];
        }
        if (t.payload == 0 || (t.flags & ~0x08) != 0x10) { /* pure ACKs, SYN, FIN, RST, URG, ECE/CWR */
            single(pl, d, i);
            continue;
        }
        if (nopen == IPS_COAL_OPEN) {
            pl->sink(pl->ctx, d, &open[0]);
            open[0] = open[--nopen];
        }
        run *r = &open[nopen++];
        r->idx[0] = i;
        r->count = 1;
        r->gso = t.payload;
        r->bytes = t.payload;
        r->next_seq = t.seq + t.payload;
        r->first = t;
        r->closed = (t.flags & 0x08) != 0;
    }
    for (uint32_t k = 0; k < nopen; k++)
        pl->sink(pl->ctx, d, &open[k]);
}

void ips_deliver(ips_fwd *f, ips_fwd_counters *c, ips_delivery *d, uint32_t n, int coalesce)
{
    if (!coalesce || !f->tso) {
        for (uint32_t i = 0; i < n; i++)
            write_one(f, c, &d[i]);
        return;
    }
    tun_sink_ctx ctx = {f, c};
    planner pl = {.max_count = IPS_COAL_MAX, .max_bytes = 65535 - 60, .sink = tun_sink, .ctx = &ctx};
    plan(&pl, d, n);
}

/* ---- merging in place (the NFQUEUE in queue) -------------------------------------------------- */

typedef struct {
    uint8_t *absorbed;
    ips_fwd_counters *c;
} merge_ctx;

static void merge_sink(void *ctx, ips_delivery *d, const run *r)
{
    merge_ctx *m = ctx;
    if (r->count == 1)
        return;
    const tcp_seg *h = &r->first;
    ips_delivery *a = &d[r->idx[0]];
    uint8_t *p = a->pkt;
    size_t at = a->len;
    for (uint32_t i = 1; i < r->count; i++) {
        const ips_delivery *s = &d[r->idx[i]];
        memmove(p + at, s->pkt + h->hdrs, s->len - h->hdrs);
        at += s->len - h->hdrs;
        m->absorbed[r->idx[i]] = 1;
    }
    size_t total = run_headers(d, r);
    ips_csum_complete(p, total, h->l3, 16); /* the kernel checks the whole packet's TCP checksum */
    a->len = (uint32_t)total;
    m->c->coal_writes++;
    m->c->coal_segments += r->count;
}

void ips_merge(ips_fwd_counters *c, ips_delivery *d, uint32_t n, uint8_t *absorbed, uint32_t max_count,
               uint32_t max_bytes)
{
    memset(absorbed, 0, n);
    merge_ctx ctx = {absorbed, c};
    if (max_count > IPS_COAL_MAX)
        max_count = IPS_COAL_MAX;
    if (max_bytes > 65535 - 60)
        max_bytes = 65535 - 60;
    planner pl = {.max_count = max_count, .max_bytes = max_bytes, .sink = merge_sink, .ctx = &ctx};
    plan(&pl, d, n);
}
