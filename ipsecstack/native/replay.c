/*
 * Anti-replay window (RFC 4303 §3.4.3) and ESN inference (RFC 4303 Appendix A2.2).
 *
 * The twin of ipsecstack/replay.py, decision for decision. The window remembers which of the last
 * `size` sequence numbers up to `top` (the highest authenticated one) arrived, in a ring of 64-bit
 * words (RFC 6479): sequence number s is bit s & 63 of word (s >> 6) & mask. The ring has at least
 * one word more than the window needs, so the word holding `top` never overlaps the oldest word
 * still inside the window; advancing clears only the words moved over, so check and update are
 * O(1) for any window size.
 *
 * Order (RFC 4303 §3.4.3): check before the ICV is verified, update only after it verified.
 */
#include <stdlib.h>
#include <string.h>

#include "engine.h"

#define DEFAULT_WINDOW 64
#define M32 0xFFFFFFFFull

int ips_replay_init(ips_replay *w, uint32_t size, uint64_t top)
{
    uint64_t nwords = 1;
    while (nwords * 64 < (uint64_t)size + 64)
        nwords <<= 1;
    w->words = calloc(nwords, sizeof(uint64_t));
    if (w->words == NULL)
        return -1;
    w->size = size;
    w->mask = (uint32_t)(nwords - 1);
    w->top = top;
    return 0;
}

void ips_replay_free(ips_replay *w)
{
    free(w->words);
    w->words = NULL;
}

ips_reason ips_replay_check(const ips_replay *w, uint64_t seq)
{
    if (seq > w->top)
        return IPS_OK;
    if (seq == 0)
        return IPS_R_TOO_OLD;
    if (w->size == 0)
        return IPS_OK;
    if (w->top - seq >= w->size)
        return IPS_R_TOO_OLD;
    if ((w->words[(seq >> 6) & w->mask] >> (seq & 63)) & 1)
        return IPS_R_REPLAY;
    return IPS_OK;
}

void ips_replay_update(ips_replay *w, uint64_t seq)
{
    if (w->size == 0) {
        if (seq > w->top)
            w->top = seq;
        return;
    }
    if (seq > w->top) {
        uint64_t old_word = w->top >> 6, new_word = seq >> 6;
        if (new_word - old_word > w->mask) {
            memset(w->words, 0, ((size_t)w->mask + 1) * sizeof(uint64_t));
        } else {
            for (uint64_t i = old_word + 1; i <= new_word; i++)
                w->words[i & w->mask] = 0;
        }
        w->top = seq;
    }
    w->words[(seq >> 6) & w->mask] |= 1ull << (seq & 63);
}

/* The full 64-bit sequence number for a received low half (RFC 4303 Appendix A2.2). Returns -1 when
 * the high half would fall outside 0..2^32-1: before the SA began, or past the last number a sender
 * may use (it never wraps); both are packets no peer can have sent. */
int ips_replay_infer(const ips_replay *w, uint32_t seq_low, uint64_t *seq)
{
    int64_t tl = (int64_t)(w->top & M32);
    int64_t th = (int64_t)(w->top >> 32);
    int64_t win = w->size ? (int64_t)w->size : DEFAULT_WINDOW;
    int64_t th_packet;
    if (tl >= win - 1) {
        /* Case A: the window lies within one 2^32 sub-space. */
        th_packet = (int64_t)seq_low >= tl - win + 1 ? th : th + 1;
    } else {
        /* Case B: the window spans two sub-spaces. */
        uint32_t bottom = (uint32_t)(tl - win + 1);
        th_packet = seq_low >= bottom ? th - 1 : th;
    }
    if (th_packet < 0 || th_packet > (int64_t)M32)
        return -1;
    *seq = ((uint64_t)th_packet << 32) | seq_low;
    return 0;
}
