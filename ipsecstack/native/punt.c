/*
 * The punt queue: what the forwarder's threads hand to Python (see fwd.h), bounded.
 *
 * Each punt is one malloc'd copy of its packet. A thread collects the punts of a batch in a private
 * list (no lock) and hands the list over at once: under the queue's mutex the punts that fit in the
 * capacity are appended, the rest are freed and counted (punt_dropped; the NFQUEUE threads get them
 * back, ips_pq_push_rest, to answer each with a drop verdict). The eventfd is written only
 * when the queue is not yet signalled, so a burst costs one write; take_punts reads the eventfd back
 * (resetting it) when it leaves the queue empty and no lifetime event is waiting, both under the mutex,
 * so no signal is ever lost between a push and a take.
 */
#define _GNU_SOURCE 1
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "fwd.h"

int ips_pq_init(ips_puntq *q, uint32_t cap)
{
    memset(q, 0, sizeof(*q));
    q->cap = cap;
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0)
        return -1;
    if (pthread_mutex_init(&q->lock, NULL) != 0) {
        close(q->efd);
        q->efd = -1;
        return -1;
    }
    q->ready = 1;
    return 0;
}

void ips_punt_free_chain(ips_punt *p)
{
    while (p != NULL) {
        ips_punt *next = p->next;
        free(p);
        p = next;
    }
}

void ips_pq_free(ips_puntq *q)
{
    if (!q->ready)
        return;
    ips_punt_free_chain(q->head);
    q->head = q->tail = NULL;
    q->count = 0;
    if (q->efd >= 0)
        close(q->efd);
    q->efd = -1;
    pthread_mutex_destroy(&q->lock);
    q->ready = 0;
}

int ips_pl_add_q(ips_punt_list *l, ips_punt_kind kind, uint16_t queue_num, uint32_t id, uint32_t spi,
                 const uint8_t *data, size_t len)
{
    ips_punt *p = malloc(sizeof(*p) + (len ? len : 1));
    if (p == NULL) {
        l->nomem++;
        return -1;
    }
    p->next = NULL;
    p->spi = spi;
    p->id = id;
    p->queue_num = queue_num;
    p->len = (uint32_t)len;
    p->kind = (uint8_t)kind;
    memcpy(p->data, data, len);
    if (l->tail != NULL)
        l->tail->next = p;
    else
        l->head = p;
    l->tail = p;
    l->n++;
    return 0;
}

int ips_pl_add(ips_punt_list *l, ips_punt_kind kind, uint32_t spi, const uint8_t *data, size_t len)
{
    return ips_pl_add_q(l, kind, 0, 0, spi, data, len);
}

static void signal_locked(ips_puntq *q)
{
    if (q->signaled)
        return;
    uint64_t one = 1;
    ssize_t w;
    do
        w = write(q->efd, &one, sizeof(one));
    while (w < 0 && errno == EINTR);
    q->signaled = 1; /* (EAGAIN: the counter is at its maximum, so it is readable anyway) */
}

void ips_pq_push(ips_puntq *q, ips_punt_list *l, int wake)
{
    ips_punt_free_chain(ips_pq_push_rest(q, l, wake));
}

ips_punt *ips_pq_push_rest(ips_puntq *q, ips_punt_list *l, int wake)
{
    ips_punt *over = NULL;
    pthread_mutex_lock(&q->lock);
    q->dropped += l->nomem;
    ips_punt *p = l->head;
    while (p != NULL && q->count < q->cap) {
        ips_punt *next = p->next;
        p->next = NULL;
        if (q->tail != NULL)
            q->tail->next = p;
        else
            q->head = p;
        q->tail = p;
        q->count++;
        q->queued[p->kind]++;
        p = next;
    }
    over = p;
    for (; p != NULL; p = p->next)
        q->dropped++;
    if (l->n > 0 || wake)
        signal_locked(q);
    pthread_mutex_unlock(&q->lock);
    memset(l, 0, sizeof(*l));
    return over;
}

ips_punt *ips_pq_take(ips_puntq *q, uint32_t max, uint32_t events_pending)
{
    pthread_mutex_lock(&q->lock);
    ips_punt *head = q->head, *last = NULL, *p = q->head;
    uint32_t n = 0;
    for (; p != NULL && n < max; p = p->next, n++)
        last = p;
    if (last != NULL) {
        q->head = last->next;
        last->next = NULL;
        if (q->head == NULL)
            q->tail = NULL;
        q->count -= n;
    } else {
        head = NULL;
    }
    if (q->count == 0 && events_pending == 0 && q->signaled) {
        uint64_t v;
        ssize_t r;
        do
            r = read(q->efd, &v, sizeof(v));
        while (r < 0 && errno == EINTR);
        q->signaled = 0;
    }
    pthread_mutex_unlock(&q->lock);
    return head;
}
