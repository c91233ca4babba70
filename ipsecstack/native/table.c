/*
 * The engine's SA table: a hash of chains keyed by (direction, SPI), grown by doubling when it holds
 * as many SAs as buckets. Callers hold EngineObject.table_lock (engine_obj.h); nothing here locks,
 * except ips_engine_count, which takes the counters' mutex.
 */
#define _GNU_SOURCE 1
#include <stdlib.h>

#include "engine_obj.h"

static size_t bucket_of(size_t nbuckets, uint8_t dir, uint32_t spi)
{
    return ((spi * 2654435761u) ^ dir) & (nbuckets - 1);
}

ips_sa *ips_table_find(EngineObject *e, uint8_t dir, uint32_t spi)
{
    for (ips_sa *sa = e->buckets[bucket_of(e->nbuckets, dir, spi)]; sa != NULL; sa = sa->next)
        if (sa->spi == spi && sa->dir == dir)
            return sa;
    return NULL;
}

static void table_grow(EngineObject *e)
{
    size_t n = e->nbuckets * 2;
    ips_sa **b = calloc(n, sizeof(*b));
    if (b == NULL)
        return; /* longer chains, still correct */
    for (size_t i = 0; i < e->nbuckets; i++) {
        ips_sa *sa = e->buckets[i];
        while (sa != NULL) {
            ips_sa *next = sa->next;
            size_t j = bucket_of(n, sa->dir, sa->spi);
            sa->next = b[j];
            b[j] = sa;
            sa = next;
        }
    }
    free(e->buckets);
    e->buckets = b;
    e->nbuckets = n;
}

int ips_table_insert(EngineObject *e, ips_sa *sa)
{
    if (ips_table_find(e, sa->dir, sa->spi) != NULL)
        return -1;
    if (e->count >= e->nbuckets)
        table_grow(e);
    size_t i = bucket_of(e->nbuckets, sa->dir, sa->spi);
    sa->next = e->buckets[i];
    e->buckets[i] = sa;
    e->count++;
    return 0;
}

ips_sa *ips_table_unlink(EngineObject *e, uint8_t dir, uint32_t spi)
{
    ips_sa **link = &e->buckets[bucket_of(e->nbuckets, dir, spi)];
    for (; *link != NULL; link = &(*link)->next) {
        ips_sa *sa = *link;
        if (sa->spi == spi && sa->dir == dir) {
            *link = sa->next;
            e->count--;
            return sa;
        }
    }
    return NULL;
}

void ips_engine_count(EngineObject *e, const uint64_t *drops, uint64_t n, int outbound)
{
    pthread_mutex_lock(&e->stats_lock);
    for (int r = 1; r < IPS_R_COUNT; r++)
        e->drops[r] += drops[r];
    if (outbound)
        e->out_packets += n;
    else
        e->in_packets += n;
    pthread_mutex_unlock(&e->stats_lock);
}
