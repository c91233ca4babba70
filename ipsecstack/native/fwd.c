/*
 * The forwarder's life cycle and shared plumbing (see fwd.h for the theory of operation): allocation,
 * the two threads (or the NFQUEUE threads, fwd_nfq.c), the stop eventfd, epoll waits bounded to 100 ms, and the per-batch accounting into
 * the forwarder's counters and the engine's own (in_packets/out_packets and drops, so Engine.stats()
 * and the Python mirror in native/link.py count forwarded packets too).
 */
#define _GNU_SOURCE 1 /* recvmmsg, sendmmsg, in6_pktinfo */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <sys/eventfd.h>
#include <unistd.h>

#ifndef UDP_GRO
#define UDP_GRO 104
#endif

#include "fwd.h"

#define WAIT_MS 100

const char *const ips_fd_kind_name[K_KINDS] = {"udp4", "udp6", "esp4", "esp6", "raw4", "raw6", "tun"};

ips_fwd *ips_fwd_new(uint32_t batch, uint32_t punt_capacity, uint32_t cache_size, const char **why)
{
    ips_fwd *f = calloc(1, sizeof(*f));
    if (f == NULL) {
        *why = "out of memory";
        return NULL;
    }
    f->batch = batch;
    f->tun_fd = -1;
    f->stop_fd = -1;
    f->nfq_raw[0] = f->nfq_raw[1] = -1;
    for (int k = 0; k < K_KINDS; k++)
        f->port[k].fd = -1;
    if (pthread_mutex_init(&f->stats_lock, NULL) != 0) {
        free(f);
        *why = "cannot create a mutex";
        return NULL;
    }
    f->ready = 1;
    if (ips_pq_init(&f->punts, punt_capacity) != 0 || ips_fc_init(&f->cache[IPS_IN], cache_size) != 0 ||
        ips_fc_init(&f->cache[IPS_OUT], cache_size) != 0 || ips_mss_init(&f->mss) != 0) {
        *why = "out of memory (flow caches) or no eventfd";
        ips_fwd_free(f);
        return NULL;
    }
    f->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (f->stop_fd < 0) {
        *why = "cannot create the stop eventfd";
        ips_fwd_free(f);
        return NULL;
    }
    return f;
}

int ips_fwd_run(ips_fwd *f, const char **why)
{
    f->in_ctx = ips_fwd_in_new(f);
    f->out_ctx = ips_fwd_out_new(f);
    if (f->in_ctx == NULL || f->out_ctx == NULL) {
        /* the buffers: about 2 x batch x 64 KB per thread, or an fd that epoll refuses */
        *why = "cannot allocate the threads' buffers or their epoll sets (lower batch?)";
        f->failed = 1;
        ips_fwd_stop(f);
        return -1;
    }
    void *(*mains[2])(void *) = {ips_fwd_in_main, ips_fwd_out_main};
    void *ctx[2] = {f->in_ctx, f->out_ctx};
    for (int d = 0; d < 2; d++) {
        if (pthread_create(&f->threads[d], NULL, mains[d], ctx[d]) != 0) {
            *why = "cannot create a forwarder thread";
            f->failed = 1;
            ips_fwd_stop(f);
            return -1;
        }
        f->started[d] = 1;
    }
    f->running = 1;
    return 0;
}

void ips_fwd_stop(ips_fwd *f)
{
    __atomic_store_n(&f->stop, 1, __ATOMIC_RELEASE);
    if (f->stop_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(f->stop_fd, &one, sizeof(one));
        (void)w; /* EAGAIN: already readable */
    }
    for (int d = 0; d < 2; d++)
        if (f->started[d]) {
            pthread_join(f->threads[d], NULL);
            f->started[d] = 0;
        }
    for (uint32_t i = 0; i < f->nnfq; i++)
        if (f->nfq[i].started) {
            pthread_join(f->nfq[i].thread, NULL);
            f->nfq[i].started = 0;
        }
    f->running = 0;
    ips_fwd_out_free(f->out_ctx);
    ips_fwd_in_free(f->in_ctx);
    f->out_ctx = NULL;
    f->in_ctx = NULL;
    /* Python's ports read these sockets again: one datagram per receive, no timestamps they did not ask for */
    if (f->gro)
        (void)ips_fwd_ports_opt(f->port, K_UDP4, K_UDP6, SOL_UDP, UDP_GRO, 0);
    if (f->codel_target > 0)
        (void)ips_fwd_ports_opt(f->port, K_UDP4, K_RX_LAST, SOL_SOCKET, SO_TIMESTAMPNS, 0);
    ips_pq_free(&f->punts); /* pending punts and the eventfd Python watched (its counters stay) */
    if (f->stop_fd >= 0)
        close(f->stop_fd);
    f->stop_fd = -1;
}

int ips_fwd_ports_opt(const ips_fwd_port *ports, int first, int last, int level, int opt, int on)
{
    for (int k = first; k <= last; k++)
        if (ports[k].fd >= 0 && setsockopt(ports[k].fd, level, opt, &on, sizeof(on)) != 0)
            return k;
    return -1;
}

void ips_fwd_free(ips_fwd *f)
{
    if (f == NULL)
        return;
    ips_fwd_stop(f);
    ips_fc_free(&f->cache[IPS_IN]);
    ips_fc_free(&f->cache[IPS_OUT]);
    ips_mss_free(&f->mss);
    if (f->ready)
        pthread_mutex_destroy(&f->stats_lock);
    free(f);
}

void ips_fwd_account(ips_fwd *f, ips_fwd_counters *l, int outbound)
{
    int any = l->engine_packets > 0;
    for (int r = 1; !any && r < IPS_R_COUNT; r++)
        any = l->engine_drops[r] != 0;
    if (any)
        ips_engine_count(f->engine, l->engine_drops, l->engine_packets, outbound);
    pthread_mutex_lock(&f->stats_lock);
    uint64_t *dst = (uint64_t *)&f->c;
    const uint64_t *src = (const uint64_t *)l;
    for (size_t i = 0; i < offsetof(ips_fwd_counters, engine_drops) / sizeof(uint64_t); i++)
        dst[i] += src[i];
    pthread_mutex_unlock(&f->stats_lock);
    memset(l, 0, sizeof(*l));
}

void ips_fwd_wake_for_events(ips_fwd *f)
{
    if (ips_events_pending(&f->engine->events) > 0) {
        ips_punt_list none = {0};
        ips_pq_push(&f->punts, &none, 1);
    }
}

int ips_fwd_wait(ips_fwd *f, int epfd, struct epoll_event *ev, int max)
{
    if (__atomic_load_n(&f->stop, __ATOMIC_ACQUIRE))
        return -1;
    int n = epoll_wait(epfd, ev, max, WAIT_MS);
    if (__atomic_load_n(&f->stop, __ATOMIC_ACQUIRE))
        return -1;
    if (n < 0)
        return errno == EINTR ? 0 : -2;
    return n;
}
