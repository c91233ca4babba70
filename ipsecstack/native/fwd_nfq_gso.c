/*
 * The NFQUEUE TCP queue (see fwd_nfq.c): the host's TCP super-packets, segmented and protected here.
 *
 * Theory of operation
 * -------------------
 * Without NFQA_CFG_F_GSO the kernel cuts every TCP super-packet into wire-sized segments before it
 * queues them, and each segment costs a netlink message, a queue lookup and a verdict carrying its
 * ESP form back. The TCP queue (backends/nfqueue.py queues the host's protected TCP there) is
 * configured with F_GSO instead: a super-packet of up to 64 KiB arrives as one message, with
 * NFQA_SKB_INFO saying GSO and/or CSUMNOTREADY (the kernel leaves CHECKSUM_PARTIAL unfinished for such
 * a queue). The kernel does not say the segment size, so it is chosen here (ips_gso_size): the largest
 * payload whose protected segment fits the path MTU Python gave with the flow, and never more than the
 * peer announced in its SYN's MSS option (less the TCP options, RFC 6691), which the in queue remembers
 * for the reverse flow (ips_mss_learn) as it decrypts the peer's SYN. fwd_seg.c cuts the segments with
 * full checksums, each is protected in sequence-number order, and the ESP packets leave by sendmmsg()
 * on IPPROTO_RAW sockets (header included) that carry the protected packets' mark
 * (backends/esp_routes.py), which the rules return at once; the super-packet itself is dropped, as
 * delivered. A single segment with an unfinished checksum is finished in place (ips_csum_partial)
 * before anything reads it. The raw sockets are Python's; the engine only sends on them.
 *
 * The send batch (ips_nfq_tx) is an arena of packets in order, sent at the end of the round, or at once
 * when it cannot take the next packet. A send the socket refuses for lack of buffer
 * waits once for room (bounded), then what is left of the run is dropped and counted; TCP repairs it.
 */
#define _GNU_SOURCE 1 /* sendmmsg */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "fwd.h"

#define TX_BYTES (2u << 20)
#define TX_SLOTS 1024u
#define MIN_SEGMENT 64u
#define UNKNOWN_SA_SEGMENT 1024u /* no SA yet (Python decides): protected, it fits IPv6's minimum MTU */
#define ROOM_WAIT_MS 20

struct ips_nfq_tx {
    uint8_t *arena;
    size_t used, last_need;
    uint32_t n;
    uint32_t off[TX_SLOTS], len[TX_SLOTS];
    struct mmsghdr mm[TX_SLOTS];
    struct iovec iov[TX_SLOTS];
    struct sockaddr_in6 name[TX_SLOTS]; /* big enough for sockaddr_in */
};

static unsigned be16(const uint8_t *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

ips_nfq_tx *ips_nfq_tx_new(void)
{
    ips_nfq_tx *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return NULL;
    t->arena = malloc(TX_BYTES);
    if (t->arena == NULL) {
        free(t);
        return NULL;
    }
    return t;
}

void ips_nfq_tx_free(ips_nfq_tx *t)
{
    if (t != NULL)
        free(t->arena);
    free(t);
}

uint8_t *ips_nfq_tx_room(ips_nfq_tx *t, size_t need)
{
    if (t->n >= TX_SLOTS || need > TX_BYTES - t->used)
        return NULL;
    t->last_need = need;
    return t->arena + t->used;
}

void ips_nfq_tx_commit(ips_nfq_tx *t, size_t len)
{
    if (len > t->last_need || t->n >= TX_SLOTS)
        return; /* (cannot happen: the caller wrote within the room it asked for) */
    t->off[t->n] = (uint32_t)t->used;
    t->len[t->n] = (uint32_t)len;
    t->n++;
    t->used += (len + 15) & ~(size_t)15;
}

socklen_t ips_raw_dest(const uint8_t *pkt, struct sockaddr_in6 *name)
{
    memset(name, 0, sizeof(*name));
    if (pkt[0] >> 4 == 4) {
        struct sockaddr_in *a = (struct sockaddr_in *)name;
        a->sin_family = AF_INET;
        memcpy(&a->sin_addr, pkt + 16, 4);
        return sizeof(*a);
    }
    name->sin6_family = AF_INET6;
    memcpy(&name->sin6_addr, pkt + 24, 16);
    return sizeof(*name);
}

/* One message per packet, its destination the packet's own. */
static void build(ips_nfq_tx *t, uint32_t i)
{
    uint8_t *p = t->arena + t->off[i];
    struct msghdr *m = &t->mm[i].msg_hdr;
    memset(m, 0, sizeof(*m));
    t->iov[i] = (struct iovec){.iov_base = p, .iov_len = t->len[i]};
    m->msg_iov = &t->iov[i];
    m->msg_iovlen = 1;
    m->msg_name = &t->name[i];
    m->msg_namelen = ips_raw_dest(p, &t->name[i]);
    t->mm[i].msg_len = 0;
}

static void send_run(ips_fwd *f, ips_nfq_tx *t, uint32_t first, uint32_t count, int v6, ips_fwd_counters *c)
{
    int fd = f->nfq_raw[v6];
    int kind = v6 ? K_RAW6 : K_RAW4;
    uint32_t done = 0;
    int waited = 0;
    if (fd < 0) {
        c->tx_errors[kind] += count;
        return;
    }
    while (done < count) { /* bounded: each pass sends >= 1, skips 1, or waits once */
        int r = sendmmsg(fd, t->mm + first + done, count - done, MSG_DONTWAIT);
        c->syscalls++;
        if (r > 0) {
            for (uint32_t j = done; j < done + (uint32_t)r; j++) {
                c->packets[IPS_OUT]++;
                c->bytes[IPS_OUT] += t->len[first + j];
            }
            c->nfq_raw_sent += (uint32_t)r;
            done += (uint32_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == ENOBUFS) && !waited) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            waited = 1;
            if (poll(&pfd, 1, ROOM_WAIT_MS) > 0)
                continue;
        }
        if (r < 0 && (errno == EAGAIN || errno == ENOBUFS)) {
            c->tx_errors[kind] += count - done; /* the socket stays full: the rest is lost, TCP resends it */
            return;
        }
        c->tx_errors[kind]++; /* this one is refused (EMSGSIZE: a smaller path MTU, say): skip it */
        done++;
    }
}

void ips_nfq_tx_flush(ips_fwd *f, ips_nfq_tx *t, ips_fwd_counters *c)
{
    for (uint32_t i = 0; i < t->n; i++)
        build(t, i);
    uint32_t i = 0;
    while (i < t->n) {
        int v6 = t->arena[t->off[i]] >> 4 == 6;
        uint32_t j = i + 1;
        while (j < t->n && (t->arena[t->off[j]] >> 4 == 6) == v6)
            j++;
        send_run(f, t, i, j - i, v6, c);
        i = j;
    }
    t->n = 0;
    t->used = 0;
}

/* The transport header's offset and protocol of a packet the kernel built (no IPv6 extension headers). */
static int l4_of(const uint8_t *pkt, size_t len, size_t *off, unsigned *proto)
{
    if (len < 20)
        return -1;
    if (pkt[0] >> 4 == 4) {
        *off = (size_t)(pkt[0] & 0x0F) * 4;
        *proto = pkt[9];
        return *off >= 20 && *off <= len && (be16(pkt + 6) & 0x3FFF) == 0 ? 0 : -1;
    }
    if (pkt[0] >> 4 != 6 || len < 40)
        return -1;
    *off = 40;
    *proto = pkt[6];
    return 0;
}

ips_reason ips_csum_partial(uint8_t *pkt, size_t len)
{
    size_t off;
    unsigned proto;
    if (l4_of(pkt, len, &off, &proto) != 0)
        return IPS_R_MALFORMED;
    if (proto == 6)
        return ips_csum_complete(pkt, len, (unsigned)off, 16);
    if (proto == 17)
        return ips_csum_complete(pkt, len, (unsigned)off, 6);
    return IPS_R_MALFORMED; /* the kernel offloads only TCP and UDP checksums to a queue */
}

/* ---- the peers' MSS ------------------------------------------------------------------------- */

int ips_mss_init(ips_mss_table *t)
{
    t->slots = calloc(IPS_MSS_SLOTS, sizeof(*t->slots));
    if (t->slots == NULL || pthread_mutex_init(&t->lock, NULL) != 0) {
        free(t->slots);
        t->slots = NULL;
        return -1;
    }
    t->ready = 1;
    return 0;
}

void ips_mss_free(ips_mss_table *t)
{
    if (!t->ready)
        return;
    pthread_mutex_destroy(&t->lock);
    free(t->slots);
    t->slots = NULL;
    t->ready = 0;
}

static uint32_t slot_of(const ips_flow *k)
{
    const uint8_t *b = (const uint8_t *)k;
    uint32_t h = 2166136261u; /* FNV-1a over the key's bytes (all set: ips_flow_of zeroes the padding) */
    for (size_t i = 0; i < sizeof(*k); i++)
        h = (h ^ b[i]) * 16777619u;
    return h & (IPS_MSS_SLOTS - 1);
}

/* The MSS option of a TCP header th[0..hlen), 0 when it has none (RFC 9293 §3.1, §3.7.1). */
static unsigned mss_option(const uint8_t *th, size_t hlen)
{
    size_t i = 20;
    while (i < hlen) { /* bounded: every step advances by >= 1 */
        unsigned kind = th[i];
        if (kind == 0)
            return 0;
        if (kind == 1) {
            i++;
            continue;
        }
        if (i + 1 >= hlen || th[i + 1] < 2 || i + th[i + 1] > hlen)
            return 0;
        if (kind == 2 && th[i + 1] == 4)
            return be16(th + i + 2);
        i += th[i + 1];
    }
    return 0;
}

void ips_mss_learn(ips_mss_table *t, const uint8_t *pkt, size_t len)
{
    size_t off;
    unsigned proto;
    if (!t->ready || l4_of(pkt, len, &off, &proto) != 0 || proto != 6 || off + 20 > len || !(pkt[off + 13] & 0x02))
        return; /* not a SYN */
    size_t hlen = (size_t)(pkt[off + 12] >> 4) * 4;
    if (hlen < 20 || off + hlen > len)
        return;
    unsigned mss = mss_option(pkt + off, hlen);
    ips_flow k;
    if (mss == 0 || ips_flow_of(pkt, len, 0, &k) != 0)
        return;
    /* the key of our direction: the addresses and ports swapped */
    uint8_t a[16];
    memcpy(a, k.src, 16);
    memcpy(k.src, k.dst, 16);
    memcpy(k.dst, a, 16);
    uint16_t port = k.a;
    k.a = k.b;
    k.b = port;
    pthread_mutex_lock(&t->lock);
    ips_mss_slot *s = &t->slots[slot_of(&k)];
    s->key = k;
    s->mss = mss;
    pthread_mutex_unlock(&t->lock);
}

static unsigned peer_mss(ips_mss_table *t, const uint8_t *pkt, size_t len)
{
    ips_flow k;
    unsigned mss = 0;
    if (!t->ready || ips_flow_of(pkt, len, 0, &k) != 0)
        return 0;
    pthread_mutex_lock(&t->lock);
    const ips_mss_slot *s = &t->slots[slot_of(&k)];
    if (s->mss != 0 && memcmp(&s->key, &k, sizeof(k)) == 0)
        mss = s->mss;
    pthread_mutex_unlock(&t->lock);
    return mss;
}

uint32_t ips_gso_size(ips_mss_table *t, const ips_sa *sa, const uint8_t *pkt, size_t len, uint32_t mtu)
{
    size_t l3 = pkt[0] >> 4 == 4 ? (size_t)(pkt[0] & 0x0F) * 4 : 40;
    size_t th = (size_t)(pkt[l3 + 12] >> 4) * 4; /* (the caller checked the headers are there) */
    if (mtu == 0)
        mtu = 1280; /* no MTU known: IPv6's minimum fits every path */
    size_t seg = UNKNOWN_SA_SEGMENT;
    if (sa != NULL) {
        const ips_suite *s = sa->cipher.suite;
        size_t fixed = l3 + (sa->udp ? 8u : 0u) + 8u + (size_t)s->iv_len + (size_t)s->icv_len;
        size_t block = s->block > 0 ? (size_t)s->block : 4u;
        if (mtu <= fixed + th + MIN_SEGMENT + 2 + block)
            return MIN_SEGMENT;
        /* RFC 4303 §2.4: payload + padding + 2 is a multiple of the block and must fit what is left */
        seg = ((mtu - fixed) / block) * block - 2 - th;
    }
    unsigned peer = peer_mss(t, pkt, len);
    if (peer != 0) {
        size_t opts = th - 20;
        size_t cap = peer > opts + MIN_SEGMENT ? peer - opts : MIN_SEGMENT;
        if (cap < seg)
            seg = cap;
    }
    return seg < MIN_SEGMENT ? MIN_SEGMENT : (uint32_t)seg;
}
