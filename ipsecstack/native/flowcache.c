/*
 * Flow keys and the forwarder's two flow caches (see fwd.h for the theory of operation).
 *
 * A flow key is what RFC 4301 §4.4.1 selectors can name of a packet: IP version, source and
 * destination address, next protocol, and the ports (TCP, UDP, SCTP, UDP-Lite) or ICMP/ICMPv6 type
 * and code. Packets whose selectors cannot all be read are never cached: IPv4 fragments (MF or an
 * offset: later fragments have no ports, RFC 4301 §7) and IPv6 packets with extension headers before
 * the transport header (their walk is Python's; wire/ip.py flow_of), or a header that claims more
 * bytes than the packet has.
 *
 * A cache is a direct-mapped table of a fixed power-of-two number of slots: lookups and inserts are
 * one probe, a newer flow overwrites the slot's older one (bounded memory, no eviction lists). Each
 * slot carries the generation it was written in; flush bumps the cache's generation, which makes every
 * slot stale at once (O(1)); on the (2^32)th flush the slots are cleared for real.
 */
#define _GNU_SOURCE 1
#include <stdlib.h>
#include <string.h>

#include "fwd.h"

#define P_ICMP 1
#define P_TCP 6
#define P_UDP 17
#define P_ICMPV6 58
#define P_SCTP 132
#define P_UDPLITE 136

static int has_ports(unsigned proto)
{
    return proto == P_TCP || proto == P_UDP || proto == P_SCTP || proto == P_UDPLITE;
}

/* IPv6 next-header values that are extension headers (RFC 8200 §4, RFC 7045 §2) */
static int v6_ext(unsigned nh)
{
    return nh == 0 || nh == 43 || nh == 44 || nh == 51 || nh == 60 || nh == 135 || nh == 139 || nh == 140 ||
           nh == 253 || nh == 254;
}

static int l4_fields(const uint8_t *l4, size_t room, unsigned proto, ips_flow *k)
{
    if (has_ports(proto)) {
        if (room < 4)
            return -1;
        k->a = (uint16_t)((l4[0] << 8) | l4[1]);
        k->b = (uint16_t)((l4[2] << 8) | l4[3]);
    } else if (proto == P_ICMP || proto == P_ICMPV6) {
        if (room < 2)
            return -1;
        k->a = l4[0];
        k->b = l4[1];
    }
    return 0;
}

int ips_flow_of(const uint8_t *pkt, size_t len, uint32_t spi, ips_flow *k)
{
    memset(k, 0, sizeof(*k));
    k->spi = spi;
    if (len < 20)
        return -1;
    unsigned version = pkt[0] >> 4;
    if (version == 4) {
        size_t ihl = (size_t)(pkt[0] & 0x0F) * 4;
        size_t total = ((size_t)pkt[2] << 8) | pkt[3];
        if (ihl < 20 || total < ihl || total > len)
            return -1;
        if (((pkt[6] << 8) | pkt[7]) & 0x3FFF)
            return -1; /* a fragment */
        k->version = 4;
        k->proto = pkt[9];
        memcpy(k->src, pkt + 12, 4);
        memcpy(k->dst, pkt + 16, 4);
        return l4_fields(pkt + ihl, total - ihl, k->proto, k);
    }
    if (version != 6 || len < 40)
        return -1;
    size_t total = 40 + (((size_t)pkt[4] << 8) | pkt[5]);
    if (total > len || v6_ext(pkt[6]))
        return -1;
    k->version = 6;
    k->proto = pkt[6];
    memcpy(k->src, pkt + 8, 16);
    memcpy(k->dst, pkt + 24, 16);
    return l4_fields(pkt + 40, total - 40, k->proto, k);
}

static uint32_t hash_flow(const ips_flow *k)
{
    uint64_t w[sizeof(ips_flow) / 8 + 1] = {0};
    memcpy(w, k, sizeof(*k));
    uint64_t h = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < sizeof(w) / 8; i++) {
        h ^= w[i];
        h *= 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
    }
    return (uint32_t)(h ^ (h >> 32));
}

int ips_fc_init(ips_flowcache *c, uint32_t size)
{
    memset(c, 0, sizeof(*c));
    c->slots = calloc(size, sizeof(ips_fc_entry));
    if (c->slots == NULL)
        return -1;
    if (pthread_mutex_init(&c->lock, NULL) != 0) {
        free(c->slots);
        c->slots = NULL;
        return -1;
    }
    c->mask = size - 1;
    c->gen = 1; /* calloc'd slots (generation 0) are all stale */
    c->ready = 1;
    return 0;
}

void ips_fc_free(ips_flowcache *c)
{
    if (!c->ready)
        return;
    pthread_mutex_destroy(&c->lock);
    free(c->slots);
    c->slots = NULL;
    c->ready = 0;
}

int ips_fc_lookup_aux(ips_flowcache *c, const ips_flow *k, uint32_t *value, uint32_t *aux)
{
    const ips_fc_entry *e = &c->slots[hash_flow(k) & c->mask];
    if (e->gen == c->gen && memcmp(&e->key, k, sizeof(*k)) == 0) {
        *value = e->value;
        *aux = e->aux;
        c->hits++;
        return 1;
    }
    c->misses++;
    return 0;
}

int ips_fc_lookup(ips_flowcache *c, const ips_flow *k, uint32_t *value)
{
    uint32_t aux;
    return ips_fc_lookup_aux(c, k, value, &aux);
}

void ips_fc_insert(ips_flowcache *c, const ips_flow *k, uint32_t value, uint32_t aux)
{
    ips_fc_entry *e = &c->slots[hash_flow(k) & c->mask];
    if (e->gen != c->gen)
        c->entries++;
    e->key = *k;
    e->value = value;
    e->aux = aux;
    e->gen = c->gen;
}

void ips_fc_flush(ips_flowcache *c)
{
    if (++c->gen == 0) {
        memset(c->slots, 0, ((size_t)c->mask + 1) * sizeof(ips_fc_entry));
        c->gen = 1;
    }
    c->entries = 0;
}
