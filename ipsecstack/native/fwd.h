/*
 * The native forwarder: two engine threads own the hot file descriptors (ipsecstack issue #10).
 *
 * Theory of operation
 * -------------------
 * Engine.fwd_start(tun_fd, outer) starts two threads that move packets with no GIL and no Python:
 *
 *   outbound (fwd_out.c)  epoll on the inner fd (a TUN device, or any fd that gives one packet per
 *                         read(), e.g. a socketpair(AF_UNIX, SOCK_DGRAM) end) and the stop eventfd;
 *                         read() up to `batch` packets until EAGAIN; per packet the flow key
 *                         (flowcache.c) is looked up in the outbound flow cache: a cached SPI ->
 *                         ESP protect (esp.c) under the table's read lock and the SA's mutex, runs of
 *                         consecutive packets of one SA under one lock -> sendmmsg() on the outer
 *                         socket the SA needs (UDP-encapsulated SAs: the udp4/udp6 socket, the UDP
 *                         payload with msg_name = outer destination + UDP destination port, IP_TOS /
 *                         IPV6_TCLASS when the outer TOS is not zero, RFC 3948; others: the whole packet
 *                         on the raw4/raw6 IPPROTO_RAW socket); a cached discard -> dropped
 *                         (policy_discard); no decision, an uncacheable packet (fragment, IPv6
 *                         extension headers) or an SA no longer in the table -> punted ("out").
 *   inbound (fwd_in.c)    epoll on the outer receive sockets (udp4/udp6: ESP-in-UDP and IKE on port
 *                         4500; esp4/esp6: raw IPPROTO_ESP) and the stop eventfd; recvmmsg() up to
 *                         `batch` datagrams with their control messages into buffers with headroom,
 *                         where the IP (and UDP) header is rebuilt in front of the payload exactly as
 *                         backends/udp.py and backends/rawsock.py rebuild it; NAT keepalives (RFC 3948
 *                         §2.3) are counted, IKE (non-ESP marker, §2.2) and ESP whose SPI the table does
 *                         not hold are punted ("outer"); ESP with an inbound SA is unprotected (replay
 *                         window, counters and lifetimes charged as Engine.unprotect charges them); the
 *                         inner packet's (SPI, flow) is looked up in the inbound flow cache: known ->
 *                         write() to the inner fd; unknown -> punted ("in", spi, inner), so Python runs
 *                         the RFC 4301 §5.2 inbound policy check on it and teaches the flow (learn_in).
 *
 * Offloads (fwd_start keywords, each off by default; bench/README.md says what each one gives):
 *   tso       the inner fd is a TUN opened with IFF_VNET_HDR and TUNSETOFFLOAD CSUM|TSO4|TSO6(|USO4|USO6)
 *             (backends/tun.py TunPort(vnet_hdr=True)): fwd_seg.c finishes NEEDS_CSUM checksums and
 *             cuts TCP/UDP super-packets into gso_size segments before protect; writes carry a zero
 *             virtio_net_hdr;
 *   coalesce  (with tso) fwd_coal.c writes in-order TCP segments of a flow in a round as one GSO
 *             super-packet (writev, no copy);
 *   gso       UDP_SEGMENT: runs of equal-size ESP-in-UDP payloads to one destination in one sendmsg;
 *   gro       UDP_GRO on the udp sockets: glued datagrams are cut by the cmsg's size before ESP.
 *
 * Python answers punts (Engine.take_punts) and teaches the caches (learn_out after its own
 * Datapath.decide_out, learn_in after Datapath.inbound_decrypted); flush() forgets both caches on any
 * SPD/SAD change in O(1) by bumping a generation counter that every entry carries. The caches have a
 * fixed power-of-two number of slots (direct-mapped: a new flow overwrites the slot's old one), so their
 * memory is bounded; so is the punt queue (punt.c: `punt_capacity` malloc'd copies; a full queue drops
 * and counts punt_dropped) and every buffer (allocated at start: `batch` packet buffers per thread).
 *
 * Wake-ups: the punt queue's eventfd is written only when the queue goes from "Python was told" to
 * "Python must be told" (a burst of punts costs one write); take_punts reads it back when it leaves the
 * queue empty and no lifetime event waits. Lifetime events raised by the threads (ips_events) signal
 * the same eventfd, so Python's poll_events runs promptly.
 *
 * Locks (never held while calling Python; the Python methods release the GIL before taking any):
 *   - the engine's table read lock and SA mutexes (engine_obj.h), for the crypto;
 *   - each flow cache's mutex, taken once per batch by the outbound thread and once per packet by the
 *     inbound thread (for a few loads; the table read lock is held over the inbound round and an SA's
 *     mutex over a run of its packets), and by learn_out, learn_in and flush;
 *   - the punt queue's mutex, taken once per batch by each thread, and by take_punts;
 *   - the counters' mutex, once per batch: each thread counts into a private struct and adds it in.
 * Order: the table read lock, then an SA mutex, then (inbound only) the inbound cache's mutex; the
 * engine's event and counter mutexes innermost everywhere. Nobody takes a table or SA lock while
 * holding a cache, punt or counter mutex (learn_*, flush and take_punts hold only their own), so
 * there is no cycle.
 *
 * Stopping: a stop flag and the stop eventfd, which both epolls watch; every epoll_wait has a 100 ms
 * timeout and every loop is bounded by `batch`, so fwd_stop joins within a batch's work + 100 ms.
 *
 * Network input never crashes: every length a packet claims is checked against the bytes received
 * before it is used (esp.c for ESP; here for the rebuilt headers and flow keys); what is refused is
 * counted by reason (the strings of ipsecstack/errors.py) in fwd_stats and in the engine's drops.
 */
#ifndef IPSECSTACK_NATIVE_FWD_H
#define IPSECSTACK_NATIVE_FWD_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "engine_obj.h"
#include "nfq.h"

/* ---- flowcache.c ---------------------------------------------------------------------------- */

/* What a flow is: IP version, addresses, protocol, TCP/UDP/SCTP/UDP-Lite ports or ICMP type and code;
 * the inbound cache adds the SA's SPI. Every byte is set (zero padding), so keys compare with memcmp. */
typedef struct {
    uint32_t spi;
    uint8_t version, proto;
    uint16_t a, b, pad;
    uint8_t src[16], dst[16];
} ips_flow;

/* 0 and *k filled, or -1 when the packet's flow must not be cached (fragments, IPv6 extension
 * headers, a header shorter than it claims). */
int ips_flow_of(const uint8_t *pkt, size_t len, uint32_t spi, ips_flow *k);

typedef struct {
    ips_flow key;
    uint32_t gen;   /* valid while equal to the cache's generation */
    uint32_t value; /* outbound: the SPI, 0 for discard */
    uint32_t aux;   /* outbound: the path MTU Python gave with the flow (learn_out mtu=; 0: none) */
} ips_fc_entry;

typedef struct {
    pthread_mutex_t lock;
    ips_fc_entry *slots;
    uint32_t mask, gen;
    uint64_t entries, hits, misses;
    int ready;
} ips_flowcache;

int ips_fc_init(ips_flowcache *c, uint32_t size); /* size: a power of two */
void ips_fc_free(ips_flowcache *c);
/* the callers hold c->lock */
int ips_fc_lookup(ips_flowcache *c, const ips_flow *k, uint32_t *value);
int ips_fc_lookup_aux(ips_flowcache *c, const ips_flow *k, uint32_t *value, uint32_t *aux);
void ips_fc_insert(ips_flowcache *c, const ips_flow *k, uint32_t value, uint32_t aux);
void ips_fc_flush(ips_flowcache *c);

/* ---- punt.c --------------------------------------------------------------------------------- */

/* the q* kinds come from the NFQUEUE threads (fwd_nfq.c): the packet waits in the kernel for a verdict */
typedef enum {
    IPS_PUNT_OUT = 0,
    IPS_PUNT_IN,
    IPS_PUNT_OUTER,
    IPS_PUNT_QOUT,
    IPS_PUNT_QIN,
    IPS_PUNT_QOUTER,
    IPS_PUNT_QSEG, /* a segment of a GSO super-packet whose flow had no decision: answered with nfq_send */
    IPS_PUNT_KINDS
} ips_punt_kind;

typedef struct ips_punt {
    struct ips_punt *next;
    uint32_t spi, len;
    uint32_t id;        /* q*: the NFQUEUE packet id */
    uint16_t queue_num; /* q*: the queue it waits in */
    uint8_t kind;
    uint8_t data[];
} ips_punt;

/* A thread's punts of one batch, in arrival order, handed over at once. */
typedef struct {
    ips_punt *head, *tail;
    uint32_t n;
    uint64_t nomem; /* copies that could not be allocated (counted as punt_dropped) */
} ips_punt_list;

typedef struct {
    pthread_mutex_t lock;
    ips_punt *head, *tail;
    uint32_t count, cap;
    int efd;      /* eventfd Python watches */
    int signaled; /* efd holds a count Python has not read back */
    uint64_t queued[IPS_PUNT_KINDS], dropped;
    int ready;
} ips_puntq;

int ips_pq_init(ips_puntq *q, uint32_t cap);
void ips_pq_free(ips_puntq *q); /* frees what is queued, closes the eventfd */
/* 0, or -1 when no copy could be allocated (counted in l->nomem) */
int ips_pl_add(ips_punt_list *l, ips_punt_kind kind, uint32_t spi, const uint8_t *data, size_t len);
int ips_pl_add_q(ips_punt_list *l, ips_punt_kind kind, uint16_t queue_num, uint32_t id, uint32_t spi,
                 const uint8_t *data, size_t len);
void ips_pq_push(ips_puntq *q, ips_punt_list *l, int wake); /* wake: signal even with nothing new */
/* As ips_pq_push, but what does not fit is returned (counted as dropped) for the caller to answer. */
ips_punt *ips_pq_push_rest(ips_puntq *q, ips_punt_list *l, int wake);
/* Up to max punts, oldest first; the eventfd is read back once the queue is empty and events == 0. */
ips_punt *ips_pq_take(ips_puntq *q, uint32_t max, uint32_t events_pending);
void ips_punt_free_chain(ips_punt *p);

/* ---- fwd_seg.c: TUN offloads (virtio_net_hdr, checksums, TSO/USO segmentation) --------------- */

typedef struct {
    unsigned flags, gso_type, hdr_len, gso_size, csum_start, csum_offset;
} ips_vnet;

/* A super-packet's segmentation: headers (l3 + transport) copied into every segment. */
typedef struct {
    uint32_t l3, hdrs, gso, count;
    size_t len;
    uint8_t proto;
} ips_seg;

uint32_t ips_csum_add(uint32_t sum, const uint8_t *p, size_t n); /* ones' complement sum, folded */
unsigned ips_csum_fold(uint32_t sum);                            /* folded and complemented */
uint32_t ips_pseudo_sum(const uint8_t *ip, unsigned proto, size_t l4_len);
void ips_vnet_read(const uint8_t *h, ips_vnet *v);
void ips_vnet_write(uint8_t *h, size_t hlen, const ips_vnet *v); /* v NULL: all zero */
/* finish a NEEDS_CSUM checksum in place */
ips_reason ips_csum_complete(uint8_t *pkt, size_t len, unsigned start, unsigned offset);
/* check a GSO super-packet and plan its segments; IPS_OK or why it is dropped */
ips_reason ips_seg_plan(const uint8_t *pkt, size_t len, const ips_vnet *v, ips_seg *s);
/* the same plan at another segment size (gso > 0) */
void ips_seg_resize(ips_seg *s, uint32_t gso);
/* write segment i (< s->count) of pkt to out (room: s->hdrs + s->gso); its length */
size_t ips_seg_write(const uint8_t *pkt, const ips_seg *s, uint32_t i, uint8_t *out);

/* ---- fwd_coal.c: inbound TCP coalescing into GSO super-packets for a vnet_hdr TUN ------------ */

#define IPS_COAL_MAX 64 /* segments in one super-packet */
#define IPS_COAL_OPEN 8 /* flows coalesced at once */

typedef struct ips_fwd ips_fwd;
typedef struct ips_fwd_counters ips_fwd_counters;

typedef struct {
    uint8_t *pkt; /* the inner packet; VNET_ROOM bytes before it are free for a virtio_net_hdr */
    uint32_t len;
} ips_delivery;

#define IPS_VNET_ROOM 16

/* Write `n` decrypted packets to the inner fd: one write each, or (coalesce) TCP runs as one. */
void ips_deliver(ips_fwd *f, ips_fwd_counters *c, ips_delivery *d, uint32_t n, int coalesce);
/* Merge the same runs in place, for a consumer of plain packets (NFQUEUE): each run's first packet
 * grows into the run (its buffer must have room for max_bytes more; full checksums), absorbed[i] = 1
 * for the packets it took in. At most max_count segments and max_bytes of payload per run. */
void ips_merge(ips_fwd_counters *c, ips_delivery *d, uint32_t n, uint8_t *absorbed, uint32_t max_count,
               uint32_t max_bytes);

/* ---- fwd_nfq_gso.c: the NFQUEUE TCP queue (NFQA_CFG_F_GSO) ----------------------------------- */

/* The MSS the peers of TCP flows announced (their SYN, decrypted by the in queue), by our direction's flow
 * key: a direct-mapped table, a collision overwrites (then the segment size falls back to the MTU's). */
#define IPS_MSS_SLOTS 4096
typedef struct {
    ips_flow key;
    uint32_t mss; /* 0: empty */
} ips_mss_slot;

typedef struct {
    pthread_mutex_t lock;
    ips_mss_slot *slots;
    int ready;
} ips_mss_table;

typedef struct ips_nfq_tx ips_nfq_tx; /* protected packets waiting for sendmmsg on the raw sockets */

ips_nfq_tx *ips_nfq_tx_new(void);
void ips_nfq_tx_free(ips_nfq_tx *t);
/* A buffer for one more packet of up to `need` bytes, or NULL when the batch is full (flush first). */
uint8_t *ips_nfq_tx_room(ips_nfq_tx *t, size_t need);
void ips_nfq_tx_commit(ips_nfq_tx *t, size_t len); /* the packet written at the last room */
/* The destination of an IP packet (IPv4, else IPv6) for an IPPROTO_RAW socket, which takes the header as
 * it is (the address only routes it): name filled, its length returned. */
socklen_t ips_raw_dest(const uint8_t *pkt, struct sockaddr_in6 *name);
/* Send what waits (sendmmsg on f->nfq_raw, by IP version), count it into c, empty the batch. */
void ips_nfq_tx_flush(ips_fwd *f, ips_nfq_tx *t, ips_fwd_counters *c);
/* Finish a CHECKSUM_PARTIAL TCP/UDP checksum (NFQA_SKB_CSUMNOTREADY) in place. */
ips_reason ips_csum_partial(uint8_t *pkt, size_t len);
int ips_mss_init(ips_mss_table *t);
void ips_mss_free(ips_mss_table *t);
/* An inbound TCP SYN's MSS option, remembered for the reverse flow (RFC 9293 §3.7.1). */
void ips_mss_learn(ips_mss_table *t, const uint8_t *pkt, size_t len);
/* The segment size for a TCP super-packet of this outbound flow: its protected segments fit mtu, and
 * no segment carries more than the peer announced (less the TCP options, RFC 6691). sa NULL: a flow
 * without a decision, whose segments Python protects (1024 bytes of payload at most). pkt is a TCP packet
 * with its headers checked (ips_seg_plan). */
uint32_t ips_gso_size(ips_mss_table *t, const ips_sa *sa, const uint8_t *pkt, size_t len, uint32_t mtu);

/* ---- fwd.c ---------------------------------------------------------------------------------- */

enum { K_UDP4 = 0, K_UDP6, K_ESP4, K_ESP6, K_RAW4, K_RAW6, K_TUN, K_KINDS };
#define K_RX_LAST K_ESP6 /* the receive sockets: K_UDP4 .. K_ESP6 (the UDP ones: K_UDP4 .. K_UDP6) */
extern const char *const ips_fd_kind_name[K_KINDS];

struct ips_fwd_counters {
    uint64_t packets[2], bytes[2]; /* forwarded, by IPS_IN / IPS_OUT */
    uint64_t syscalls, batches[2];
    uint64_t tso_super, tso_segments, csum_completed; /* outbound, vnet_hdr TUN */
    uint64_t gso_sends, gso_segments;                 /* outbound, UDP_SEGMENT */
    uint64_t gro_super, gro_segments;                 /* inbound, UDP_GRO */
    uint64_t coal_writes, coal_segments;              /* inbound, coalesced TCP on a vnet_hdr TUN */
    uint64_t tx_errors[K_KINDS], rx_errors[K_KINDS];
    uint64_t drops[IPS_R_COUNT];
    /* NFQUEUE threads (fwd_nfq.c): messages read, verdicts sent by verdict, Python's verdicts, netlink
     * errors the kernel returned, datagrams or messages that did not parse, failed sends */
    uint64_t nfq_rx, nfq_accept, nfq_drop, nfq_py_verdicts, nfq_kernel_errors, nfq_malformed, nfq_tx_errors;
    uint64_t nfq_truncated, nfq_too_big; /* cut-short packets; punted for the PMTU check (RFC 4301 §8) */
    /* the TCP queue (fwd_nfq_gso.c): super-packets segmented, their segments, checksums finished, packets
     * sent on the raw sockets */
    uint64_t nfq_gso_super, nfq_gso_segments, nfq_csum_finished, nfq_raw_sent;
    uint64_t engine_drops[IPS_R_COUNT]; /* this batch's share of the engine-wide drops */
    uint64_t engine_packets;            /* packets given to protect / unprotect */
};

typedef struct {
    int fd;
    uint16_t port;     /* udp: the bound port (the UDP destination of what arrives) */
    uint8_t local[16]; /* the bound address (udp: default destination; esp: the filter when bound) */
    int bound;         /* esp: bound to one address */
} ips_fwd_port;

#define IPS_NFQ_QUEUES 8
#define IPS_NFQ_ENCAP 8

typedef struct {
    struct ips_fwd *f;
    int fd;
    uint16_t queue_num;
    uint8_t inbound;  /* 1: the in queue (ESP to unprotect), 0: the out queue (plaintext to protect) */
    uint8_t has_mark; /* set this mark on the replacements (backends/esp_routes.py) */
    uint8_t gso;      /* the TCP queue: NFQA_CFG_F_GSO, protected packets leave by the raw sockets */
    uint32_t mark;
    pthread_t thread;
    int started;
} ips_nfq_queue;

/* CoDel on an ESP receive queue (codel.c, RFC 8289); times in ns, target 0: off */
typedef struct {
    uint64_t target, interval;
    uint64_t first_above, drop_next;
    uint32_t count, lastcount;
    int dropping;
} ips_codel;
void ips_codel_init(ips_codel *c, uint64_t target_ns, uint64_t interval_ns);
/* one call per dequeued datagram, in order: 1 = drop it */
int ips_codel_drop(ips_codel *c, uint64_t now_ns, uint64_t sojourn_ns);

struct ips_fwd {
    EngineObject *engine;
    ips_nfq_queue nfq[IPS_NFQ_QUEUES]; /* NFQUEUE mode (fwd_nfq.c): no TUN threads */
    uint32_t nnfq;
    int nfq_raw[2];    /* IPPROTO_RAW sockets (IPv4, IPv6; -1 absent) the TCP queue sends on (nfq_start raw_fds) */
    ips_mss_table mss; /* the TCP queue's segment sizes (fwd_nfq_gso.c) */
    uint16_t encap_ports[IPS_NFQ_ENCAP]; /* UDP ports that carry ESP (RFC 3948) on the in queues */
    uint32_t nencap;
    int tun_fd;
    int tso;       /* the inner fd carries a virtio_net_hdr of vnet_len bytes (IFF_VNET_HDR) */
    int vnet_len;  /* 10 or 12 */
    int coalesce;  /* inbound: TCP segments of a flow written as one GSO super-packet (needs tso) */
    int gso, gro;  /* UDP_SEGMENT sends, UDP_GRO receives on the udp4/udp6 sockets */
    uint64_t codel_target, codel_interval; /* ns, CoDel on the ESP receive queues (target 0: off) */
    int failed;    /* a thread could not start (buffers, epoll): fwd_stats says so */
    ips_fwd_port port[K_KINDS]; /* fd -1: absent */
    uint32_t batch;
    int stop_fd;
    int stop; /* __atomic */
    pthread_t threads[2];
    int started[2];
    struct ips_fwd_out_ctx *out_ctx;
    struct ips_fwd_in_ctx *in_ctx;
    int running;
    ips_puntq punts;
    ips_flowcache cache[2]; /* by IPS_IN / IPS_OUT */
    uint64_t flushes;       /* under cache[IPS_OUT].lock */
    pthread_mutex_t stats_lock;
    ips_fwd_counters c;
    int ready;
};

/* flush a thread's private counters of one batch into the shared ones and the engine's */
void ips_fwd_account(ips_fwd *f, ips_fwd_counters *local, int outbound);
/* after a batch: lifetime events waiting -> make sure Python is woken */
void ips_fwd_wake_for_events(ips_fwd *f);
/* epoll_wait on the thread's set: 1 readable work, 0 timeout, -1 stop */
int ips_fwd_wait(ips_fwd *f, int epfd, struct epoll_event *ev, int max);

/* Allocate (no threads yet); *why set on failure. */
ips_fwd *ips_fwd_new(uint32_t batch, uint32_t punt_capacity, uint32_t cache_size, const char **why);
int ips_fwd_run(ips_fwd *f, const char **why); /* start both threads */
int ips_nfq_run(ips_fwd *f, const char **why); /* start one thread per NFQUEUE (fwd_nfq.c) */
/* setsockopt(level, opt, on) on the open ports of kinds first..last (UDP_GRO, SO_TIMESTAMPNS): -1 when all
 * took it, else the kind that refused (errno set) */
int ips_fwd_ports_opt(const ips_fwd_port *ports, int first, int last, int level, int opt, int on);
void ips_fwd_stop(ips_fwd *f);                 /* join, free the punts, close the eventfds; idempotent */
void ips_fwd_free(ips_fwd *f);

/* Each thread's buffers and epoll set, made by ips_fwd_run before the thread starts (NULL: no memory) */
struct ips_fwd_out_ctx *ips_fwd_out_new(ips_fwd *f); /* fwd_out.c */
void ips_fwd_out_free(struct ips_fwd_out_ctx *x);
struct ips_fwd_in_ctx *ips_fwd_in_new(ips_fwd *f); /* fwd_in.c */
void ips_fwd_in_free(struct ips_fwd_in_ctx *x);
void *ips_fwd_out_main(void *ctx); /* fwd_out.c */
void *ips_fwd_in_main(void *ctx);  /* fwd_in.c */
void *ips_nfq_main(void *arg);     /* fwd_nfq.c: arg is an ips_nfq_queue */

#endif
