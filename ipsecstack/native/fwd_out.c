/*
 * The forwarder's outbound thread (see fwd.h): inner fd -> flow cache -> ESP protect -> sendmmsg.
 *
 * One round: read() up to `batch` packets from the inner fd until EAGAIN; look every packet's flow up
 * in the outbound cache under one lock; protect the cached ones under the table's read lock, holding
 * each SA's mutex over a run of consecutive packets of that SA (RFC 4303 §3.3: sequence numbers are
 * taken in order), with one RAND_bytes draw per round for CBC IVs; queue each protected packet for the
 * socket its SA needs and send each queue with sendmmsg(); punt what had no decision or whose SA is
 * gone. A refused sendmmsg() entry is dropped and counted against its socket (EAGAIN/ENOBUFS drop the
 * rest of that queue: the socket buffer is full); nothing is retried, so a round is bounded.
 *
 * Offloads (fwd_start keywords, fwd.h):
 *   tso  the inner fd is a TUN with IFF_VNET_HDR: every read() starts with a virtio_net_hdr
 *        (fwd_seg.c). NEEDS_CSUM packets get their checksum finished in place; a GSO super-packet is
 *        swapped into the spare buffer `sup` (a pointer swap, no copy) and cut into segments, as many
 *        per round as there are free slots: the rest waits in `sup` for the next round, which runs
 *        at once (the TUN need not be readable again), so a round stays bounded by `batch`.
 *   gso  consecutive packets of a UDP send queue to the same destination with the same TOS, all of
 *        one size but the last (which may be shorter), at most 64 and 65000 bytes, go out as one
 *        message with a UDP_SEGMENT control message (the kernel cuts them; the iovecs point at the
 *        protected packets, nothing is copied). A run the kernel refuses (EINVAL/EMSGSIZE/EIO, e.g.
 *        segments bigger than the route's MTU) is sent again one datagram at a time, once.
 */
#define _GNU_SOURCE 1 /* recvmmsg, sendmmsg, in6_pktinfo */
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "fwd.h"

#include <netinet/udp.h>
#include <linux/virtio_net.h>
#include <sys/uio.h>

#define IN_SIZE IPS_MAX_DATAGRAM
#define IN_STRIDE (IPS_VNET_ROOM + IN_SIZE)
#define OUT_SIZE (IPS_MAX_DATAGRAM + IPS_HEADROOM)
#define CMSG_BYTES (CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(uint16_t)))
#define GSO_MAX_SEGS 64
#define GSO_MAX_BYTES 65000
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

enum { ST_MISS = 0, ST_SPI, ST_DISCARD };
enum { TXQ_UDP4 = 0, TXQ_UDP6, TXQ_RAW4, TXQ_RAW6 };
static const int txq_kind[4] = {K_UDP4, K_UDP6, K_RAW4, K_RAW6}; /* each queue's socket */

typedef struct {
    struct sockaddr_in6 name; /* big enough for sockaddr_in */
    socklen_t namelen;
    unsigned tos;
    union {
        struct cmsghdr align;
        uint8_t buf[CMSG_BYTES];
    } ctl;
} tx_meta;

typedef struct ips_fwd_out_ctx {
    ips_fwd *f;
    uint32_t batch;
    int ep;
    uint8_t *inmem, *out, *rand;
    uint8_t **in; /* each slot's packet (IPS_VNET_ROOM bytes of room before it) */
    uint8_t *sup; /* the spare buffer: a super-packet being segmented */
    ips_seg seg;
    uint32_t seg_next; /* segments of `sup` already taken; pending while < seg.count */
    size_t *len;
    uint32_t *spi;
    uint8_t *state;
    tx_meta *meta[4]; /* by send queue: TXQ_UDP4 .. TXQ_RAW6 */
    struct iovec *iov[4];
    struct mmsghdr *mm[4];
    uint32_t *segs[4]; /* datagrams in each message of mm */
    uint32_t ntx[4];
    ips_fwd_counters c;
    ips_punt_list punts;
} out_ctx;

static unsigned be16(const uint8_t *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

void ips_fwd_out_free(out_ctx *x)
{
    if (x == NULL)
        return;
    if (x->ep >= 0)
        close(x->ep);
    free(x->inmem);
    free(x->in);
    free(x->out);
    free(x->rand);
    free(x->len);
    free(x->spi);
    free(x->state);
    for (int k = 0; k < 4; k++) {
        free(x->meta[k]);
        free(x->iov[k]);
        free(x->mm[k]);
        free(x->segs[k]);
    }
    free(x);
}

out_ctx *ips_fwd_out_new(ips_fwd *f)
{
    out_ctx *x = calloc(1, sizeof(*x));
    if (x == NULL)
        return NULL;
    x->f = f;
    x->batch = f->batch;
    size_t b = f->batch;
    x->inmem = malloc((b + 1) * IN_STRIDE); /* one more: the spare buffer */
    x->in = calloc(b, sizeof(uint8_t *));
    x->out = malloc(b * OUT_SIZE);
    x->rand = malloc(16 * b);
    x->len = calloc(b, sizeof(size_t));
    x->spi = calloc(b, sizeof(uint32_t));
    x->state = calloc(b, 1);
    x->ep = epoll_create1(EPOLL_CLOEXEC);
    int ok = x->inmem && x->in && x->out && x->rand && x->len && x->spi && x->state && x->ep >= 0;
    for (int k = 0; k < 4; k++) {
        x->meta[k] = calloc(b, sizeof(tx_meta));
        x->iov[k] = calloc(b, sizeof(struct iovec));
        x->mm[k] = calloc(b, sizeof(struct mmsghdr));
        x->segs[k] = calloc(b, sizeof(uint32_t));
        ok = ok && x->meta[k] && x->iov[k] && x->mm[k] && x->segs[k];
    }
    if (ok) {
        for (size_t i = 0; i < b; i++)
            x->in[i] = x->inmem + i * IN_STRIDE + IPS_VNET_ROOM;
        x->sup = x->inmem + b * IN_STRIDE + IPS_VNET_ROOM;
        struct epoll_event ev = {.events = EPOLLIN};
        ev.data.u32 = 0;
        ok = epoll_ctl(x->ep, EPOLL_CTL_ADD, f->stop_fd, &ev) == 0;
        ev.data.u32 = 1;
        ok = ok && epoll_ctl(x->ep, EPOLL_CTL_ADD, f->tun_fd, &ev) == 0;
    }
    if (!ok) {
        ips_fwd_out_free(x);
        return NULL;
    }
    return x;
}

/* The UDP header of a packet ips_protect built: its offset, or 0 when there is none. */
static size_t udp_offset(const uint8_t *p, size_t n)
{
    if (p[0] >> 4 == 4) {
        size_t ihl = (size_t)(p[0] & 0x0F) * 4;
        return p[9] == 17 && ihl >= 20 && ihl + 8 <= n ? ihl : 0;
    }
    size_t off = 40;
    unsigned nh = p[6];
    for (int hops = 0; nh != 17 && hops < 8; hops++) { /* transport mode keeps extension headers */
        if ((nh != 0 && nh != 43 && nh != 60) || off + 8 > n)
            return 0;
        nh = p[off];
        off += ((size_t)p[off + 1] + 1) * 8;
    }
    return nh == 17 && off + 8 <= n ? off : 0;
}

/* Queue a protected packet for its socket; counted as a tx error of that kind when it cannot go. */
static void queue_tx(out_ctx *x, uint8_t *p, size_t n, int udp)
{
    int v4 = p[0] >> 4 == 4;
    int q = udp ? (v4 ? TXQ_UDP4 : TXQ_UDP6) : (v4 ? TXQ_RAW4 : TXQ_RAW6);
    int kind = txq_kind[q];
    size_t off = udp ? udp_offset(p, n) : 0;
    if (x->f->port[kind].fd < 0 || (udp && off == 0)) {
        x->c.tx_errors[kind]++;
        return;
    }
    uint32_t i = x->ntx[q];
    tx_meta *t = &x->meta[q][i];
    struct iovec *iov = &x->iov[q][i];
    memset(&t->name, 0, sizeof(t->name));
    unsigned port = 0;
    t->tos = 0;
    if (udp) {
        size_t ulen = be16(p + off + 4);
        if (ulen < 8 || off + ulen > n) {
            x->c.tx_errors[kind]++;
            return;
        }
        port = be16(p + off + 2);
        iov->iov_base = p + off + 8;
        iov->iov_len = ulen - 8;
        /* DSCP and ECN survive encapsulation (backends/udp.py write_batch) */
        t->tos = v4 ? p[1] : (((p[0] & 0x0Fu) << 4) | (p[1] >> 4));
    } else {
        iov->iov_base = p;
        iov->iov_len = n;
    }
    if (v4) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&t->name;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        memcpy(&sin->sin_addr, p + 16, 4);
        t->namelen = sizeof(*sin);
    } else {
        t->name.sin6_family = AF_INET6;
        t->name.sin6_port = htons((uint16_t)port);
        memcpy(&t->name.sin6_addr, p + 24, 16);
        t->namelen = sizeof(t->name);
    }
    x->ntx[q]++;
}

/* Message k of queue q: queue entries [i, i + count), one datagram each or (gso) UDP_SEGMENT. */
static void build_msg(out_ctx *x, int q, uint32_t k, uint32_t i, uint32_t count, int v4)
{
    tx_meta *t = &x->meta[q][i];
    struct msghdr *m = &x->mm[q][k].msg_hdr;
    memset(m, 0, sizeof(*m));
    m->msg_name = &t->name;
    m->msg_namelen = t->namelen;
    m->msg_iov = &x->iov[q][i];
    m->msg_iovlen = count;
    x->segs[q][k] = count;
    size_t ctl = 0;
    if (t->tos) {
        m->msg_control = t->ctl.buf;
        m->msg_controllen = CMSG_BYTES;
        struct cmsghdr *cm = CMSG_FIRSTHDR(m);
        cm->cmsg_level = v4 ? IPPROTO_IP : IPPROTO_IPV6;
        cm->cmsg_type = v4 ? IP_TOS : IPV6_TCLASS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        int v = (int)t->tos;
        memcpy(CMSG_DATA(cm), &v, sizeof(v));
        ctl += CMSG_SPACE(sizeof(int));
    }
    if (count > 1) {
        m->msg_control = t->ctl.buf;
        m->msg_controllen = CMSG_BYTES;
        struct cmsghdr *cm = (struct cmsghdr *)(t->ctl.buf + ctl);
        cm->cmsg_level = SOL_UDP;
        cm->cmsg_type = UDP_SEGMENT;
        cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t g = (uint16_t)x->iov[q][i].iov_len;
        memcpy(CMSG_DATA(cm), &g, sizeof(g));
        ctl += CMSG_SPACE(sizeof(uint16_t));
    }
    m->msg_controllen = ctl;
    if (ctl == 0)
        m->msg_control = NULL;
}

/* Can queue entry j join the UDP_SEGMENT run that starts at i (total bytes so far)? */
static int joins(const out_ctx *x, int q, uint32_t i, uint32_t j, size_t total)
{
    const tx_meta *a = &x->meta[q][i], *b = &x->meta[q][j];
    size_t size = x->iov[q][i].iov_len, n = x->iov[q][j].iov_len;
    return j - i < GSO_MAX_SEGS && n <= size && n > 0 && total + n <= GSO_MAX_BYTES &&
           x->iov[q][j - 1].iov_len == size && a->tos == b->tos && a->namelen == b->namelen &&
           memcmp(&a->name, &b->name, a->namelen) == 0;
}

/* A UDP_SEGMENT message the kernel refused: its datagrams one by one (bounded: at most 64). */
static void send_singly(out_ctx *x, int q, struct msghdr *m)
{
    int k = txq_kind[q];
    int fd = x->f->port[k].fd;
    uint32_t first = (uint32_t)(m->msg_iov - x->iov[q]);
    for (size_t j = 0; j < m->msg_iovlen; j++) {
        struct msghdr one = *m;
        one.msg_iov = m->msg_iov + j;
        one.msg_iovlen = 1;
        one.msg_control = NULL;
        one.msg_controllen = 0;
        if (x->meta[q][first].tos) { /* the first control message is the TOS */
            one.msg_control = m->msg_control;
            one.msg_controllen = CMSG_SPACE(sizeof(int));
        }
        ssize_t r = sendmsg(fd, &one, MSG_DONTWAIT);
        x->c.syscalls++;
        if (r < 0) {
            x->c.tx_errors[k]++;
        } else {
            x->c.packets[IPS_OUT]++;
            x->c.bytes[IPS_OUT] += (uint64_t)r;
        }
    }
}

static void flush_tx(out_ctx *x)
{
    for (int q = 0; q < 4; q++) {
        uint32_t cnt = x->ntx[q], nmsg = 0, done = 0;
        if (cnt == 0)
            continue;
        int k = txq_kind[q];
        int fd = x->f->port[k].fd;
        int v4 = q == TXQ_UDP4 || q == TXQ_RAW4;
        int gso = x->f->gso && q <= TXQ_UDP6;
        for (uint32_t i = 0; i < cnt;) {
            uint32_t j = i + 1;
            size_t total = x->iov[q][i].iov_len;
            while (gso && j < cnt && joins(x, q, i, j, total))
                total += x->iov[q][j++].iov_len;
            build_msg(x, q, nmsg++, i, j - i, v4);
            i = j;
        }
        struct mmsghdr *mm = x->mm[q];
        while (done < nmsg) {
            int r = sendmmsg(fd, mm + done, nmsg - done, MSG_DONTWAIT);
            x->c.syscalls++;
            if (r > 0) {
                for (int j = 0; j < r; j++) {
                    uint32_t segs = x->segs[q][done + (uint32_t)j];
                    x->c.packets[IPS_OUT] += segs;
                    x->c.bytes[IPS_OUT] += mm[done + (uint32_t)j].msg_len;
                    if (segs > 1) {
                        x->c.gso_sends++;
                        x->c.gso_segments += segs;
                    }
                }
                done += (uint32_t)r;
            } else if (r < 0 && (errno == EAGAIN || errno == ENOBUFS)) {
                for (uint32_t j = done; j < nmsg; j++) /* the socket buffer is full: the rest is dropped */
                    x->c.tx_errors[k] += x->segs[q][j];
                done = nmsg;
            } else if (x->segs[q][done] > 1 && (errno == EINVAL || errno == EMSGSIZE || errno == EIO)) {
                send_singly(x, q, &mm[done].msg_hdr); /* e.g. segments above the route's MTU */
                done++;
            } else {
                x->c.tx_errors[k] += x->segs[q][done]; /* this one (EMSGSIZE, no route, ...): the rest goes on */
                done++;
            }
        }
        x->ntx[q] = 0;
    }
}

static void drop(out_ctx *x, ips_reason r)
{
    x->c.drops[r]++;
    x->c.engine_drops[r]++;
}

/* Protect the packets with a cached SPI; punt those whose SA has left the table. */
static void protect_all(out_ctx *x, uint32_t n)
{
    EngineObject *e = x->f->engine;
    ips_sa *sa = NULL;
    uint32_t cur = 0, used = 0;
    int have_rand = 0;
    pthread_rwlock_rdlock(&e->table_lock);
    for (uint32_t i = 0; i < n; i++) {
        if (x->state[i] != ST_SPI)
            continue;
        if (sa == NULL || cur != x->spi[i]) {
            if (sa != NULL)
                pthread_mutex_unlock(&sa->lock);
            cur = x->spi[i];
            sa = ips_table_find(e, IPS_OUT, cur);
            if (sa == NULL) {
                x->state[i] = ST_MISS;
                continue;
            }
            pthread_mutex_lock(&sa->lock);
        }
        const uint8_t *r16 = NULL;
        if (sa->cipher.suite->kind == IPS_CBC) {
            if (!have_rand) /* one draw per round, as run_protect draws one per batch */
                have_rand = RAND_bytes(x->rand, 16 * (int)x->batch) == 1 ? 1 : -1;
            r16 = have_rand > 0 ? x->rand + 16 * used : NULL;
        }
        uint8_t *out = x->out + (size_t)i * OUT_SIZE;
        size_t out_len = 0;
        ips_reason r = ips_protect(sa, x->in[i], x->len[i], x->len[i], out, OUT_SIZE, &out_len, r16);
        x->c.engine_packets++;
        if (r == IPS_OK || r == IPS_R_CRYPTO_ERROR)
            used++;
        if (r != IPS_OK) {
            sa->drops[r]++;
            drop(x, r);
            continue;
        }
        queue_tx(x, out, out_len, sa->udp);
    }
    if (sa != NULL)
        pthread_mutex_unlock(&sa->lock);
    pthread_rwlock_unlock(&e->table_lock);
}

/* One packet read from a vnet_hdr TUN into slot n (header at in[n] - vnet_len): 1 when the slot holds
 * a packet now, 0 when it was dropped or became the pending super-packet. */
static int take_vnet(out_ctx *x, uint32_t n, size_t r)
{
    size_t vl = (size_t)x->f->vnet_len;
    if (r < vl) {
        drop(x, IPS_R_TRUNCATED);
        return 0;
    }
    ips_vnet v;
    ips_vnet_read(x->in[n] - vl, &v);
    size_t len = r - vl;
    if ((v.gso_type & ~VIRTIO_NET_HDR_GSO_ECN) != VIRTIO_NET_HDR_GSO_NONE) {
        ips_reason why = ips_seg_plan(x->in[n], len, &v, &x->seg);
        if (why != IPS_OK) {
            drop(x, why);
            return 0;
        }
        uint8_t *t = x->sup; /* the super-packet becomes the spare; the spare takes its slot */
        x->sup = x->in[n];
        x->in[n] = t;
        x->seg_next = 0;
        x->c.tso_super++;
        return 0;
    }
    if (v.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        ips_reason why = ips_csum_complete(x->in[n], len, v.csum_start, v.csum_offset);
        if (why != IPS_OK) {
            drop(x, why);
            return 0;
        }
        x->c.csum_completed++;
    }
    x->len[n] = len;
    return 1;
}

static uint32_t read_inner(out_ctx *x)
{
    uint32_t n = 0;
    size_t vl = x->f->tso ? (size_t)x->f->vnet_len : 0;
    for (uint32_t reads = 0; n < x->batch && reads < 2 * x->batch; reads++) {
        while (x->seg_next < x->seg.count && n < x->batch) { /* the pending super-packet first */
            x->len[n] = ips_seg_write(x->sup, &x->seg, x->seg_next++, x->in[n]);
            x->c.tso_segments++;
            n++;
        }
        if (n == x->batch)
            break;
        ssize_t r = read(x->f->tun_fd, x->in[n] - vl, IN_SIZE + vl);
        x->c.syscalls++;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                x->c.rx_errors[K_TUN]++;
            break;
        }
        if (r == 0) {
            drop(x, IPS_R_TRUNCATED); /* an empty datagram (a socketpair allows them) */
            continue;
        }
        if (vl) {
            n += (uint32_t)take_vnet(x, n, (size_t)r);
        } else {
            x->len[n++] = (size_t)r;
        }
    }
    return n;
}

static void round_out(out_ctx *x)
{
    uint32_t n = read_inner(x);
    if (n == 0) { /* only drops (bad headers, empty reads) or a read error: still counted now */
        ips_fwd_account(x->f, &x->c, 1);
        return;
    }
    x->c.batches[IPS_OUT]++;
    ips_flowcache *c = &x->f->cache[IPS_OUT];
    ips_flow k;
    pthread_mutex_lock(&c->lock);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t v;
        x->state[i] = ST_MISS;
        if (ips_flow_of(x->in[i], x->len[i], 0, &k) == 0 && ips_fc_lookup(c, &k, &v)) {
            x->state[i] = v ? ST_SPI : ST_DISCARD;
            x->spi[i] = v;
        }
    }
    pthread_mutex_unlock(&c->lock);
    protect_all(x, n);
    for (uint32_t i = 0; i < n; i++) {
        if (x->state[i] == ST_DISCARD)
            drop(x, IPS_R_POLICY_DISCARD);
        else if (x->state[i] == ST_MISS)
            ips_pl_add(&x->punts, IPS_PUNT_OUT, 0, x->in[i], x->len[i]);
    }
    flush_tx(x);
    ips_pq_push(&x->f->punts, &x->punts, 0);
    ips_fwd_account(x->f, &x->c, 1);
    ips_fwd_wake_for_events(x->f);
}

void *ips_fwd_out_main(void *arg)
{
    out_ctx *x = arg;
    ips_fwd *f = x->f;
    struct epoll_event got[2];
    for (;;) {
        int r = ips_fwd_wait(f, x->ep, got, 2);
        if (r < 0)
            break;
        for (int i = 0; i < r; i++)
            if (got[i].data.u32 == 1)
                round_out(x);
        /* what is left of a super-packet: at most 65535 / batch rounds, each bounded */
        while (x->seg_next < x->seg.count && !__atomic_load_n(&f->stop, __ATOMIC_ACQUIRE))
            round_out(x);
    }
    ips_fwd_account(f, &x->c, 1);
    return NULL;
}
