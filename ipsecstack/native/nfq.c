/*
 * The NFQUEUE netlink codec (see nfq.h): walk the messages of a received datagram, write the header
 * bytes of verdicts and of the copy-range configuration (32 bytes). Pure functions on C buffers, no allocation;
 * tests/native/test_native_nfq.py drives them through _engine.nfq_parse / nfq_build_verdict on crafted
 * and random input.
 */
#include <string.h>

#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netlink.h>
#include <sys/socket.h>

#include "nfq.h"

#define NLHDR 16  /* struct nlmsghdr */
#define GENHDR 4  /* struct nfgenmsg */
#define ATTRHDR 4 /* struct nlattr */
#define ALIGN4(n) (((n) + 3u) & ~(size_t)3u)

static uint16_t h16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static uint32_t h32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void put_h16(uint8_t *p, uint16_t v)
{
    memcpy(p, &v, 2);
}

static void put_h32(uint8_t *p, uint32_t v)
{
    memcpy(p, &v, 4);
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* The attributes of a packet message, a[0..n): 0 all read, -1 one does not add up. */
static int packet_attrs(const uint8_t *a, size_t n, ips_nfq_packet *pkt, int *have_id)
{
    size_t off = 0;
    for (int guard = 0; off + ATTRHDR <= n && guard < 4096; guard++) { /* a bounded walk */
        size_t alen = h16(a + off);
        unsigned type = h16(a + off + 2) & NLA_TYPE_MASK;
        if (alen < ATTRHDR || alen > n - off)
            return -1;
        const uint8_t *v = a + off + ATTRHDR;
        size_t vlen = alen - ATTRHDR;
        switch (type) {
        case NFQA_PACKET_HDR:
            if (vlen < 7) /* struct nfqnl_msg_packet_hdr: be32 id, be16 hw_protocol, u8 hook */
                return -1;
            pkt->id = be32(v);
            pkt->hw_protocol = (uint16_t)((v[4] << 8) | v[5]);
            pkt->hook = v[6];
            *have_id = 1;
            break;
        case NFQA_PAYLOAD:
            pkt->payload = v;
            pkt->payload_len = (uint32_t)vlen;
            break;
        case NFQA_CAP_LEN:
            if (vlen < 4)
                return -1;
            pkt->cap_len = be32(v);
            break;
        case NFQA_MARK:
            if (vlen < 4)
                return -1;
            pkt->mark = be32(v);
            pkt->has_mark = 1;
            break;
        case NFQA_SKB_INFO:
            if (vlen < 4)
                return -1;
            pkt->skbinfo = be32(v);
            break;
        default:
            break; /* timestamps, interfaces, uid/gid, conntrack...: not ours */
        }
        off += ALIGN4(alen);
    }
    return off < n && n - off >= ATTRHDR ? -1 : 0;
}

ips_nfq_kind ips_nfq_next(const uint8_t *buf, size_t len, size_t *off, ips_nfq_packet *pkt, int *err)
{
    memset(pkt, 0, sizeof(*pkt));
    *err = 0;
    size_t at = *off;
    if (at >= len || len - at < NLHDR)
        return at >= len ? IPS_NFQ_END : IPS_NFQ_MALFORMED;
    const uint8_t *m = buf + at;
    size_t mlen = h32(m);
    unsigned type = h16(m + 4);
    if (mlen < NLHDR || mlen > len - at)
        return IPS_NFQ_MALFORMED;
    size_t next = at + ALIGN4(mlen);
    *off = next < len ? next : len;
    const uint8_t *body = m + NLHDR;
    size_t blen = mlen - NLHDR;
    if (type == NLMSG_ERROR) {
        if (blen < 4)
            return IPS_NFQ_MALFORMED;
        int32_t e;
        memcpy(&e, body, 4);
        int64_t mag = e < 0 ? -(int64_t)e : e;
        *err = mag > INT32_MAX ? INT32_MAX : (int)mag;
        return IPS_NFQ_ERROR;
    }
    if (type == NLMSG_NOOP || type == NLMSG_DONE || type == NLMSG_OVERRUN)
        return IPS_NFQ_OTHER;
    if (type != ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET))
        return IPS_NFQ_OTHER;
    if (blen < GENHDR)
        return IPS_NFQ_MALFORMED;
    pkt->queue_num = (uint16_t)((body[2] << 8) | body[3]);
    int have_id = 0;
    int rc = packet_attrs(body + GENHDR, blen - GENHDR, pkt, &have_id);
    if (!have_id)
        return IPS_NFQ_MALFORMED; /* nothing to name in a verdict: the kernel times it out with the queue */
    return rc == 0 ? IPS_NFQ_PACKET : IPS_NFQ_BAD_PACKET;
}

static size_t attr(uint8_t *p, unsigned type, size_t vlen)
{
    put_h16(p, (uint16_t)(ATTRHDR + vlen));
    put_h16(p + 2, (uint16_t)type);
    return ATTRHDR;
}

size_t ips_nfq_verdict_hdr(uint8_t *hdr, uint16_t queue_num, uint32_t id, uint32_t verdict, int has_mark,
                           uint32_t mark, int has_payload, size_t payload_len)
{
    if (has_payload && payload_len > IPS_NFQ_MAX_PAYLOAD)
        return 0;
    size_t n = NLHDR;
    uint8_t *g = hdr + n; /* nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id */
    g[0] = AF_UNSPEC;
    g[1] = NFNETLINK_V0;
    g[2] = (uint8_t)(queue_num >> 8);
    g[3] = (uint8_t)queue_num;
    n += GENHDR;
    n += attr(hdr + n, NFQA_VERDICT_HDR, 8);
    put_be32(hdr + n, verdict);
    put_be32(hdr + n + 4, id);
    n += 8;
    if (has_mark) {
        n += attr(hdr + n, NFQA_MARK, 4);
        put_be32(hdr + n, mark);
        n += 4;
    }
    if (has_payload)
        n += attr(hdr + n, NFQA_PAYLOAD, payload_len);
    size_t total = n + (has_payload ? payload_len : 0);
    put_h32(hdr, (uint32_t)total);
    put_h16(hdr + 4, (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT);
    put_h16(hdr + 6, NLM_F_REQUEST);
    put_h32(hdr + 8, 0);  /* sequence: no acknowledgement is asked for */
    put_h32(hdr + 12, 0); /* to the kernel */
    return n;
}

size_t ips_nfq_pad(size_t msg_len)
{
    return ALIGN4(msg_len) - msg_len;
}

/* An NFQNL_MSG_CONFIG for queue_num: the nfgenmsg after the header; the attributes start at the result. */
static size_t config_start(uint8_t *buf, uint16_t queue_num)
{
    buf[NLHDR] = AF_UNSPEC;
    buf[NLHDR + 1] = NFNETLINK_V0;
    buf[NLHDR + 2] = (uint8_t)(queue_num >> 8);
    buf[NLHDR + 3] = (uint8_t)queue_num;
    return NLHDR + GENHDR;
}

/* The netlink header of a config message of n bytes (no acknowledgement asked for); returns n. */
static size_t config_end(uint8_t *buf, size_t n)
{
    put_h32(buf, (uint32_t)n);
    put_h16(buf + 4, (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG);
    put_h16(buf + 6, NLM_F_REQUEST);
    put_h32(buf + 8, 0);
    put_h32(buf + 12, 0);
    return n;
}

size_t ips_nfq_config_flags(uint8_t *buf, uint16_t queue_num, uint32_t flags, uint32_t mask)
{
    size_t n = config_start(buf, queue_num);
    n += attr(buf + n, NFQA_CFG_MASK, 4); /* the kernel wants both, big-endian (nfqnl_recv_config) */
    put_be32(buf + n, mask);
    n += 4;
    n += attr(buf + n, NFQA_CFG_FLAGS, 4);
    put_be32(buf + n, flags & mask);
    n += 4;
    return config_end(buf, n);
}

size_t ips_nfq_config_copy(uint8_t *buf, uint16_t queue_num, uint32_t range)
{
    size_t n = config_start(buf, queue_num);
    n += attr(buf + n, NFQA_CFG_PARAMS, 5); /* struct nfqnl_msg_config_params (packed): be32 range, u8 mode */
    put_be32(buf + n, range);
    buf[n + 4] = NFQNL_COPY_PACKET;
    memset(buf + n + 5, 0, 3);
    n += 8;
    return config_end(buf, n);
}
