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
 */
#define _GNU_SOURCE 1 /* recvmmsg, sendmmsg, in6_pktinfo */
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "fwd.h"

#define IN_SIZE IPS_MAX_DATAGRAM
#define OUT_SIZE (IPS_MAX_DATAGRAM + IPS_HEADROOM)
#define CMSG_BYTES CMSG_SPACE(sizeof(int))

enum { ST_MISS = 0, ST_SPI, ST_DISCARD };
enum { TXQ_UDP4 = 0, TXQ_UDP6, TXQ_RAW4, TXQ_RAW6 };
static const int txq_kind[4] = {K_UDP4, K_UDP6, K_RAW4, K_RAW6}; /* each queue's socket */

typedef struct {
    struct mmsghdr msg;
    struct iovec iov;
    struct sockaddr_in6 name; /* big enough for sockaddr_in */
    union {
        struct cmsghdr align;
        uint8_t buf[CMSG_BYTES];
    } ctl;
} tx_slot;

typedef struct {
    ips_fwd *f;
    uint32_t batch;
    uint8_t *in, *out, *rand;
    size_t *len;
    uint32_t *spi;
    uint8_t *state;
    tx_slot *tx[4]; /* by send queue: TXQ_UDP4 .. TXQ_RAW6 */
    struct mmsghdr *mm[4];
    uint32_t ntx[4];
    ips_fwd_counters c;
    ips_punt_list punts;
} out_ctx;

static unsigned be16(const uint8_t *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

static void out_free(out_ctx *x)
{
    free(x->in);
    free(x->out);
    free(x->rand);
    free(x->len);
    free(x->spi);
    free(x->state);
    for (int k = 0; k < 4; k++) {
        free(x->tx[k]);
        free(x->mm[k]);
    }
}

static int out_alloc(out_ctx *x, ips_fwd *f)
{
    memset(x, 0, sizeof(*x));
    x->f = f;
    x->batch = f->batch;
    size_t b = f->batch;
    x->in = malloc(b * IN_SIZE);
    x->out = malloc(b * OUT_SIZE);
    x->rand = malloc(16 * b);
    x->len = calloc(b, sizeof(size_t));
    x->spi = calloc(b, sizeof(uint32_t));
    x->state = calloc(b, 1);
    int ok = x->in && x->out && x->rand && x->len && x->spi && x->state;
    for (int k = 0; k < 4; k++) {
        x->tx[k] = calloc(b, sizeof(tx_slot));
        x->mm[k] = calloc(b, sizeof(struct mmsghdr));
        ok = ok && x->tx[k] && x->mm[k];
    }
    if (!ok)
        out_free(x);
    return ok ? 0 : -1;
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
    tx_slot *t = &x->tx[q][x->ntx[q]];
    memset(&t->name, 0, sizeof(t->name));
    struct msghdr *m = &t->msg.msg_hdr;
    memset(m, 0, sizeof(*m));
    unsigned port = 0;
    if (udp) {
        size_t ulen = be16(p + off + 4);
        if (ulen < 8 || off + ulen > n) {
            x->c.tx_errors[kind]++;
            return;
        }
        port = be16(p + off + 2);
        t->iov.iov_base = p + off + 8;
        t->iov.iov_len = ulen - 8;
        unsigned tos = v4 ? p[1] : (((p[0] & 0x0Fu) << 4) | (p[1] >> 4));
        if (tos) { /* DSCP and ECN survive encapsulation (backends/udp.py write_batch) */
            m->msg_control = t->ctl.buf;
            m->msg_controllen = CMSG_BYTES;
            struct cmsghdr *cm = CMSG_FIRSTHDR(m);
            cm->cmsg_level = v4 ? IPPROTO_IP : IPPROTO_IPV6;
            cm->cmsg_type = v4 ? IP_TOS : IPV6_TCLASS;
            cm->cmsg_len = CMSG_LEN(sizeof(int));
            int v = (int)tos;
            memcpy(CMSG_DATA(cm), &v, sizeof(v));
        }
    } else {
        t->iov.iov_base = p;
        t->iov.iov_len = n;
    }
    if (v4) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&t->name;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        memcpy(&sin->sin_addr, p + 16, 4);
        m->msg_namelen = sizeof(*sin);
    } else {
        t->name.sin6_family = AF_INET6;
        t->name.sin6_port = htons((uint16_t)port);
        memcpy(&t->name.sin6_addr, p + 24, 16);
        m->msg_namelen = sizeof(t->name);
    }
    m->msg_name = &t->name;
    m->msg_iov = &t->iov;
    m->msg_iovlen = 1;
    x->ntx[q]++;
}

static void flush_tx(out_ctx *x)
{
    for (int q = 0; q < 4; q++) {
        uint32_t cnt = x->ntx[q], done = 0;
        int k = txq_kind[q];
        int fd = x->f->port[k].fd;
        struct mmsghdr *mm = x->mm[q];
        for (uint32_t i = 0; i < cnt; i++)
            mm[i] = x->tx[q][i].msg;
        while (done < cnt) {
            int r = sendmmsg(fd, mm + done, cnt - done, MSG_DONTWAIT);
            x->c.syscalls++;
            if (r > 0) {
                for (int j = 0; j < r; j++) {
                    x->c.packets[IPS_OUT]++;
                    x->c.bytes[IPS_OUT] += mm[done + (uint32_t)j].msg_len;
                }
                done += (uint32_t)r;
            } else if (r < 0 && (errno == EAGAIN || errno == ENOBUFS)) {
                x->c.tx_errors[k] += cnt - done; /* the socket buffer is full: the rest is dropped */
                done = cnt;
            } else {
                x->c.tx_errors[k]++; /* this one (EMSGSIZE, no route, ...): dropped, the rest goes on */
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
        ips_reason r = ips_protect(sa, x->in + (size_t)i * IN_SIZE, x->len[i], x->len[i], out, OUT_SIZE, &out_len,
                                   r16);
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

static uint32_t read_inner(out_ctx *x)
{
    uint32_t n = 0;
    while (n < x->batch) {
        ssize_t r = read(x->f->tun_fd, x->in + (size_t)n * IN_SIZE, IN_SIZE);
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
        x->len[n++] = (size_t)r;
    }
    return n;
}

static void round_out(out_ctx *x)
{
    uint32_t n = read_inner(x);
    if (n == 0)
        return;
    x->c.batches[IPS_OUT]++;
    ips_flowcache *c = &x->f->cache[IPS_OUT];
    ips_flow k;
    pthread_mutex_lock(&c->lock);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t v;
        x->state[i] = ST_MISS;
        if (ips_flow_of(x->in + (size_t)i * IN_SIZE, x->len[i], 0, &k) == 0 && ips_fc_lookup(c, &k, &v)) {
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
            ips_pl_add(&x->punts, IPS_PUNT_OUT, 0, x->in + (size_t)i * IN_SIZE, x->len[i]);
    }
    flush_tx(x);
    ips_pq_push(&x->f->punts, &x->punts, 0);
    ips_fwd_account(x->f, &x->c, 1);
    ips_fwd_wake_for_events(x->f);
}

void *ips_fwd_out_main(void *arg)
{
    ips_fwd *f = arg;
    out_ctx x;
    if (out_alloc(&x, f) != 0)
        return NULL;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u32 = 0;
    int ok = ep >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, f->stop_fd, &ev) == 0;
    ev.data.u32 = 1;
    ok = ok && epoll_ctl(ep, EPOLL_CTL_ADD, f->tun_fd, &ev) == 0;
    struct epoll_event got[2];
    while (ok) {
        int r = ips_fwd_wait(f, ep, got, 2);
        if (r < 0)
            break;
        for (int i = 0; i < r; i++)
            if (got[i].data.u32 == 1)
                round_out(&x);
    }
    if (!ok) {
        x.c.rx_errors[K_TUN]++;
        ips_fwd_account(f, &x.c, 1);
    }
    if (ep >= 0)
        close(ep);
    out_free(&x);
    return NULL;
}
