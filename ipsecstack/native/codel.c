/*
 * CoDel (RFC 8289) on the ESP receive queue: the engine's inbound thread drops ESP datagrams that
 * waited in the socket's receive buffer too long, so the buffer absorbs bursts but never holds a
 * standing queue.
 *
 * Why here: a userspace datapath adds a queue the kernel's qdiscs do not manage, the receive buffer
 * of its ESP socket. When the engine is the slowest stage (it usually is: decryption costs more than
 * the kernel's hops), TCP fills that buffer until it overflows, and every packet of the tunnel (a
 * ping, a DNS reply, the ACKs of other flows) waits behind it: a 4 MiB buffer at 2 Gbit/s is 16 ms.
 * A small buffer bounds that delay but drops the bursts UDP senders make. CoDel keeps the big buffer
 * and drops by sojourn time instead, as fq_codel does for a NIC's queue.
 *
 * Theory of operation (RFC 8289 §5.3-5.5, one call per dequeued datagram, in arrival order):
 *   - the sojourn time is now minus the kernel's receive timestamp (SO_TIMESTAMPNS, CLOCK_REALTIME;
 *     a datagram without one, or a clock that stepped back, counts as no wait);
 *   - a sojourn below `target` resets `first_above`; the first one above arms it at now + interval;
 *     dropping is allowed once the sojourn has stayed above target for a whole interval;
 *   - entering the dropping state drops one datagram and schedules the next drop at
 *     now + interval / sqrt(count); while the state lasts, each datagram dequeued at or after that time
 *     is dropped and the next drop comes sooner (count + 1); the first datagram below target ends it;
 *   - re-entering soon after leaving (within 16 intervals, §5.5) starts from the last episode's
 *     count less the one before it, so a persistent queue does not restart at the gentlest rate.
 * A queue that drains in a round is never dropped from: its last datagrams waited less than target.
 */
#include <math.h>

#include "fwd.h"

static uint64_t control_law(const ips_codel *c, uint64_t t)
{
    return t + (uint64_t)((double)c->interval / sqrt((double)c->count));
}

/* RFC 8289 §5.4 dodequeue(): may this datagram be dropped? */
static int above_for_interval(ips_codel *c, uint64_t now, uint64_t sojourn)
{
    if (sojourn < c->target) {
        c->first_above = 0;
        return 0;
    }
    if (c->first_above == 0) {
        c->first_above = now + c->interval;
        return 0;
    }
    return now >= c->first_above;
}

void ips_codel_init(ips_codel *c, uint64_t target_ns, uint64_t interval_ns)
{
    memset(c, 0, sizeof(*c));
    c->target = target_ns;
    c->interval = interval_ns;
}

int ips_codel_drop(ips_codel *c, uint64_t now, uint64_t sojourn)
{
    if (c->target == 0)
        return 0;
    int ok = above_for_interval(c, now, sojourn);
    if (c->dropping) {
        if (!ok) {
            c->dropping = 0;
            return 0;
        }
        if (now < c->drop_next)
            return 0;
        c->count++;
        c->drop_next = control_law(c, c->drop_next);
        return 1;
    }
    if (!ok)
        return 0;
    /* §5.5: back soon after the last episode -> resume near its drop rate */
    uint32_t delta = c->count - c->lastcount;
    c->count = (delta > 1 && now - c->drop_next < 16 * c->interval) ? delta : 1;
    c->dropping = 1;
    c->drop_next = control_law(c, now);
    c->lastcount = c->count;
    return 1;
}
