/*
 * The native SA: sequence numbers, lifetimes and events (the twin of ipsecstack/sa.py).
 *
 * Sequence numbers (RFC 4303 §3.3.3): the first packet is 1 and the counter never wraps; past
 * 2^32 - 1 (2^64 - 1 with ESN) the SA refuses to send (seq_exhausted). A soft event with trigger
 * "seq" fires 2^20 packets before that, so the key manager rekeys in time.
 *
 * Lifetimes (RFC 4301 §4.4.2.1): soft and hard limits in bytes and packets, charged per packet
 * (outbound: the length of the packet given to protect; inbound: the decrypted payload length, as
 * the Python engine charges). next_bytes/next_packets hold the nearest limit still to fire, so a
 * packet costs two compares. Crossing a soft limit fires one soft event; crossing a hard limit
 * marks the SA dead (it refuses everything from then on: sa_expired) and fires a hard event. Time
 * limits stay with the Python owner, which has the clock: it calls expire (trigger "seconds").
 *
 * Events go to the engine's queue, a ring of fixed capacity: an SA fires at most one soft and one
 * hard event in its life, and a full queue counts what it could not hold instead of growing.
 *
 * "Seen" (for the IKE core's liveness checks, RFC 7296 §2.4, and the §2.8 hold-back of a rekey's new
 * outbound SA): the first packet an inbound SA accepts raises one IPS_EV_SEEN and sets `seen`; later
 * packets cost one relaxed load until the owner re-arms the SA (rearm_seen), which it does at its own
 * pace. So an SA raises at most one event per re-arm however fast it receives, and the owner learns of
 * traffic without reading every SA's counters. Seen events may fill only half the ring (the rest stays
 * for lifetime events, which must not be lost); one that finds no room leaves the flag clear, so a later
 * packet tries again.
 */
#include <stdlib.h>
#include <string.h>

#include "engine.h"

#define SEQ_SOFT_MARGIN (1ull << 20)

int ips_events_init(ips_events *q, uint32_t cap)
{
    memset(q, 0, sizeof(*q));
    q->ring = calloc(cap, sizeof(ips_event));
    if (q->ring == NULL)
        return -1;
    q->cap = cap;
    if (pthread_mutex_init(&q->lock, NULL) != 0) {
        free(q->ring);
        q->ring = NULL;
        return -1;
    }
    return 0;
}

void ips_events_free(ips_events *q)
{
    if (q->ring == NULL)
        return;
    pthread_mutex_destroy(&q->lock);
    free(q->ring);
    q->ring = NULL;
}

int ips_events_push(ips_events *q, uint32_t spi, uint8_t dir, ips_event_kind kind, ips_trigger trigger)
{
    int r = 0;
    pthread_mutex_lock(&q->lock);
    if (kind == IPS_EV_SEEN && q->count >= q->cap / 2) {
        r = -1; /* half the ring stays for lifetime events; the SA's next packet tries again */
    } else if (q->count == q->cap) {
        q->lost++;
        r = -1;
    } else {
        ips_event *e = &q->ring[(q->head + q->count) % q->cap];
        e->spi = spi;
        e->dir = dir;
        e->kind = (uint8_t)kind;
        e->trigger = (uint8_t)trigger;
        q->count++;
    }
    pthread_mutex_unlock(&q->lock);
    return r;
}

/* Move up to `max` events, oldest first, into `out`. */
uint32_t ips_events_take(ips_events *q, ips_event *out, uint32_t max)
{
    pthread_mutex_lock(&q->lock);
    uint32_t n = q->count < max ? q->count : max;
    for (uint32_t i = 0; i < n; i++)
        out[i] = q->ring[(q->head + i) % q->cap];
    q->head = (q->head + n) % q->cap;
    q->count -= n;
    pthread_mutex_unlock(&q->lock);
    return n;
}

/* Events dropped because the queue was full, since the engine began. */
uint64_t ips_events_lost(ips_events *q)
{
    pthread_mutex_lock(&q->lock);
    uint64_t lost = q->lost;
    pthread_mutex_unlock(&q->lock);
    return lost;
}

/* Events waiting to be taken. */
uint32_t ips_events_pending(ips_events *q)
{
    pthread_mutex_lock(&q->lock);
    uint32_t n = q->count;
    pthread_mutex_unlock(&q->lock);
    return n;
}

static uint64_t min_limit(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

static void arm_limits(ips_sa *sa)
{
    sa->next_packets = min_limit(sa->soft_fired ? IPS_NO_LIMIT : sa->soft.packets, sa->hard.packets);
    sa->next_bytes = min_limit(sa->soft_fired ? IPS_NO_LIMIT : sa->soft.bytes, sa->hard.bytes);
}

ips_sa *ips_sa_new(const ips_sa_params *p, const ips_suite *s, const uint8_t *key, ips_events *events,
                   const char **why)
{
    ips_sa *sa = calloc(1, sizeof(*sa));
    if (sa == NULL) {
        *why = "out of memory";
        return NULL;
    }
    sa->spi = p->spi;
    sa->dir = p->dir;
    sa->tunnel = p->tunnel;
    sa->esn = p->esn;
    sa->udp = p->udp;
    sa->sport = p->sport;
    sa->dport = p->dport;
    sa->outer_version = p->tunnel ? p->outer_version : 0;
    memcpy(sa->outer_src, p->outer_src, 16);
    memcpy(sa->outer_dst, p->outer_dst, 16);
    sa->ttl = p->ttl;
    /* RFC 4301 §5.1.2.1 / RFC 6040 §4.1: which bits of the inner DS byte reach the outer header */
    sa->tos_mask = (uint8_t)((p->copy_dscp ? 0xFC : 0) | (p->ecn_normal ? 0x03 : 0));
    sa->df_flags = p->df_flags;
    sa->seq = p->seq;
    sa->seq_max = p->esn ? UINT64_MAX : 0xFFFFFFFFull;
    sa->seq_soft = sa->seq_max - SEQ_SOFT_MARGIN;
    sa->soft = p->soft;
    sa->hard = p->hard;
    sa->events = events;
    arm_limits(sa);
    if (ips_replay_init(&sa->replay, p->replay_window, p->replay_top) != 0) {
        *why = "out of memory";
        free(sa);
        return NULL;
    }
    if (ips_cipher_init(&sa->cipher, s, key, p->dir == IPS_OUT, why) != 0) {
        ips_replay_free(&sa->replay);
        free(sa);
        return NULL;
    }
    if (pthread_mutex_init(&sa->lock, NULL) != 0) {
        *why = "cannot create the SA's mutex";
        ips_cipher_free(&sa->cipher);
        ips_replay_free(&sa->replay);
        free(sa);
        return NULL;
    }
    return sa;
}

void ips_sa_free(ips_sa *sa)
{
    if (sa == NULL)
        return;
    pthread_mutex_destroy(&sa->lock);
    ips_cipher_free(&sa->cipher);
    ips_replay_free(&sa->replay);
    free(sa);
}

/* RFC 4303 §3.3.3: allocate the next outbound sequence number; it never wraps. */
ips_reason ips_sa_next_seq(ips_sa *sa, uint64_t *seq)
{
    if (sa->dead)
        return IPS_R_SA_EXPIRED;
    if (sa->seq >= sa->seq_max)
        return IPS_R_SEQ_EXHAUSTED;
    *seq = ++sa->seq;
    if (*seq == sa->seq_soft)
        ips_sa_expire_soft(sa, IPS_TRIG_SEQ);
    return IPS_OK;
}

void ips_sa_expire_soft(ips_sa *sa, ips_trigger trigger)
{
    if (sa->soft_fired || sa->dead)
        return;
    sa->soft_fired = 1;
    arm_limits(sa);
    (void)ips_events_push(sa->events, sa->spi, sa->dir, IPS_EV_SOFT, trigger);
}

void ips_sa_expire_hard(ips_sa *sa, ips_trigger trigger)
{
    if (sa->dead)
        return;
    sa->dead = 1;
    sa->next_packets = sa->next_bytes = IPS_NO_LIMIT;
    (void)ips_events_push(sa->events, sa->spi, sa->dir, IPS_EV_HARD, trigger);
}

void ips_sa_note_seen(ips_sa *sa)
{
    if (__atomic_load_n(&sa->seen, __ATOMIC_RELAXED))
        return;
    __atomic_store_n(&sa->seen, 1, __ATOMIC_RELAXED);
    if (ips_events_push(sa->events, sa->spi, sa->dir, IPS_EV_SEEN, IPS_TRIG_PACKETS) != 0)
        __atomic_store_n(&sa->seen, 0, __ATOMIC_RELAXED);
}

void ips_sa_rearm_seen(ips_sa *sa)
{
    __atomic_store_n(&sa->seen, 0, __ATOMIC_RELAXED);
}

static void limits_crossed(ips_sa *sa)
{
    int hard_p = sa->hard.packets != IPS_NO_LIMIT && sa->packets >= sa->hard.packets;
    int hard_b = sa->hard.bytes != IPS_NO_LIMIT && sa->bytes >= sa->hard.bytes;
    if (hard_p || hard_b) {
        ips_sa_expire_hard(sa, hard_p ? IPS_TRIG_PACKETS : IPS_TRIG_BYTES);
        return;
    }
    if (!sa->soft_fired) {
        int soft_p = sa->soft.packets != IPS_NO_LIMIT && sa->packets >= sa->soft.packets;
        ips_sa_expire_soft(sa, soft_p ? IPS_TRIG_PACKETS : IPS_TRIG_BYTES);
    }
}

/* Count one packet of `nbytes` and fire the byte/packet lifetime events it crosses. */
void ips_sa_charge(ips_sa *sa, uint64_t nbytes)
{
    sa->packets++;
    sa->bytes += nbytes;
    if (sa->packets >= sa->next_packets || sa->bytes >= sa->next_bytes)
        limits_crossed(sa);
}
