/*
 * ESP protect/unprotect of one whole IP packet (RFC 4303), with UDP encapsulation (RFC 3948):
 * the twin of ipsecstack/xform/esp.py, xform/mode.py and wire/outer.py, check for check and in the same
 * order, so both engines refuse a packet for the same reason and produce the same bytes.
 *
 * Outbound (RFC 4303 §3.3): find what to carry (tunnel mode: the whole inner packet, whose length
 * must match its header; transport mode: the upper-layer payload after the IPv4 header or, over
 * IPv6, after hop-by-hop, routing and fragment headers, §3.1.1), take the next sequence number,
 * lay out payload || padding 1, 2, 3, ... || pad length || next header (§2.4) behind the ESP
 * header, seal it in place, then write the headers in front: a fresh outer header in tunnel mode
 * (RFC 4301 §5.1.2: the SA's TTL, DSCP copied unless disabled, ECN per RFC 6040 §4.1, DF copied or
 * forced per RFC 4301 §8.1, IPv4 identification = low 16 bits of the sequence number) or the
 * original header with protocol, length and checksum rewritten; a UDP header in between when the
 * SA is UDP-encapsulated (zero checksum over IPv4, RFC 3948 §2.1; a real one over IPv6).
 *
 * Inbound (§3.4): locate the ESP header (walking IPv6 extension headers, §3.1.1; fragments are
 * refused, §3.4.1), check the encapsulation matches the SA, infer the ESN high half, check the
 * replay window, verify the ICV and decrypt, *then* update the window (§3.4.3), then check the
 * padding and next header. Next header 59 is a dummy packet (§2.6). Tunnel mode trims TFC padding
 * by the inner header's length (§2.4) and applies RFC 6040 §4.2 to the inner ECN field; transport
 * mode rebuilds the header and, after NAT-T, recomputes TCP/UDP checksums (RFC 3948 §3.1.2).
 */
#include <string.h>

#include "engine.h"

#define PROTO_IPIP 4
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_IPV6 41
#define PROTO_ESP 50
#define PROTO_NONE 59

static inline unsigned be16(const uint8_t *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

static inline void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void put32(uint8_t *p, uint32_t v)
{
    put16(p, v >> 16);
    put16(p + 2, v & 0xFFFF);
}

/* RFC 1071: one's complement sum of 16-bit words (an odd last byte is padded with zero) */
static uint64_t sum16(const uint8_t *p, size_t n, uint64_t acc)
{
    for (; n >= 2; p += 2, n -= 2)
        acc += be16(p);
    if (n)
        acc += (uint64_t)p[0] << 8;
    return acc;
}

static unsigned checksum(const uint8_t *p, size_t n, uint64_t initial)
{
    uint64_t s = sum16(p, n, initial);
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (unsigned)(~s & 0xFFFF);
}

/* The pseudo-header contribution of RFC 768 / RFC 8200 §8.1 (unfolded) */
static uint64_t pseudo_sum(int version, const uint8_t *ip_hdr, unsigned proto, size_t length)
{
    const uint8_t *addrs = version == 4 ? ip_hdr + 12 : ip_hdr + 8;
    size_t alen = version == 4 ? 8 : 32;
    return sum16(addrs, alen, proto + (uint64_t)length);
}

static int is_v6_ext(unsigned nh)
{
    return nh == 0 || nh == 43 || nh == 44 || nh == 60; /* hop-by-hop, routing, fragment, dest. options */
}

/* Walk IPv6 extension headers up to `stop` (mode.py _ipv6_walk). */
static ips_reason v6_walk(const uint8_t *pkt, size_t stop, size_t *off_out, size_t *nh_field_out, int *frag)
{
    size_t nh_field = 6, off = 40;
    unsigned nh = pkt[6];
    *frag = 0;
    while (is_v6_ext(nh) && off < stop) {
        if (off + 8 > stop)
            return IPS_R_TRUNCATED;
        size_t ext = 8;
        if (nh == 44)
            *frag = 1;
        else
            ext = ((size_t)pkt[off + 1] + 1) * 8;
        nh_field = off;
        nh = pkt[off];
        off += ext;
    }
    if (off > stop)
        return IPS_R_TRUNCATED;
    *off_out = off;
    *nh_field_out = nh_field;
    return IPS_OK;
}

/* Where ESP goes in an IPv6 packet of `n` bytes in transport mode (RFC 4303 §3.1.1; wire/ip.py
 * ipv6_transport_split): after hop-by-hop, routing and fragment headers, and after destination
 * options only when a routing header follows them. */
static ips_reason v6_transport_split(const uint8_t *pkt, size_t n, size_t *off_out, size_t *nh_field_out)
{
    size_t nh_field = 6, off = 40;
    unsigned nh = pkt[6];
    for (;;) {
        if (nh == 60) {
            if (off + 2 > n || pkt[off] != 43)
                break;
        } else if (nh != 0 && nh != 43 && nh != 44) {
            break;
        }
        if (off + 8 > n)
            return IPS_R_TRUNCATED;
        size_t ext = nh == 44 ? 8 : ((size_t)pkt[off + 1] + 1) * 8;
        nh_field = off;
        nh = pkt[off];
        off += ext;
        if (off > n)
            return IPS_R_TRUNCATED;
    }
    *off_out = off;
    *nh_field_out = nh_field;
    return IPS_OK;
}

typedef struct {
    int version;
    size_t off, nh_field, end;
} ips_parsed;

/* wire/outer.py parse_outer: the IPsec payload of a packet (inbound) or where it goes (outbound). */
static ips_reason parse_ip(const uint8_t *pkt, size_t orig, int inbound, ips_parsed *p)
{
    if (orig < 20)
        return IPS_R_TRUNCATED;
    p->version = pkt[0] >> 4;
    if (p->version == 4) {
        size_t ihl = (size_t)(pkt[0] & 0x0F) * 4;
        p->end = be16(pkt + 2);
        if (ihl < 20 || p->end < ihl || p->end > orig)
            return IPS_R_MALFORMED;
        if (be16(pkt + 6) & 0x3FFF) /* MF or an offset: IPsec needs the reassembled datagram */
            return IPS_R_FRAGMENT;
        p->off = ihl;
        p->nh_field = 9;
        return IPS_OK;
    }
    if (p->version != 6)
        return IPS_R_BAD_IP_VERSION;
    if (orig < 40)
        return IPS_R_TRUNCATED;
    p->end = 40 + (size_t)be16(pkt + 4);
    if (p->end > orig)
        return IPS_R_MALFORMED;
    int frag;
    ips_reason r;
    if (inbound) {
        r = v6_walk(pkt, p->end, &p->off, &p->nh_field, &frag);
    } else {
        size_t unused_off, unused_field;
        r = v6_transport_split(pkt, p->end, &p->off, &p->nh_field);
        if (r == IPS_OK)
            r = v6_walk(pkt, p->off, &unused_off, &unused_field, &frag);
    }
    if (r != IPS_OK)
        return r;
    return frag ? IPS_R_FRAGMENT : IPS_OK;
}

/* ---- outbound ------------------------------------------------------------------------------- */

/* Tunnel mode carries the whole inner packet, whose length must be the one its header claims. */
static ips_reason tunnel_payload(const uint8_t *pkt, size_t orig, ips_parsed *p, unsigned *nh)
{
    int version = orig ? pkt[0] >> 4 : 0;
    int ok;
    if (version == 4) {
        *nh = PROTO_IPIP;
        ok = orig >= 20 && be16(pkt + 2) == orig;
    } else if (version == 6) {
        *nh = PROTO_IPV6;
        ok = orig >= 40 && 40 + (size_t)be16(pkt + 4) == orig;
    } else {
        return IPS_R_BAD_IP_VERSION;
    }
    if (!ok)
        return IPS_R_MALFORMED;
    p->version = version;
    p->off = 0;
    p->nh_field = 0;
    p->end = orig; /* at most IPS_MAX_DATAGRAM, so all of it was copied */
    return IPS_OK;
}

/* The tunnel-mode outer header (mode.py outer_header) for `payload_len` bytes after it. */
static void outer_header(const ips_sa *sa, const uint8_t *inner, uint8_t *out, size_t payload_len, uint64_t seq)
{
    unsigned tos, flags;
    if (inner[0] >> 4 == 4) {
        tos = inner[1] & sa->tos_mask;
        flags = sa->df_flags < 0 ? (unsigned)(inner[6] & 0x40) << 8 : (unsigned)sa->df_flags;
    } else {
        tos = (((inner[0] & 0x0Fu) << 4) | (inner[1] >> 4)) & sa->tos_mask;
        flags = sa->df_flags < 0 ? 0x4000u : (unsigned)sa->df_flags;
    }
    unsigned proto = sa->udp ? PROTO_UDP : PROTO_ESP;
    if (sa->outer_version == 4) {
        out[0] = 0x45;
        out[1] = (uint8_t)tos;
        put16(out + 2, (unsigned)(20 + payload_len));
        put16(out + 4, (unsigned)(seq & 0xFFFF)); /* atomic datagram: any ID will do (RFC 6864) */
        put16(out + 6, flags);
        out[8] = sa->ttl;
        out[9] = (uint8_t)proto;
        put16(out + 10, 0);
        memcpy(out + 12, sa->outer_src, 4);
        memcpy(out + 16, sa->outer_dst, 4);
        put16(out + 10, checksum(out, 20, 0));
    } else {
        put32(out, 0x60000000u | (tos << 20));
        put16(out + 4, (unsigned)payload_len);
        out[6] = (uint8_t)proto;
        out[7] = sa->ttl;
        memcpy(out + 8, sa->outer_src, 16);
        memcpy(out + 24, sa->outer_dst, 16);
    }
}

/* mode.py transport_header: the original header (`off` bytes) with protocol and lengths rewritten
 * for `payload_len` bytes following it. Written to `out`, which may be `pkt` itself. */
static void transport_header(const uint8_t *pkt, const ips_parsed *p, uint8_t *out, size_t payload_len,
                             unsigned proto)
{
    if (out != pkt)
        memmove(out, pkt, p->off);
    out[p->nh_field] = (uint8_t)proto;
    if (p->version == 4) {
        put16(out + 2, (unsigned)(p->off + payload_len));
        put16(out + 10, 0);
        put16(out + 10, checksum(out, p->off, 0));
    } else {
        put16(out + 4, (unsigned)(p->off - 40 + payload_len));
    }
}

/* The largest value each IP length field can hold, for `ip_payload` bytes after the header. */
static int fits(const ips_sa *sa, const ips_parsed *p, size_t ip_payload)
{
    if (sa->tunnel)
        return sa->outer_version == 4 ? 20 + ip_payload <= 0xFFFF : ip_payload <= 0xFFFF;
    return p->version == 4 ? p->off + ip_payload <= 0xFFFF : p->off - 40 + ip_payload <= 0xFFFF;
}

static void udp_header(const ips_sa *sa, uint8_t *out, const uint8_t *ip_hdr, int version, size_t esp_len)
{
    uint8_t *udp = out;
    put16(udp, sa->sport);
    put16(udp + 2, sa->dport);
    put16(udp + 4, (unsigned)(8 + esp_len));
    put16(udp + 6, 0); /* RFC 3948 §2.1: zero over IPv4 */
    if (version == 6) {
        unsigned c = checksum(udp, 8 + esp_len, pseudo_sum(6, ip_hdr, PROTO_UDP, 8 + esp_len));
        put16(udp + 6, c ? c : 0xFFFF);
    }
}

ips_reason ips_protect(ips_sa *sa, const uint8_t *pkt, size_t len, size_t orig, uint8_t *out, size_t cap,
                       size_t *out_len, const uint8_t *rand16)
{
    const ips_suite *s = sa->cipher.suite;
    ips_parsed p;
    unsigned nh;
    ips_reason r;
    (void)len; /* every read below stays within p.end <= len */
    if (sa->tunnel) {
        r = tunnel_payload(pkt, orig, &p, &nh);
    } else {
        r = parse_ip(pkt, orig, 0, &p);
        nh = r == IPS_OK ? pkt[p.nh_field] : 0;
    }
    if (r != IPS_OK)
        return r;
    size_t payload = p.end - p.off;
    size_t pad = (size_t)((s->block - (int)((payload + 2) % (size_t)s->block)) % s->block);
    size_t pt_len = payload + pad + 2;
    size_t esp_len = 8 + (size_t)s->iv_len + pt_len + (size_t)s->icv_len;
    size_t ip_payload = esp_len + (sa->udp ? 8 : 0);
    size_t hdr_len = sa->tunnel ? (sa->outer_version == 4 ? 20 : 40) : p.off;
    if (!fits(sa, &p, ip_payload) || hdr_len + ip_payload > cap)
        return IPS_R_BAD_LENGTH;
    uint64_t seq;
    r = ips_sa_next_seq(sa, &seq);
    if (r != IPS_OK)
        return r;
    uint8_t *esp = out + hdr_len + (sa->udp ? 8 : 0);
    uint8_t *pt = esp + 8 + s->iv_len;
    put32(esp, sa->spi);
    put32(esp + 4, (uint32_t)seq);
    memcpy(pt, pkt + p.off, payload);
    for (size_t i = 0; i < pad; i++)
        pt[payload + i] = (uint8_t)(i + 1);
    pt[payload + pad] = (uint8_t)pad;
    pt[payload + pad + 1] = (uint8_t)nh;
    uint8_t hi[4];
    put32(hi, (uint32_t)(seq >> 32));
    ips_sa_charge(sa, orig);
    if (ips_seal(&sa->cipher, esp, pt_len, seq, sa->esn ? hi : NULL, rand16) != 0)
        return IPS_R_CRYPTO_ERROR;
    if (sa->tunnel)
        outer_header(sa, pkt, out, ip_payload, seq);
    else
        transport_header(pkt, &p, out, ip_payload, sa->udp ? PROTO_UDP : PROTO_ESP);
    if (sa->udp)
        udp_header(sa, out + hdr_len, out, sa->tunnel ? sa->outer_version : p.version, esp_len);
    *out_len = hdr_len + ip_payload;
    return IPS_OK;
}

/* ---- inbound -------------------------------------------------------------------------------- */

/* esp.py locate + the datapath's header check: where the ESP header is, and its SPI. */
ips_reason ips_locate(const uint8_t *pkt, size_t len, size_t orig, ips_located *loc)
{
    ips_parsed p;
    (void)len;
    ips_reason r = parse_ip(pkt, orig, 1, &p);
    if (r != IPS_OK)
        return r;
    unsigned proto = pkt[p.nh_field];
    loc->version = (uint8_t)p.version;
    loc->off = p.off;
    loc->nh_field = p.nh_field;
    loc->end = p.end;
    if (proto == PROTO_ESP) {
        loc->udp = 0;
    } else if (proto == PROTO_UDP) {
        /* RFC 3948 §2: keepalive (one 0xFF byte), IKE (non-ESP marker) or ESP on the UDP port */
        if (p.end - p.off < 8)
            return IPS_R_TRUNCATED;
        const uint8_t *body = pkt + p.off + 8;
        size_t n = p.end - p.off - 8;
        if (n == 1 && body[0] == 0xFF)
            return IPS_R_NAT_KEEPALIVE;
        if (n >= 4 && body[0] == 0 && body[1] == 0 && body[2] == 0 && body[3] == 0)
            return IPS_R_MALFORMED; /* an IKE message: not ESP's to handle */
        if (n < 8)
            return IPS_R_TRUNCATED;
        loc->udp = 1;
    } else {
        return IPS_R_MALFORMED;
    }
    loc->esp_off = p.off + (loc->udp ? 8 : 0);
    if (p.end - loc->esp_off < 8)
        return IPS_R_TRUNCATED;
    const uint8_t *h = pkt + loc->esp_off;
    loc->spi = ((uint32_t)be16(h) << 16) | be16(h + 2);
    return IPS_OK;
}

/* mode.py tunnel_inner: the inner packet's length, TFC padding (RFC 4303 §2.4) trimmed. */
static ips_reason tunnel_inner(const uint8_t *buf, size_t plen, unsigned nh, size_t *length)
{
    size_t minimum;
    int ok;
    if (nh == PROTO_IPIP) {
        minimum = 20;
        ok = plen >= 20 && buf[0] >> 4 == 4;
        *length = ok ? be16(buf + 2) : 0;
    } else if (nh == PROTO_IPV6) {
        minimum = 40;
        ok = plen >= 40 && buf[0] >> 4 == 6;
        *length = ok ? 40 + (size_t)be16(buf + 4) : 0;
    } else {
        return IPS_R_BAD_NEXT_HEADER;
    }
    if (!ok)
        return IPS_R_MALFORMED;
    if (*length > plen || *length < minimum)
        return IPS_R_BAD_LENGTH;
    return IPS_OK;
}

static unsigned traffic_class(const uint8_t *pkt)
{
    if (pkt[0] >> 4 == 4)
        return pkt[1];
    return ((pkt[0] & 0x0Fu) << 4) | (pkt[1] >> 4);
}

/* wire/ip.py set_traffic_class on an inner packet of `len` bytes (IPv4 checksum updated) */
static void set_traffic_class(uint8_t *pkt, size_t len, unsigned tc)
{
    if (pkt[0] >> 4 == 4) {
        if (pkt[1] == tc)
            return;
        pkt[1] = (uint8_t)tc;
        size_t ihl = (size_t)(pkt[0] & 0x0F) * 4;
        put16(pkt + 10, 0);
        put16(pkt + 10, checksum(pkt, ihl < len ? ihl : len, 0));
    } else {
        pkt[0] = (uint8_t)(0x60 | (tc >> 4));
        pkt[1] = (uint8_t)(((tc & 0x0F) << 4) | (pkt[1] & 0x0F));
    }
}

/* RFC 6040 §4.2: the inner ECN field given the outer one (outer ECN is not Not-ECT here). */
static ips_reason ecn_decapsulate(unsigned outer_tc, uint8_t *inner, size_t len)
{
    unsigned o = outer_tc & 3, tc = traffic_class(inner), i = tc & 3, ecn;
    if (o == 0)
        return IPS_OK;
    if (i == 0)
        return o == 3 ? IPS_R_ECN_DROP : IPS_OK; /* outer CE on a Not-ECT inner packet */
    if (o == 3 && i != 3)
        ecn = 3;
    else if (o == 1 && i == 2)
        ecn = 1;
    else
        return IPS_OK;
    set_traffic_class(inner, len, (tc & 0xFC) | ecn);
    return IPS_OK;
}

/* mode.py fix_l4_checksum (RFC 3948 §3.1.2): after NAT-T transport-mode decapsulation the TCP/UDP
 * checksum is recomputed over the addresses the packet now carries. */
static void fix_l4_checksum(uint8_t *pkt, size_t len, int version, size_t off, unsigned proto)
{
    size_t at;
    if (proto == PROTO_TCP) {
        at = off + 16;
    } else {
        at = off + 6;
        if (version == 4 && len >= off + 8 && pkt[at] == 0 && pkt[at + 1] == 0)
            return; /* IPv4 UDP without checksum stays without one */
    }
    if (len < at + 2)
        return;
    put16(pkt + at, 0);
    unsigned c = checksum(pkt + off, len - off, pseudo_sum(version, pkt, proto, len - off));
    if (proto == PROTO_UDP && c == 0)
        c = 0xFFFF;
    put16(pkt + at, c);
}

/* Trailer (RFC 4303 §2.4): pad length and next header at the end, padding 1, 2, 3, ... */
static ips_reason check_trailer(const uint8_t *pt, size_t n, size_t *plen, unsigned *nh)
{
    size_t padlen = pt[n - 2];
    *nh = pt[n - 1];
    if (padlen + 2 > n)
        return IPS_R_BAD_PADDING;
    for (size_t i = 0; i < padlen; i++)
        if (pt[n - 2 - padlen + i] != (uint8_t)(i + 1))
            return IPS_R_BAD_PADDING;
    *plen = n - 2 - padlen;
    return IPS_OK;
}

/* The SA's checks before the ICV: encapsulation, liveness, ESN inference, replay window. */
static ips_reason pre_icv(ips_sa *sa, const uint8_t *esp, const ips_located *loc, uint64_t *seq, uint8_t hi[4])
{
    if (loc->udp != sa->udp)
        return IPS_R_ENCAP_MISMATCH;
    if (sa->dead)
        return IPS_R_SA_EXPIRED;
    uint32_t low = ((uint32_t)be16(esp + 4) << 16) | be16(esp + 6);
    if (sa->esn) {
        if (ips_replay_infer(&sa->replay, low, seq) != 0)
            return IPS_R_TOO_OLD;
    } else {
        *seq = low;
    }
    put32(hi, (uint32_t)(*seq >> 32));
    return ips_replay_check(&sa->replay, *seq);
}

ips_reason ips_unprotect(ips_sa *sa, const uint8_t *pkt, const ips_located *loc, uint8_t *out, size_t cap,
                         size_t *out_len)
{
    const uint8_t *esp = pkt + loc->esp_off;
    size_t body_len = loc->end - loc->esp_off - 8;
    uint64_t seq;
    uint8_t hi[4];
    ips_reason r = pre_icv(sa, esp, loc, &seq, hi);
    if (r != IPS_OK)
        return r;
    /* transport mode puts the original header (off bytes) in front of the payload */
    size_t at = sa->tunnel ? 0 : loc->off;
    if (at + body_len > cap)
        return IPS_R_BAD_LENGTH; /* cannot happen: off + 8 + body_len = end <= cap */
    size_t n;
    r = ips_open(&sa->cipher, esp, body_len, sa->esn ? hi : NULL, out + at, &n);
    if (r != IPS_OK)
        return r;
    ips_replay_update(&sa->replay, seq); /* RFC 4303 §3.4.3: only after the ICV verified */
    size_t plen;
    unsigned nh;
    r = check_trailer(out + at, n, &plen, &nh);
    if (r != IPS_OK)
        return r;
    ips_sa_charge(sa, plen);
    ips_sa_note_seen(sa); /* a dummy packet (below) is still the peer's */
    if (nh == PROTO_NONE)
        return IPS_R_DUMMY; /* RFC 4303 §2.6 */
    if (sa->tunnel) {
        size_t length;
        r = tunnel_inner(out, plen, nh, &length);
        if (r != IPS_OK)
            return r;
        unsigned outer_ecn = loc->version == 4 ? pkt[1] & 3 : pkt[1] & 0x30;
        if (outer_ecn && (r = ecn_decapsulate(traffic_class(pkt), out, length)) != IPS_OK)
            return r;
        *out_len = length;
        return IPS_OK;
    }
    ips_parsed p = {loc->version, loc->off, loc->nh_field, loc->end};
    transport_header(pkt, &p, out, plen, nh);
    if (loc->udp && (nh == PROTO_TCP || nh == PROTO_UDP))
        fix_l4_checksum(out, loc->off + plen, loc->version, loc->off, nh);
    *out_len = loc->off + plen;
    return IPS_OK;
}
