/*
 * The forwarder's NFQUEUE threads (see nfq.h): one per queue, the only reader of its netlink socket.
 *
 * One round: recvmmsg() up to `batch` netlink datagrams into buffers big enough for a 64 KiB packet
 * (the copy range is 0xFFFF, set by nfq_start), walk their messages (nfq.c) and give every packet
 * exactly one verdict, now or later:
 *
 *   out queue  (plaintext of this host, RFC 4301 §5.1)  the flow key -> the outbound flow cache
 *              (learn_out): an SPI -> transport-mode ESP (ips_protect under the table's read lock and
 *              the SA's mutex, runs of one SA under one lock, RFC 4303 §3.3 order) -> ACCEPT with the
 *              ESP packet (ESP-in-UDP for encapsulating SAs, RFC 3948) and the queue's mark; a discard
 *              -> DROP (policy_discard); no decision, an SA gone, or a protected size above the MTU
 *              Python gave with the flow when the packet may not be fragmented (IPv6, or IPv4 with DF:
 *              Python answers with the ICMP, RFC 4301 §8) -> punted ("qout").
 *   in queue   ESP, and ESP in UDP to an encapsulation port, for this host: an inbound SA in the table
 *              -> ips_unprotect -> the inbound flow cache (learn_in) hit -> ACCEPT with the plaintext;
 *              a miss -> punted ("qin", spi, inner) for the RFC 4301 §5.2 policy check; a refused packet
 *              -> DROP, counted by reason; NAT keepalives -> DROP; IKE (non-ESP marker), an SPI the
 *              engine does not hold, AH, plaintext -> punted ("qouter"). With coalescing on
 *              (nfq_start(coalesce=True), [agent] offloads), the round's in-order TCP segments of one
 *              flow are accepted as one packet, as the kernel's GRO would have merged them (the
 *              first's verdict carries the run with full checksums, at most MERGE_MAX_SEGMENTS and
 *              MERGE_MAX_BYTES, and the others are dropped as absorbed): the local TCP stack takes
 *              one packet instead of many, which is most of what a queued TCP segment costs.
 *
 *   TCP queue  (nfq_start kind "tcp", fwd_nfq_gso.c) the out queue's work for the host's TCP, with
 *              NFQA_CFG_F_GSO: a super-packet is cut (ips_seg_write) and each segment protected; every
 *              ESP packet of this queue leaves by the raw sockets (sendmmsg at the end of the round),
 *              its original dropped as delivered; a super-packet of an unknown flow goes to Python as
 *              its segments ("qseg"), a single packet as "qout". Unfinished checksums (CSUMNOTREADY)
 *              are finished as the packet is collected, before anything reads it.
 *
 * A punted packet stays queued in the kernel until Python's Engine.nfq_verdict names its id; a punt
 * that finds the punt queue full (or no memory for its copy) is answered DROP at once and counted
 * (punt_dropped), so nothing waits without bound. A packet cut short (NFQA_CAP_LEN, or shorter than
 * its IP header says), or a packet message with unreadable attributes, is dropped and counted.
 *
 * Verdicts of a round go out in as few sendmsg() calls as the socket's send buffer allows: each
 * verdict is its header bytes (nfq.c), its payload where it lies (the receive buffer is not copied
 * for the in queue's punts, the protect output for the out queue) and its alignment padding, three
 * iovecs. A failed send is retried one message at a time, then as a bare DROP: two tries, bounded.
 */
#define _GNU_SOURCE 1 /* recvmmsg */
#include <errno.h>
#include <linux/netlink.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "fwd.h"

#define RX_SIZE (IPS_MAX_DATAGRAM + 1024) /* one message: netlink headers + attributes + a 64 KiB packet */
#define OUT_SIZE (IPS_MAX_DATAGRAM + IPS_HEADROOM)
#define PKTS_PER_DGRAM 2 /* room per datagram (the kernel sends one message each; more are tolerated) */
#define MAX_IOV 1020     /* under UIO_MAXIOV (1024), a multiple of 3 */
#define SEND_BUDGET_MAX (1u << 20)
/* Coalesced in-queue runs: the kernel copies the replacement into a linear buffer allocated in
 * atomic context (nfqnl_mangle), so runs stay small enough for a low-order allocation. */
#define MERGE_MAX_SEGMENTS 16
#define MERGE_MAX_BYTES (24 * 1024)

enum { ST_MISS = 0, ST_SPI, ST_DISCARD, ST_DONE, ST_PUNT, ST_SENT };
#define SEG_MAX 1024 /* segments of one super-packet (64 KiB at the smallest segment size) */

static const uint8_t zeros[4] = {0, 0, 0, 0};

typedef struct {
    const uint8_t *payload; /* NULL: no replacement */
    size_t len, hdr_len;
    uint8_t hdr[IPS_NFQ_VERDICT_HDR];
    uint32_t id;
} verdict;

typedef struct {
    ips_nfq_queue *q;
    ips_fwd *f;
    uint32_t batch, maxpk, maxv;
    uint8_t *rx, *out, *rand;
    struct mmsghdr *mm;
    struct iovec *rx_iov, *tx_iov;
    ips_nfq_packet *pk;
    uint8_t *state;
    uint32_t *spi, *mtu;
    size_t *out_len;
    ips_delivery *dl; /* in queue: decrypted packets of known flows, to coalesce (coalesce on) */
    uint32_t *dl_id;
    uint8_t *absorbed;
    uint32_t ndl;
    uint32_t npk, nv;
    verdict *v;
    size_t budget;
    ips_fwd_counters c;
    ips_punt_list punts;
    ips_nfq_tx *tx;   /* the TCP queue: protected packets for the raw sockets (fwd_nfq_gso.c) */
    uint8_t *seg;     /* the TCP queue: one segment of a super-packet */
    uint8_t *segrand; /* the TCP queue: CBC IVs for one super-packet's segments */
} nfq_ctx;

static unsigned be16(const uint8_t *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

static void ctx_free(nfq_ctx *x)
{
    free(x->rx);
    free(x->out);
    free(x->rand);
    free(x->mm);
    free(x->rx_iov);
    free(x->tx_iov);
    free(x->pk);
    free(x->state);
    free(x->spi);
    free(x->mtu);
    free(x->out_len);
    free(x->v);
    free(x->dl);
    free(x->dl_id);
    free(x->absorbed);
    ips_nfq_tx_free(x->tx);
    free(x->seg);
    free(x->segrand);
}

static int ctx_alloc(nfq_ctx *x, ips_nfq_queue *q)
{
    memset(x, 0, sizeof(*x));
    x->q = q;
    x->f = q->f;
    x->batch = q->f->batch;
    x->maxpk = x->batch * PKTS_PER_DGRAM;
    x->maxv = x->maxpk;
    size_t b = x->batch, p = x->maxpk;
    x->rx = malloc(b * RX_SIZE);
    x->out = malloc(p * OUT_SIZE);
    x->rand = malloc(16 * p);
    x->mm = calloc(b, sizeof(*x->mm));
    x->rx_iov = calloc(b, sizeof(*x->rx_iov));
    x->tx_iov = calloc(MAX_IOV, sizeof(*x->tx_iov));
    x->pk = calloc(p, sizeof(*x->pk));
    x->state = calloc(p, 1);
    x->spi = calloc(p, sizeof(uint32_t));
    x->mtu = calloc(p, sizeof(uint32_t));
    x->out_len = calloc(p, sizeof(size_t));
    x->v = calloc(x->maxv, sizeof(*x->v));
    x->dl = calloc(p, sizeof(*x->dl));
    x->dl_id = calloc(p, sizeof(uint32_t));
    x->absorbed = calloc(p, 1);
    if (!(x->rx && x->out && x->rand && x->mm && x->rx_iov && x->tx_iov && x->pk && x->state && x->spi && x->mtu &&
          x->out_len && x->v && x->dl && x->dl_id && x->absorbed)) {
        ctx_free(x);
        return -1;
    }
    if (q->gso) {
        x->tx = ips_nfq_tx_new();
        x->seg = malloc(IPS_MAX_DATAGRAM);
        x->segrand = malloc(16 * SEG_MAX);
        if (!(x->tx && x->seg && x->segrand)) {
            ctx_free(x);
            return -1;
        }
    }
    int sndbuf = 0;
    socklen_t sl = sizeof(sndbuf);
    if (getsockopt(q->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &sl) != 0 || sndbuf < 8192)
        sndbuf = 8192;
    x->budget = (size_t)sndbuf - 1024; /* netlink_sendmsg refuses a message above sk_sndbuf - 32 */
    if (x->budget > SEND_BUDGET_MAX)
        x->budget = SEND_BUDGET_MAX;
    return 0;
}

static void drop(nfq_ctx *x, ips_reason r)
{
    x->c.drops[r]++;
    x->c.engine_drops[r]++;
}

/* ---- sending verdicts ----------------------------------------------------------------------- */

static int send_iov(nfq_ctx *x, struct iovec *iov, size_t n)
{
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    struct msghdr m = {.msg_name = &kernel, .msg_namelen = sizeof(kernel), .msg_iov = iov, .msg_iovlen = n};
    ssize_t r;
    do
        r = sendmsg(x->q->fd, &m, MSG_DONTWAIT);
    while (r < 0 && errno == EINTR);
    x->c.syscalls++;
    return r < 0 ? -1 : 0;
}

static size_t verdict_iov(verdict *v, struct iovec *iov)
{
    size_t total = v->hdr_len + (v->payload ? v->len : 0);
    size_t n = 0;
    iov[n++] = (struct iovec){.iov_base = v->hdr, .iov_len = v->hdr_len};
    if (v->payload != NULL && v->len > 0)
        iov[n++] = (struct iovec){.iov_base = (void *)v->payload, .iov_len = v->len};
    size_t pad = ips_nfq_pad(total);
    if (pad)
        iov[n++] = (struct iovec){.iov_base = (void *)zeros, .iov_len = pad};
    return n;
}

/* One verdict on its own; on failure once more as a bare DROP (the packet must not stay queued). */
static void send_single(nfq_ctx *x, verdict *v)
{
    struct iovec iov[3];
    if (send_iov(x, iov, verdict_iov(v, iov)) == 0)
        return;
    x->c.nfq_tx_errors++;
    verdict d = {.payload = NULL, .id = v->id};
    d.hdr_len = ips_nfq_verdict_hdr(d.hdr, x->q->queue_num, v->id, IPS_NFQ_DROP, 0, 0, 0, 0);
    if (send_iov(x, iov, verdict_iov(&d, iov)) != 0)
        x->c.nfq_tx_errors++;
}

static void flush_verdicts(nfq_ctx *x)
{
    uint32_t i = 0;
    while (i < x->nv) {
        uint32_t first = i;
        size_t n = 0, bytes = 0;
        while (i < x->nv && n + 3 <= MAX_IOV) {
            verdict *v = &x->v[i];
            size_t len = v->hdr_len + (v->payload ? v->len : 0);
            len += ips_nfq_pad(len);
            if (i > first && bytes + len > x->budget)
                break;
            n += verdict_iov(v, x->tx_iov + n);
            bytes += len;
            i++;
        }
        if (send_iov(x, x->tx_iov, n) != 0)
            for (uint32_t j = first; j < i; j++) /* bounded: one more try each, then a bare drop */
                send_single(x, &x->v[j]);
    }
    x->nv = 0;
}

/* Queue one verdict for the round; what the kernel will be told: IPS_NFQ_ACCEPT or IPS_NFQ_DROP. */
static uint32_t push_verdict(nfq_ctx *x, uint32_t id, const uint8_t *payload, size_t len, int mark)
{
    if (x->nv >= x->maxv)
        flush_verdicts(x); /* (the payloads named so far stay valid until the round ends) */
    verdict *v = &x->v[x->nv];
    v->id = id;
    v->payload = payload;
    v->len = len;
    uint32_t what = payload != NULL ? IPS_NFQ_ACCEPT : IPS_NFQ_DROP;
    int with_mark = mark && payload != NULL && x->q->has_mark;
    v->hdr_len = ips_nfq_verdict_hdr(v->hdr, x->q->queue_num, id, what, with_mark, x->q->mark, payload != NULL, len);
    if (v->hdr_len == 0) { /* a replacement too long for an attribute: drop instead */
        v->payload = NULL;
        what = IPS_NFQ_DROP;
        v->hdr_len = ips_nfq_verdict_hdr(v->hdr, x->q->queue_num, id, what, 0, 0, 0, 0);
        drop(x, IPS_R_BAD_LENGTH);
    }
    x->nv++;
    return what;
}

static void add_verdict(nfq_ctx *x, uint32_t id, const uint8_t *payload, size_t len, int mark)
{
    if (push_verdict(x, id, payload, len, mark) == IPS_NFQ_ACCEPT)
        x->c.nfq_accept++;
    else
        x->c.nfq_drop++;
}

/* A segment another packet of its round took in (coalesced): DROP, but delivered, not a drop. */
static void absorb(nfq_ctx *x, uint32_t id)
{
    push_verdict(x, id, NULL, 0, 0);
    x->c.packets[IPS_IN]++;
}

static void accept_engine(nfq_ctx *x, uint32_t id, const uint8_t *payload, size_t len, int dir)
{
    add_verdict(x, id, payload, len, dir == IPS_OUT);
    x->c.packets[dir]++;
    x->c.bytes[dir] += len;
}

static void punt(nfq_ctx *x, ips_punt_kind kind, uint32_t id, uint32_t spi, const uint8_t *data, size_t len)
{
    if (ips_pl_add_q(&x->punts, kind, x->q->queue_num, id, spi, data, len) != 0)
        add_verdict(x, id, NULL, 0, 0); /* no copy: drop now (counted as punt_dropped) */
}

/* ---- the out queue --------------------------------------------------------------------------- */

/* The transport-mode ESP packet's length (esp.c ips_protect's layout) for a packet whose flow was cached. */
static size_t protected_len(const ips_sa *sa, const uint8_t *pkt)
{
    const ips_suite *s = sa->cipher.suite;
    int v4 = pkt[0] >> 4 == 4;
    size_t off = v4 ? (size_t)(pkt[0] & 0x0F) * 4 : 40; /* cached IPv6 flows have no extension headers */
    size_t end = v4 ? be16(pkt + 2) : 40 + be16(pkt + 4);
    size_t payload = end - off;
    size_t pad = (size_t)((s->block - (int)((payload + 2) % (size_t)s->block)) % s->block);
    return off + (sa->udp ? 8 : 0) + 8 + (size_t)s->iv_len + payload + pad + 2 + (size_t)s->icv_len;
}

/* RFC 4301 §8: above the path MTU and not fragmentable -> Python sends the ICMP (datapath.py _too_big). */
static int too_big(const ips_sa *sa, const uint8_t *pkt, uint32_t mtu)
{
    if (mtu == 0)
        return 0;
    size_t n = protected_len(sa, pkt);
    int v4 = pkt[0] >> 4 == 4;
    return n > 1280 && n > mtu && (!v4 || (pkt[6] & 0x40));
}

/* The raw sockets' batch has room for a packet of `need` bytes (sent first when it has not). */
static uint8_t *tx_room(nfq_ctx *x, size_t need)
{
    uint8_t *out = ips_nfq_tx_room(x->tx, need);
    if (out == NULL) {
        ips_nfq_tx_flush(x->f, x->tx, &x->c);
        out = ips_nfq_tx_room(x->tx, need);
    }
    return out; /* (need is at most one datagram: an empty batch always has room) */
}

/* Plan a TCP super-packet's segments at the size ips_gso_size gives (sa NULL: a flow Python decides);
 * 0, or -1 when it does not parse (dropped and counted, its verdict given). */
static int plan_super(nfq_ctx *x, const ips_sa *sa, uint32_t i, ips_seg *plan)
{
    const ips_nfq_packet *p = &x->pk[i];
    ips_vnet v = {.gso_type = p->payload[0] >> 4 == 4 ? 1u : 4u, .gso_size = 1024}; /* GSO_TCPV4 / TCPV6 */
    ips_reason why = ips_seg_plan(p->payload, p->payload_len, &v, plan); /* the headers, checked */
    if (why == IPS_OK) /* the size read off those headers */
        ips_seg_resize(plan, ips_gso_size(&x->f->mss, sa, p->payload, p->payload_len, sa != NULL ? x->mtu[i] : 0));
    if (why == IPS_OK && plan->count > SEG_MAX)
        why = IPS_R_MALFORMED;
    if (why == IPS_OK) {
        x->c.nfq_gso_super++;
        x->c.nfq_gso_segments += plan->count;
        return 0;
    }
    drop(x, why);
    add_verdict(x, p->id, NULL, 0, 0);
    return -1;
}

/* A TCP super-packet of a cached flow (fwd_nfq_gso.c): cut, each segment protected into the batch. */
static void protect_super(nfq_ctx *x, ips_sa *sa, uint32_t i)
{
    const ips_nfq_packet *p = &x->pk[i];
    ips_seg plan;
    x->state[i] = ST_DONE;
    if (plan_super(x, sa, i, &plan) != 0)
        return;
    const uint8_t *rand = NULL;
    if (sa->cipher.suite->kind == IPS_CBC && RAND_bytes(x->segrand, 16 * (int)plan.count) == 1)
        rand = x->segrand;
    for (uint32_t k = 0; k < plan.count; k++) {
        size_t n = ips_seg_write(p->payload, &plan, k, x->seg);
        size_t cap = n + IPS_HEADROOM, got = 0;
        uint8_t *out = tx_room(x, cap);
        ips_reason r = ips_protect(sa, x->seg, n, n, out, cap, &got, rand ? rand + 16 * k : NULL);
        x->c.engine_packets++;
        if (r == IPS_OK) {
            ips_nfq_tx_commit(x->tx, got);
        } else {
            sa->drops[r]++;
            drop(x, r);
        }
    }
    push_verdict(x, p->id, NULL, 0, 0); /* the super-packet: its segments left by the raw sockets */
}

/* A TCP super-packet whose flow has no decision: its segments go to Python one by one ("qseg"). */
static void punt_super(nfq_ctx *x, uint32_t i)
{
    const ips_nfq_packet *p = &x->pk[i];
    ips_seg plan;
    if (plan_super(x, NULL, i, &plan) != 0)
        return;
    for (uint32_t k = 0; k < plan.count; k++) {
        size_t n = ips_seg_write(p->payload, &plan, k, x->seg);
        ips_pl_add_q(&x->punts, IPS_PUNT_QSEG, x->q->queue_num, 0, 0, x->seg, n); /* (no copy: counted) */
    }
    push_verdict(x, p->id, NULL, 0, 0);
}

static void protect_all(nfq_ctx *x)
{
    EngineObject *e = x->f->engine;
    ips_sa *sa = NULL;
    uint32_t cur = 0, used = 0;
    int have_rand = 0;
    pthread_rwlock_rdlock(&e->table_lock);
    for (uint32_t i = 0; i < x->npk; i++) {
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
        const ips_nfq_packet *p = &x->pk[i];
        if (x->q->gso && (p->skbinfo & IPS_NFQ_SKB_GSO)) {
            protect_super(x, sa, i);
            continue;
        }
        if (too_big(sa, p->payload, x->mtu[i])) {
            x->state[i] = ST_PUNT;
            x->c.nfq_too_big++;
            continue;
        }
        const uint8_t *r16 = NULL;
        if (sa->cipher.suite->kind == IPS_CBC) {
            if (!have_rand)
                have_rand = RAND_bytes(x->rand, 16 * (int)x->maxpk) == 1 ? 1 : -1;
            r16 = have_rand > 0 ? x->rand + 16 * used : NULL;
        }
        uint8_t *out = x->out + (size_t)i * OUT_SIZE;
        size_t cap = OUT_SIZE;
        if (x->q->gso) { /* straight into the raw sockets' batch */
            cap = p->payload_len + IPS_HEADROOM;
            out = tx_room(x, cap);
        }
        ips_reason r = ips_protect(sa, p->payload, p->payload_len, p->payload_len, out, cap, &x->out_len[i], r16);
        x->c.engine_packets++;
        if (r == IPS_OK || r == IPS_R_CRYPTO_ERROR)
            used++;
        if (r == IPS_OK && x->q->gso) {
            ips_nfq_tx_commit(x->tx, x->out_len[i]);
            x->state[i] = ST_SENT;
        }
        if (r != IPS_OK) {
            sa->drops[r]++;
            drop(x, r);
            x->state[i] = ST_DONE;
            add_verdict(x, p->id, NULL, 0, 0);
        }
    }
    if (sa != NULL)
        pthread_mutex_unlock(&sa->lock);
    pthread_rwlock_unlock(&e->table_lock);
}

static void round_out(nfq_ctx *x)
{
    ips_flowcache *c = &x->f->cache[IPS_OUT];
    ips_flow k;
    pthread_mutex_lock(&c->lock);
    for (uint32_t i = 0; i < x->npk; i++) {
        uint32_t v, aux;
        const ips_nfq_packet *p = &x->pk[i];
        x->state[i] = ST_MISS;
        if (ips_flow_of(p->payload, p->payload_len, 0, &k) == 0 && ips_fc_lookup_aux(c, &k, &v, &aux)) {
            x->state[i] = v ? ST_SPI : ST_DISCARD;
            x->spi[i] = v;
            x->mtu[i] = aux;
        }
    }
    pthread_mutex_unlock(&c->lock);
    protect_all(x);
    for (uint32_t i = 0; i < x->npk; i++) {
        const ips_nfq_packet *p = &x->pk[i];
        switch (x->state[i]) {
        case ST_SPI:
            accept_engine(x, p->id, x->out + (size_t)i * OUT_SIZE, x->out_len[i], IPS_OUT);
            break;
        case ST_DISCARD:
            drop(x, IPS_R_POLICY_DISCARD);
            add_verdict(x, p->id, NULL, 0, 0);
            break;
        case ST_SENT:
            push_verdict(x, p->id, NULL, 0, 0); /* its ESP form left by the raw sockets */
            break;
        case ST_MISS:
            if (x->q->gso && (p->skbinfo & IPS_NFQ_SKB_GSO)) {
                punt_super(x, i);
                break;
            }
            /* fall through */
        case ST_PUNT:
            punt(x, IPS_PUNT_QOUT, p->id, 0, p->payload, p->payload_len);
            break;
        default:
            break; /* ST_DONE: answered */
        }
    }
}

/* ---- the in queue ---------------------------------------------------------------------------- */

static int is_encap_port(const ips_fwd *f, unsigned port)
{
    for (uint32_t i = 0; i < f->nencap; i++)
        if (f->encap_ports[i] == port)
            return 1;
    return 0;
}

/* What the in queue's packet is: 1 ESP (or ESP in UDP), 0 for Python, -1 a NAT keepalive. */
static int classify_in(const ips_fwd *f, const uint8_t *pkt, size_t len)
{
    size_t off;
    unsigned proto;
    if (pkt[0] >> 4 == 4) {
        off = (size_t)(pkt[0] & 0x0F) * 4;
        proto = pkt[9];
        if (((pkt[6] << 8) | pkt[7]) & 0x3FFF)
            return 0; /* a fragment (reassembled before INPUT normally): Python's */
    } else {
        off = 40;
        proto = pkt[6]; /* ESP after extension headers: ips_locate walks them; UDP after them: Python's */
        if (proto != 17)
            return proto == 50 || proto == 0 || proto == 43 || proto == 60 ? 1 : 0;
    }
    if (proto == 50)
        return 1;
    if (proto != 17 || off < 20 || len < off + 8 || !is_encap_port(f, be16(pkt + off + 2)))
        return 0;
    const uint8_t *body = pkt + off + 8;
    size_t n = len - off - 8;
    if (n == 1 && body[0] == 0xFF)
        return -1; /* RFC 3948 §2.3 */
    if (n >= 4 && body[0] == 0 && body[1] == 0 && body[2] == 0 && body[3] == 0)
        return 0; /* IKE after the non-ESP marker (RFC 3948 §2.2) */
    return 1;
}

static void in_packet(nfq_ctx *x, uint32_t i)
{
    const ips_nfq_packet *p = &x->pk[i];
    EngineObject *e = x->f->engine;
    int kind = classify_in(x->f, p->payload, p->payload_len);
    if (kind < 0) {
        drop(x, IPS_R_NAT_KEEPALIVE);
        add_verdict(x, p->id, NULL, 0, 0);
        return;
    }
    ips_located loc;
    if (kind == 0 || ips_locate(p->payload, p->payload_len, p->payload_len, &loc) != IPS_OK) {
        punt(x, IPS_PUNT_QOUTER, p->id, 0, p->payload, p->payload_len); /* Python sorts and counts it */
        return;
    }
    uint8_t *out = x->out + (size_t)i * OUT_SIZE;
    size_t out_len = 0;
    pthread_rwlock_rdlock(&e->table_lock);
    ips_sa *sa = ips_table_find(e, IPS_IN, loc.spi);
    if (sa == NULL) {
        pthread_rwlock_unlock(&e->table_lock);
        punt(x, IPS_PUNT_QOUTER, p->id, 0, p->payload, p->payload_len); /* Python's SA, or unknown */
        return;
    }
    pthread_mutex_lock(&sa->lock);
    ips_reason r = ips_unprotect(sa, p->payload, &loc, out, OUT_SIZE, &out_len);
    if (r != IPS_OK)
        sa->drops[r]++;
    pthread_mutex_unlock(&sa->lock);
    pthread_rwlock_unlock(&e->table_lock);
    x->c.engine_packets++;
    if (r != IPS_OK) {
        drop(x, r);
        add_verdict(x, p->id, NULL, 0, 0);
        return;
    }
    ips_mss_learn(&x->f->mss, out, out_len); /* a SYN's MSS bounds the TCP queue's segments (fwd_nfq_gso.c) */
    ips_flow k;
    uint32_t v;
    int known = 0;
    ips_flowcache *c = &x->f->cache[IPS_IN];
    if (ips_flow_of(out, out_len, loc.spi, &k) == 0) {
        pthread_mutex_lock(&c->lock);
        known = ips_fc_lookup(c, &k, &v);
        pthread_mutex_unlock(&c->lock);
    }
    if (known && x->f->coalesce) {
        x->dl[x->ndl] = (ips_delivery){.pkt = out, .len = (uint32_t)out_len};
        x->dl_id[x->ndl++] = p->id;
    } else if (known) {
        accept_engine(x, p->id, out, out_len, IPS_IN);
    } else {
        punt(x, IPS_PUNT_QIN, p->id, loc.spi, out, out_len);
    }
}

/* The round's deliverable packets: in-order TCP segments of a flow accepted as one packet (the first
 * one's verdict carries the run, as GRO would have built it; the others are dropped as absorbed). */
static void deliver_in(nfq_ctx *x)
{
    if (x->ndl == 0)
        return;
    ips_merge(&x->c, x->dl, x->ndl, x->absorbed, MERGE_MAX_SEGMENTS, MERGE_MAX_BYTES);
    for (uint32_t i = 0; i < x->ndl; i++) {
        if (x->absorbed[i])
            absorb(x, x->dl_id[i]);
        else
            accept_engine(x, x->dl_id[i], x->dl[i].pkt, x->dl[i].len, IPS_IN);
    }
    x->ndl = 0;
}

/* ---- one round ------------------------------------------------------------------------------- */

/* The packet's bytes are all there: not cut short by the copy range, and as long as its IP header says. */
static int whole(const ips_nfq_packet *p)
{
    const uint8_t *b = p->payload;
    size_t n = p->payload_len;
    if (b == NULL || n < 20 || (p->cap_len != 0 && p->cap_len > n))
        return 0;
    if (b[0] >> 4 == 4)
        return (b[0] & 0x0F) >= 5 && be16(b + 2) >= (size_t)(b[0] & 0x0F) * 4 && be16(b + 2) <= n;
    return b[0] >> 4 == 6 && n >= 40 && 40 + be16(b + 4) <= n;
}

static void collect(nfq_ctx *x, const uint8_t *buf, size_t len)
{
    size_t off = 0;
    for (int guard = 0; guard < 1024; guard++) { /* bounded: every message advances off by >= 16 */
        ips_nfq_packet p;
        int err;
        ips_nfq_kind k = ips_nfq_next(buf, len, &off, &p, &err);
        if (k == IPS_NFQ_END)
            return;
        if (k == IPS_NFQ_MALFORMED) {
            x->c.nfq_malformed++;
            return;
        }
        if (k == IPS_NFQ_ERROR) {
            if (err != 0)
                x->c.nfq_kernel_errors++; /* e.g. a verdict for an id the kernel no longer holds */
            continue;
        }
        if (k == IPS_NFQ_OTHER)
            continue;
        x->c.nfq_rx++;
        if (k == IPS_NFQ_BAD_PACKET || p.queue_num != x->q->queue_num) {
            x->c.nfq_malformed++;
            add_verdict(x, p.id, NULL, 0, 0);
        } else if (!whole(&p)) {
            x->c.nfq_truncated++;
            drop(x, IPS_R_TRUNCATED);
            add_verdict(x, p.id, NULL, 0, 0);
        } else if (x->npk >= x->maxpk) {
            x->c.nfq_malformed++; /* more messages in one round than the kernel ever sends: drop them */
            add_verdict(x, p.id, NULL, 0, 0);
        } else if ((p.skbinfo & (IPS_NFQ_SKB_CSUMNOTREADY | IPS_NFQ_SKB_GSO)) != IPS_NFQ_SKB_CSUMNOTREADY) {
            x->pk[x->npk++] = p; /* (a super-packet's segments get full checksums as they are cut) */
        } else if (ips_csum_partial((uint8_t *)p.payload, p.payload_len) == IPS_OK) {
            x->c.nfq_csum_finished++; /* (the payload lies in this thread's receive buffer) */
            x->pk[x->npk++] = p;
        } else {
            drop(x, IPS_R_MALFORMED);
            add_verdict(x, p.id, NULL, 0, 0);
        }
    }
}

static void answer_overflow(nfq_ctx *x, ips_punt *rest)
{
    for (ips_punt *p = rest; p != NULL; p = p->next)
        if (p->kind != IPS_PUNT_QSEG) /* (a segment's super-packet was answered already) */
            add_verdict(x, p->id, NULL, 0, 0); /* the punt queue is full: drop (counted as punt_dropped) */
    flush_verdicts(x);
    ips_punt_free_chain(rest);
}

static void round_nfq(nfq_ctx *x)
{
    for (uint32_t i = 0; i < x->batch; i++) {
        x->rx_iov[i] = (struct iovec){.iov_base = x->rx + (size_t)i * RX_SIZE, .iov_len = RX_SIZE};
        struct msghdr *m = &x->mm[i].msg_hdr;
        memset(m, 0, sizeof(*m));
        m->msg_iov = &x->rx_iov[i];
        m->msg_iovlen = 1;
        x->mm[i].msg_len = 0;
    }
    int r = recvmmsg(x->q->fd, x->mm, x->batch, MSG_DONTWAIT, NULL);
    x->c.syscalls++;
    if (r <= 0) {
        if (r < 0 && errno != EAGAIN && errno != EINTR)
            x->c.nfq_tx_errors++; /* (ENOBUFS is off: NETLINK_NO_ENOBUFS, backends/nfqueue.py) */
        return;
    }
    int dir = x->q->inbound ? IPS_IN : IPS_OUT;
    x->c.batches[dir]++;
    x->npk = 0;
    x->nv = 0;
    for (int i = 0; i < r; i++) {
        if (x->mm[i].msg_hdr.msg_flags & MSG_TRUNC) {
            x->c.nfq_malformed++; /* cannot happen with RX_SIZE buffers */
            continue;
        }
        collect(x, x->rx_iov[i].iov_base, x->mm[i].msg_len);
    }
    if (x->q->inbound) {
        x->ndl = 0;
        for (uint32_t i = 0; i < x->npk; i++)
            in_packet(x, i);
        deliver_in(x);
    } else
        round_out(x);
    if (x->tx != NULL)
        ips_nfq_tx_flush(x->f, x->tx, &x->c); /* the TCP queue's ESP packets, then the verdicts that free theirs */
    flush_verdicts(x);
    ips_punt *rest = ips_pq_push_rest(&x->f->punts, &x->punts, 0);
    if (rest != NULL)
        answer_overflow(x, rest);
    ips_fwd_account(x->f, &x->c, dir == IPS_OUT);
    ips_fwd_wake_for_events(x->f);
}

void *ips_nfq_main(void *arg)
{
    ips_nfq_queue *q = arg;
    ips_fwd *f = q->f;
    nfq_ctx x;
    if (ctx_alloc(&x, q) != 0)
        return NULL;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u32 = 0;
    int ok = ep >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, f->stop_fd, &ev) == 0;
    ev.data.u32 = 1;
    ok = ok && epoll_ctl(ep, EPOLL_CTL_ADD, q->fd, &ev) == 0;
    struct epoll_event got[2];
    while (ok) {
        int n = ips_fwd_wait(f, ep, got, 2);
        if (n < 0)
            break;
        for (int i = 0; i < n; i++)
            if (got[i].data.u32 == 1)
                round_nfq(&x);
    }
    if (!ok) {
        x.c.nfq_tx_errors++;
        ips_fwd_account(f, &x.c, !q->inbound);
    }
    if (ep >= 0)
        close(ep);
    ctx_free(&x);
    return NULL;
}

int ips_nfq_run(ips_fwd *f, const char **why)
{
    if (f->port[K_ESP4].fd >= 0 || f->port[K_ESP6].fd >= 0) {
        /* the host's ESP from raw sockets, decrypted into the inject TUN (fwd_in.c): no in queue for it */
        f->in_ctx = ips_fwd_in_new(f);
        if (f->in_ctx == NULL) {
            *why = "cannot allocate the inbound thread's buffers or its epoll set (lower batch?)";
            f->failed = 1;
            ips_fwd_stop(f);
            return -1;
        }
        if (pthread_create(&f->threads[0], NULL, ips_fwd_in_main, f->in_ctx) != 0) {
            *why = "cannot create the inbound thread";
            f->failed = 1;
            ips_fwd_stop(f);
            return -1;
        }
        f->started[0] = 1;
    }
    for (uint32_t i = 0; i < f->nnfq; i++) {
        f->nfq[i].f = f;
        if (pthread_create(&f->nfq[i].thread, NULL, ips_nfq_main, &f->nfq[i]) != 0) {
            *why = "cannot create an NFQUEUE thread";
            ips_fwd_stop(f);
            return -1;
        }
        f->nfq[i].started = 1;
    }
    f->running = 1;
    return 0;
}
