/*
 * TUN offloads of the forwarder (see fwd.h): the virtio_net_hdr in front of every packet of a TUN
 * opened with IFF_VNET_HDR, and what it asks for.
 *
 * Outbound (the kernel hands us a packet): with TUNSETOFFLOAD TUN_F_CSUM the kernel may leave the
 * transport checksum unfinished (VIRTIO_NET_HDR_F_NEEDS_CSUM: the field at csum_start + csum_offset
 * holds the pseudo-header sum; the ones' complement of the sum from csum_start to the end goes there);
 * with TUN_F_TSO4/TSO6 (and TUN_F_USO4/USO6) it hands over one TCP (UDP) super-packet of up to 64 KB
 * whose payload is cut into gso_size pieces. Segment i (ips_seg_write) is computed on its own from the
 * super-packet: the IP and transport headers copied, then
 *   IPv4: total length, ID + i (RFC 6864 allows any ID for atomic datagrams; the kernel's own TSO
 *         counts up too), header checksum;  IPv6: payload length;
 *   TCP:  sequence number + i * gso_size; CWR only on the first segment, FIN and PSH only on the
 *         last (what the kernel's software GSO does, tcp_gso_segment), checksum over the pseudo-header
 *         (RFC 9293 §3.1);
 *   UDP:  length and checksum (RFC 768; an IPv4 zero sum is sent as 0xFFFF).
 * Every field of the header is checked against the bytes read: a super-packet that does not parse is
 * dropped and counted (malformed), never segmented out of bounds.
 *
 * Inbound, a packet written with an all-zero header is an ordinary packet (the kernel checks its
 * checksums). Coalesced TCP (fwd_coal.c) is written with GSO_TCPV4/6 and NEEDS_CSUM.
 */
#define _GNU_SOURCE 1
#include <string.h>

#include <linux/virtio_net.h>

#include "fwd.h"

#ifndef VIRTIO_NET_HDR_GSO_UDP_L4
#define VIRTIO_NET_HDR_GSO_UDP_L4 5 /* Linux 4.18; older uapi headers lack the name */
#endif

static unsigned be16(const uint8_t *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

static void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* The ones' complement sum does not depend on byte order (RFC 1071 §2(B)): the words are summed as the
 * host loads them, 8 bytes at a time into a 64-bit accumulator (two 32-bit halves per load, so nothing
 * carries out for 2^31 loads: the chunks below fold long before), and the folded result is swapped
 * to network order once. */
static uint64_t sum_native(const uint8_t *p, size_t n)
{
    uint64_t s = 0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        uint64_t w[4];
        memcpy(w, p + i, 32);
        s += (w[0] & 0xFFFFFFFFu) + (w[0] >> 32) + (w[1] & 0xFFFFFFFFu) + (w[1] >> 32);
        s += (w[2] & 0xFFFFFFFFu) + (w[2] >> 32) + (w[3] & 0xFFFFFFFFu) + (w[3] >> 32);
    }
    for (; i + 4 <= n; i += 4) {
        uint32_t w;
        memcpy(&w, p + i, 4);
        s += w;
    }
    for (; i + 2 <= n; i += 2) {
        uint16_t w;
        memcpy(&w, p + i, 2);
        s += w;
    }
    if (i < n) { /* the last byte is the high half of a network-order word */
        uint16_t w = 0;
        memcpy(&w, p + i, 1);
        s += w;
    }
    return s;
}

static uint32_t fold64(uint64_t s)
{
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (uint32_t)s;
}

uint32_t ips_csum_add(uint32_t sum, const uint8_t *p, size_t n)
{
    uint64_t total = sum;
    while (n > 0) { /* chunks of 1 MiB: the accumulator never overflows */
        size_t k = n < (1u << 20) ? n : (1u << 20);
        uint32_t h = fold64(sum_native(p, k));
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        h = ((h & 0xFF) << 8) | (h >> 8);
#endif
        total += h;
        p += k;
        n -= k;
    }
    return fold64(total);
}

unsigned ips_csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return ~sum & 0xFFFF;
}

/* The pseudo-header sum (RFC 9293 §3.1, RFC 8200 §8.1) of an L4 segment of l4_len bytes. */
uint32_t ips_pseudo_sum(const uint8_t *ip, unsigned proto, size_t l4_len)
{
    uint32_t s;
    if (ip[0] >> 4 == 4)
        s = ips_csum_add(0, ip + 12, 8);
    else
        s = ips_csum_add(0, ip + 8, 32);
    s += proto + (uint32_t)(l4_len & 0xFFFF) + (uint32_t)(l4_len >> 16);
    return s;
}

void ips_vnet_read(const uint8_t *h, ips_vnet *v)
{
    struct virtio_net_hdr vh;
    memcpy(&vh, h, sizeof(vh)); /* native endian: a TUN without TUNSETVNETLE on a little-endian host */
    v->flags = vh.flags;
    v->gso_type = vh.gso_type;
    v->hdr_len = vh.hdr_len;
    v->gso_size = vh.gso_size;
    v->csum_start = vh.csum_start;
    v->csum_offset = vh.csum_offset;
}

void ips_vnet_write(uint8_t *h, size_t hlen, const ips_vnet *v)
{
    struct virtio_net_hdr vh = {0};
    memset(h, 0, hlen);
    if (v != NULL) {
        vh.flags = v->flags;
        vh.gso_type = v->gso_type;
        vh.hdr_len = v->hdr_len;
        vh.gso_size = v->gso_size;
        vh.csum_start = v->csum_start;
        vh.csum_offset = v->csum_offset;
    }
    memcpy(h, &vh, sizeof(vh));
}

ips_reason ips_csum_complete(uint8_t *pkt, size_t len, unsigned start, unsigned offset)
{
    if ((size_t)start + offset + 2 > len || offset % 2 != 0)
        return IPS_R_MALFORMED;
    unsigned c = ips_csum_fold(ips_csum_add(0, pkt + start, len - start));
    /* a UDP checksum (offset 6) computed as 0 is sent as all ones (RFC 768) */
    put16(pkt + start + offset, c == 0 && offset == 6 ? 0xFFFF : c);
    return IPS_OK;
}

ips_reason ips_seg_plan(const uint8_t *pkt, size_t len, const ips_vnet *v, ips_seg *s)
{
    memset(s, 0, sizeof(*s));
    unsigned type = v->gso_type & ~VIRTIO_NET_HDR_GSO_ECN;
    if (len < 20)
        return IPS_R_TRUNCATED;
    unsigned version = pkt[0] >> 4;
    size_t l3;
    unsigned proto;
    if (version == 4) {
        l3 = (size_t)(pkt[0] & 0x0F) * 4;
        if (l3 < 20 || l3 > len || be16(pkt + 2) != len || (be16(pkt + 6) & 0x3FFF) != 0)
            return IPS_R_MALFORMED;
        proto = pkt[9];
    } else if (version == 6) {
        if (len < 40 || 40 + be16(pkt + 4) != len)
            return IPS_R_MALFORMED;
        l3 = 40;
        proto = pkt[6]; /* extension headers before TCP/UDP: not segmented (the kernel does not send them) */
    } else {
        return IPS_R_BAD_IP_VERSION;
    }
    int tcp = type == VIRTIO_NET_HDR_GSO_TCPV4 || type == VIRTIO_NET_HDR_GSO_TCPV6;
    int want_v4 = type == VIRTIO_NET_HDR_GSO_TCPV4;
    if ((tcp && (proto != 6 || (version == 4) != want_v4)) || (type == VIRTIO_NET_HDR_GSO_UDP_L4 && proto != 17) ||
        (!tcp && type != VIRTIO_NET_HDR_GSO_UDP_L4))
        return IPS_R_MALFORMED;
    size_t l4h;
    if (tcp) {
        if (l3 + 20 > len)
            return IPS_R_TRUNCATED;
        l4h = (size_t)(pkt[l3 + 12] >> 4) * 4;
        if (l4h < 20 || l3 + l4h > len)
            return IPS_R_MALFORMED;
    } else {
        l4h = 8;
        if (l3 + 8 > len)
            return IPS_R_TRUNCATED;
    }
    if (v->gso_size == 0)
        return IPS_R_MALFORMED;
    s->l3 = (uint32_t)l3;
    s->hdrs = (uint32_t)(l3 + l4h);
    s->proto = (uint8_t)proto;
    s->len = len;
    ips_seg_resize(s, v->gso_size);
    return IPS_OK;
}

void ips_seg_resize(ips_seg *s, uint32_t gso)
{
    size_t payload = s->len - s->hdrs;
    s->gso = gso;
    s->count = payload == 0 ? 1 : (uint32_t)((payload + gso - 1) / gso);
}

size_t ips_seg_write(const uint8_t *pkt, const ips_seg *s, uint32_t i, uint8_t *out)
{
    size_t payload = s->len - s->hdrs;
    size_t off = (size_t)i * s->gso;
    size_t chunk = payload - off < s->gso ? payload - off : s->gso;
    size_t n = s->hdrs + chunk;
    memcpy(out, pkt, s->hdrs);
    memcpy(out + s->hdrs, pkt + s->hdrs + off, chunk);
    uint8_t *l4 = out + s->l3;
    if (out[0] >> 4 == 4) {
        put16(out + 2, (unsigned)n);
        put16(out + 4, (be16(pkt + 4) + i) & 0xFFFF);
        put16(out + 10, 0);
        put16(out + 10, ips_csum_fold(ips_csum_add(0, out, s->l3)));
    } else {
        put16(out + 4, (unsigned)(n - 40));
    }
    size_t l4len = n - s->l3;
    if (s->proto == 6) {
        uint32_t seq = ((uint32_t)l4[4] << 24) | ((uint32_t)l4[5] << 16) | ((uint32_t)l4[6] << 8) | l4[7];
        seq += (uint32_t)off;
        l4[4] = (uint8_t)(seq >> 24);
        l4[5] = (uint8_t)(seq >> 16);
        l4[6] = (uint8_t)(seq >> 8);
        l4[7] = (uint8_t)seq;
        if (i > 0)
            l4[13] &= (uint8_t)~0x80; /* CWR: the first segment only */
        if (i + 1 < s->count)
            l4[13] &= (uint8_t)~0x09; /* FIN, PSH: the last segment only */
        put16(l4 + 16, 0);
        put16(l4 + 16, ips_csum_fold(ips_csum_add(ips_pseudo_sum(out, 6, l4len), l4, l4len)));
    } else {
        put16(l4 + 4, (unsigned)l4len);
        put16(l4 + 6, 0);
        unsigned c = ips_csum_fold(ips_csum_add(ips_pseudo_sum(out, 17, l4len), l4, l4len));
        put16(l4 + 6, c == 0 ? 0xFFFF : c);
    }
    return n;
}
