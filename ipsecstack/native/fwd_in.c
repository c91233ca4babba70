/*
 * The forwarder's inbound thread (see fwd.h): recvmmsg -> rebuilt outer header -> ESP unprotect ->
 * inbound flow cache -> write() to the inner fd.
 *
 * Each receive buffer has HEAD bytes of headroom before the payload, so the header the kernel took
 * away is rebuilt in front of it without a copy, byte for byte as the Python ports rebuild it:
 *   udp4/udp6 (backends/udp.py read_batch): IPv4 header (TOS from IP_TOS, TTL from IP_TTL, ID 0, no
 *             DF, checksum) or IPv6 header (traffic class, hop limit; flow label 0), source from the
 *             sender, destination from IP_PKTINFO / IPV6_PKTINFO (else the bound address); then a UDP
 *             header with the sender's port, the bound port, the length and a zero checksum;
 *   esp4      (rawsock.py _drain4): the packet as the raw socket gives it (with its IPv4 header);
 *   esp6      (rawsock.py _drain6): a 40-byte IPv6 header from the cmsgs, next header 50.
 * Then: a NAT keepalive (one 0xFF byte, RFC 3948 §2.3) is counted; IKE (non-ESP marker, §2.2) and ESP
 * for an SPI the table does not hold are punted whole ("outer"); other ESP is located and unprotected
 * (esp.c checks every length, the encapsulation and the replay window) under the table's read lock
 * and the SA's mutex; the inner packet goes to the inner fd when its (SPI, flow) is in the inbound
 * cache, else it is punted ("in"). Receive errors and truncated datagrams are counted per socket.
 *
 * Locks per round, not per packet: the table's read lock is held over the whole round and an SA's
 * mutex over a run of consecutive packets of that SA. Decrypted packets for the inner fd are kept in
 * an arena (with IPS_VNET_ROOM bytes of room before each for a virtio_net_hdr) and written at the
 * end of the round, or earlier when the arena is full (fwd_coal.c: one write each, or coalesced TCP
 * on a vnet_hdr TUN).
 *
 * gro: with UDP_GRO on the udp4/udp6 socket a receive may return several datagrams of one flow glued
 * together, with a UDP_GRO control message giving their size (all but the last are that size). They
 * are cut apart here and handled one by one, in order; the header of piece i is rebuilt in the last
 * bytes of piece i - 1, which has been handled (decrypted to the arena or punted as a copy) by then.
 */
#define _GNU_SOURCE 1 /* recvmmsg, sendmmsg, in6_pktinfo */
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <netinet/udp.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fwd.h"

#define HEAD 64
#define GRO_MAX 64 /* datagrams in one UDP_GRO receive (the kernel's UDP_MAX_SEGMENTS) */
#define BUF_SIZE (HEAD + 65536)
#define CTL_SIZE 256

typedef struct ips_fwd_in_ctx {
    ips_fwd *f;
    uint32_t batch;
    int ep;
    uint8_t *bufs, *ctl;
    uint8_t *arena; /* decrypted packets waiting for the inner fd */
    size_t arena_size, arena_used;
    ips_delivery *dl;
    uint32_t ndl, dl_cap;
    ips_sa *sa; /* the SA whose mutex is held, under the table's read lock */
    struct mmsghdr *mm;
    struct iovec *iov;
    struct sockaddr_in6 *names;
    ips_fwd_counters c;
    ips_punt_list punts;
    ips_codel codel[K_KINDS]; /* per receive socket (codel.c) */
    int shed;                 /* CoDel dropped the datagram being handled: its first ESP piece goes */
} in_ctx;

static void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static unsigned be16(const uint8_t *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

void ips_fwd_in_free(in_ctx *x)
{
    if (x == NULL)
        return;
    if (x->ep >= 0)
        close(x->ep);
    free(x->bufs);
    free(x->ctl);
    free(x->arena);
    free(x->dl);
    free(x->mm);
    free(x->iov);
    free(x->names);
    free(x);
}

in_ctx *ips_fwd_in_new(ips_fwd *f)
{
    in_ctx *x = calloc(1, sizeof(*x));
    if (x == NULL)
        return NULL;
    x->f = f;
    x->batch = f->batch;
    size_t b = f->batch;
    x->bufs = malloc(b * BUF_SIZE);
    x->ctl = malloc(b * CTL_SIZE);
    x->arena_size = b * BUF_SIZE;
    x->arena = malloc(x->arena_size);
    x->dl_cap = (uint32_t)(b * (f->gro ? GRO_MAX : 1));
    x->dl = calloc(x->dl_cap, sizeof(*x->dl));
    x->mm = calloc(b, sizeof(*x->mm));
    x->iov = calloc(b, sizeof(*x->iov));
    x->names = calloc(b, sizeof(*x->names));
    for (int k = 0; k < K_KINDS; k++)
        ips_codel_init(&x->codel[k], f->codel_target, f->codel_interval);
    x->ep = epoll_create1(EPOLL_CLOEXEC);
    int ok = x->bufs && x->ctl && x->arena && x->dl && x->mm && x->iov && x->names && x->ep >= 0;
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u32 = K_KINDS;
    ok = ok && epoll_ctl(x->ep, EPOLL_CTL_ADD, f->stop_fd, &ev) == 0;
    for (int k = K_UDP4; ok && k <= K_RX_LAST; k++) {
        if (f->port[k].fd < 0)
            continue;
        ev.data.u32 = (uint32_t)k;
        ok = epoll_ctl(x->ep, EPOLL_CTL_ADD, f->port[k].fd, &ev) == 0;
    }
    if (!ok) {
        ips_fwd_in_free(x);
        return NULL;
    }
    return x;
}

static void drop(in_ctx *x, ips_reason r)
{
    x->c.drops[r]++;
    x->c.engine_drops[r]++;
}

typedef struct {
    uint8_t dst[16];
    int have_dst;
    unsigned tos, ttl;
    unsigned gro; /* UDP_GRO: the size of the glued datagrams, 0 for one */
    uint64_t ts;  /* SO_TIMESTAMPNS: when the kernel queued it (ns, CLOCK_REALTIME), 0 if not given */
} rx_meta;

static void read_cmsgs(struct msghdr *m, int v4, rx_meta *meta)
{
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(m); cm != NULL; cm = CMSG_NXTHDR(m, cm)) {
        const uint8_t *d = CMSG_DATA(cm);
        size_t dlen = cm->cmsg_len - CMSG_LEN(0);
        int iv = 0;
        if (dlen >= sizeof(int))
            memcpy(&iv, d, sizeof(iv));
        if (v4 && cm->cmsg_level == IPPROTO_IP) {
            if (cm->cmsg_type == IP_PKTINFO && dlen >= sizeof(struct in_pktinfo)) {
                struct in_pktinfo pi;
                memcpy(&pi, d, sizeof(pi));
                memcpy(meta->dst, &pi.ipi_addr, 4); /* the header's destination */
                meta->have_dst = 1;
            } else if (cm->cmsg_type == IP_TOS && dlen >= 1) {
                meta->tos = d[0];
            } else if (cm->cmsg_type == IP_TTL && dlen >= sizeof(int)) {
                meta->ttl = (unsigned)iv & 0xFF;
            }
        } else if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_TIMESTAMPNS &&
                   dlen >= sizeof(struct timespec)) {
            struct timespec t;
            memcpy(&t, d, sizeof(t));
            meta->ts = (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
        } else if (cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_GRO && dlen >= sizeof(int)) {
            meta->gro = iv > 0 ? (unsigned)iv : 0;
        } else if (!v4 && cm->cmsg_level == IPPROTO_IPV6) {
            if (cm->cmsg_type == IPV6_PKTINFO && dlen >= sizeof(struct in6_pktinfo)) {
                memcpy(meta->dst, d, 16);
                meta->have_dst = 1;
            } else if (cm->cmsg_type == IPV6_TCLASS && dlen >= sizeof(int)) {
                meta->tos = (unsigned)iv & 0xFF;
            } else if (cm->cmsg_type == IPV6_HOPLIMIT && dlen >= sizeof(int)) {
                meta->ttl = (unsigned)iv & 0xFF;
            }
        }
    }
}

static unsigned ip_checksum(const uint8_t *p, size_t n)
{
    uint32_t s = 0;
    for (size_t i = 0; i + 1 < n; i += 2)
        s += be16(p + i);
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return ~s & 0xFFFF;
}

static uint8_t *build_v4(uint8_t *at, size_t payload, const rx_meta *m, unsigned proto, const uint8_t *src)
{
    uint8_t *h = at - 20;
    h[0] = 0x45;
    h[1] = (uint8_t)m->tos;
    put16(h + 2, (unsigned)(20 + payload));
    memset(h + 4, 0, 4); /* ID 0, no flags */
    h[8] = (uint8_t)m->ttl;
    h[9] = (uint8_t)proto;
    put16(h + 10, 0);
    memcpy(h + 12, src, 4);
    memcpy(h + 16, m->dst, 4);
    put16(h + 10, ip_checksum(h, 20));
    return h;
}

static uint8_t *build_v6(uint8_t *at, size_t payload, const rx_meta *m, unsigned proto, const uint8_t *src)
{
    uint8_t *h = at - 40;
    h[0] = (uint8_t)(0x60 | (m->tos >> 4));
    h[1] = (uint8_t)((m->tos & 0x0F) << 4);
    h[2] = h[3] = 0;
    put16(h + 4, (unsigned)payload);
    h[6] = (uint8_t)proto;
    h[7] = (uint8_t)m->ttl;
    memcpy(h + 8, src, 16);
    memcpy(h + 24, m->dst, 16);
    return h;
}

static void sa_release(in_ctx *x)
{
    if (x->sa != NULL)
        pthread_mutex_unlock(&x->sa->lock);
    x->sa = NULL;
}

/* Write what waits in the arena to the inner fd (the SA mutex is let go first). */
static void deliver(in_ctx *x)
{
    sa_release(x);
    if (x->ndl > 0)
        ips_deliver(x->f, &x->c, x->dl, x->ndl, x->f->coalesce);
    x->ndl = 0;
    x->arena_used = 0;
}

/* Unprotect one ESP packet (pkt, n bytes, whole IP datagram) and queue or punt its inner packet.
 * The caller holds the table's read lock. */
static void esp_in(in_ctx *x, const uint8_t *pkt, size_t n)
{
    EngineObject *e = x->f->engine;
    if (x->shed) { /* before any work: the point of dropping is to catch up */
        x->shed = 0;
        drop(x, IPS_R_QUEUE_DELAY);
        return;
    }
    ips_located loc;
    ips_reason r = ips_locate(pkt, n, n, &loc);
    if (r != IPS_OK) {
        drop(x, r);
        return;
    }
    if (x->ndl == x->dl_cap || x->arena_size - x->arena_used < IPS_VNET_ROOM + n + 16)
        deliver(x);
    if (x->sa == NULL || x->sa->spi != loc.spi) {
        sa_release(x);
        ips_sa *sa = ips_table_find(e, IPS_IN, loc.spi);
        if (sa == NULL) {
            ips_pl_add(&x->punts, IPS_PUNT_OUTER, 0, pkt, n); /* Python's SA, or an unknown SPI it counts */
            return;
        }
        pthread_mutex_lock(&sa->lock);
        x->sa = sa;
    }
    uint8_t *out = x->arena + x->arena_used + IPS_VNET_ROOM;
    size_t out_len = 0;
    r = ips_unprotect(x->sa, pkt, &loc, out, x->arena_size - x->arena_used - IPS_VNET_ROOM, &out_len);
    if (r != IPS_OK)
        x->sa->drops[r]++;
    x->c.engine_packets++;
    if (r != IPS_OK) {
        drop(x, r);
        return;
    }
    if (x->f->nnfq > 0) /* transport mode over NFQUEUE: a SYN's MSS bounds the TCP queue's segments */
        ips_mss_learn(&x->f->mss, out, out_len);
    ips_flow k;
    uint32_t v;
    int known = 0;
    ips_flowcache *c = &x->f->cache[IPS_IN];
    if (ips_flow_of(out, out_len, loc.spi, &k) == 0) {
        pthread_mutex_lock(&c->lock);
        known = ips_fc_lookup(c, &k, &v);
        pthread_mutex_unlock(&c->lock);
    }
    if (!known) {
        ips_pl_add(&x->punts, IPS_PUNT_IN, loc.spi, out, out_len);
        return;
    }
    x->dl[x->ndl].pkt = out;
    x->dl[x->ndl].len = (uint32_t)out_len;
    x->ndl++;
    x->arena_used += IPS_VNET_ROOM + ((out_len + 15) & ~(size_t)15);
}

/* One received datagram of socket kind `kind`: rebuild, sort, hand on. */
static void datagram(in_ctx *x, int kind, uint8_t *payload, size_t n, struct msghdr *m, const rx_meta *rm)
{
    const ips_fwd_port *port = &x->f->port[kind];
    int v4 = kind == K_UDP4 || kind == K_ESP4;
    if (kind == K_ESP4) {
        if (n < 20) {
            drop(x, IPS_R_TRUNCATED);
            return;
        }
        if (port->bound && memcmp(payload + 16, port->local, 4) != 0)
            return; /* not for this address (rawsock.py skips these too) */
        esp_in(x, payload, n);
        return;
    }
    if (kind == K_ESP6 && (m->msg_flags & MSG_CTRUNC)) {
        x->c.rx_errors[kind]++;
        return;
    }
    rx_meta meta = *rm;
    const struct sockaddr_in6 *from6 = m->msg_name;
    const struct sockaddr_in *from4 = m->msg_name;
    if (m->msg_namelen < (v4 ? sizeof(*from4) : sizeof(*from6))) {
        x->c.rx_errors[kind]++;
        return;
    }
    const uint8_t *src = v4 ? (const uint8_t *)&from4->sin_addr : (const uint8_t *)&from6->sin6_addr;
    if (kind == K_ESP6) {
        if (!meta.have_dst || (port->bound && memcmp(meta.dst, port->local, 16) != 0))
            return;
        if (n > 0xFFFF) {
            x->c.rx_errors[kind]++;
            return;
        }
        esp_in(x, build_v6(payload, n, &meta, 50, src), 40 + n);
        return;
    }
    /* ESP-in-UDP (RFC 3948): the UDP header, then the IP header, in the headroom */
    if (n > 0xFFFF - 48) {
        x->c.rx_errors[kind]++;
        return;
    }
    uint8_t *udp = payload - 8;
    put16(udp, ntohs(v4 ? from4->sin_port : from6->sin6_port));
    put16(udp + 2, port->port);
    put16(udp + 4, (unsigned)(8 + n));
    put16(udp + 6, 0);
    uint8_t *pkt = v4 ? build_v4(udp, 8 + n, &meta, 17, src) : build_v6(udp, 8 + n, &meta, 17, src);
    size_t len = (size_t)(payload - pkt) + n;
    if (n == 1 && payload[0] == 0xFF) {
        drop(x, IPS_R_NAT_KEEPALIVE);
    } else if (n >= 4 && payload[0] == 0 && payload[1] == 0 && payload[2] == 0 && payload[3] == 0) {
        ips_pl_add(&x->punts, IPS_PUNT_OUTER, 0, pkt, len); /* IKE, after the non-ESP marker */
    } else if (n < 8) {
        drop(x, IPS_R_TRUNCATED);
    } else {
        esp_in(x, pkt, len);
    }
}

static void round_in(in_ctx *x, int kind)
{
    int fd = x->f->port[kind].fd;
    for (uint32_t i = 0; i < x->batch; i++) {
        struct msghdr *m = &x->mm[i].msg_hdr;
        x->iov[i].iov_base = x->bufs + (size_t)i * BUF_SIZE + HEAD;
        x->iov[i].iov_len = BUF_SIZE - HEAD;
        m->msg_name = &x->names[i];
        m->msg_namelen = sizeof(x->names[i]);
        m->msg_iov = &x->iov[i];
        m->msg_iovlen = 1;
        m->msg_control = x->ctl + (size_t)i * CTL_SIZE;
        m->msg_controllen = CTL_SIZE;
        m->msg_flags = 0;
        x->mm[i].msg_len = 0;
    }
    int r = recvmmsg(fd, x->mm, x->batch, MSG_DONTWAIT, NULL);
    x->c.syscalls++;
    if (r < 0) {
        if (errno != EAGAIN && errno != EINTR)
            x->c.rx_errors[kind]++; /* e.g. ECONNREFUSED from an earlier ICMP error */
        return;
    }
    x->c.batches[IPS_IN]++;
    uint64_t now = 0;
    if (x->f->codel_target > 0) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t); /* the clock of SO_TIMESTAMPNS */
        now = (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
    }
    pthread_rwlock_rdlock(&x->f->engine->table_lock);
    int v4 = kind == K_UDP4 || kind == K_ESP4;
    for (int i = 0; i < r; i++) {
        struct msghdr *m = &x->mm[i].msg_hdr;
        if (m->msg_flags & MSG_TRUNC) {
            x->c.rx_errors[kind]++;
            continue;
        }
        rx_meta meta = {.tos = 0, .ttl = 64, .have_dst = 0, .gro = 0, .ts = 0};
        memcpy(meta.dst, x->f->port[kind].local, 16);
        read_cmsgs(m, v4, &meta); /* esp4: only the timestamp (the header is in the packet) */
        if (now > 0) /* RFC 8289: the sojourn time in the socket's queue; none, or a clock step back: 0 */
            x->shed = ips_codel_drop(&x->codel[kind], now, meta.ts > 0 && meta.ts < now ? now - meta.ts : 0);
        uint8_t *p = x->iov[i].iov_base;
        size_t n = x->mm[i].msg_len;
        if (meta.gro == 0 || meta.gro >= n) {
            datagram(x, kind, p, n, m, &meta);
            continue;
        }
        x->c.gro_super++;
        for (size_t off = 0, pieces = 0; off < n && pieces < GRO_MAX + 1; off += meta.gro, pieces++) {
            size_t len = n - off < meta.gro ? n - off : meta.gro;
            x->c.gro_segments++;
            datagram(x, kind, p + off, len, m, &meta);
        }
        if ((size_t)meta.gro * (GRO_MAX + 1) < n)
            drop(x, IPS_R_MALFORMED); /* more pieces than the kernel ever glues */
    }
    x->shed = 0; /* a shed datagram that was not ESP (IKE, say) keeps nothing for the next round */
    sa_release(x);
    pthread_rwlock_unlock(&x->f->engine->table_lock);
    deliver(x);
    ips_pq_push(&x->f->punts, &x->punts, 0);
    ips_fwd_account(x->f, &x->c, 0);
    ips_fwd_wake_for_events(x->f);
}

void *ips_fwd_in_main(void *arg)
{
    in_ctx *x = arg;
    struct epoll_event got[K_KINDS + 1];
    for (;;) {
        int r = ips_fwd_wait(x->f, x->ep, got, K_KINDS + 1);
        if (r < 0)
            break;
        for (int i = 0; i < r; i++)
            if (got[i].data.u32 < K_KINDS)
                round_in(x, (int)got[i].data.u32);
    }
    ips_fwd_account(x->f, &x->c, 0);
    return NULL;
}
