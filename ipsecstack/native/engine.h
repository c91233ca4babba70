/*
 * ipsecstack native ESP engine: the crypto core (DESIGN.md §4a, issue #10 step 1).
 *
 * Theory of operation
 * -------------------
 * The engine holds ESP security associations that the Python control plane installs (SPI,
 * direction, transform and key bytes laid out as IKEv2 hands them over, RFC 7296 §2.17; mode,
 * tunnel endpoints, ESN, replay window, UDP encapsulation ports, byte/packet lifetimes) and runs
 * ESP protect/unprotect (RFC 4303) over batches of whole IP packets. It is a byte-for-byte twin of
 * the Python reference (ipsecstack/xform/esp.py and mode.py): the same padding (1, 2, 3, ...), the
 * same IVs, the same outer headers, the same drop reasons, the same counters, in the same order.
 *
 *   replay.c   anti-replay window (RFC 4303 §3.4.3, RFC 6479 ring of words) and ESN high-half
 *              inference (RFC 4303 Appendix A2.2), mirroring ipsecstack/replay.py;
 *   cipher.c   one OpenSSL EVP context per SA, keyed once and reused for every packet:
 *              AES-GCM-16 (RFC 4106) and ChaCha20-Poly1305 (RFC 7634) with IV = the 64-bit
 *              sequence number, AES-CBC (RFC 3602) with HMAC-SHA-256/384/512 truncated per
 *              RFC 4868 (encrypt-then-MAC), NULL (RFC 2410) with HMAC;
 *   sa.c       the SA: sequence numbers (never wrapping, RFC 4303 §3.3.3), lifetimes (soft and hard,
 *              bytes and packets, RFC 4301 §4.4.2.1) and the bounded event queue;
 *   esp.c      one packet: IP parsing, transport/tunnel headers (RFC 4301 §5.1.2, RFC 6040 ECN),
 *              UDP encapsulation (RFC 3948), trailer checks; pure functions on C buffers;
 *   _engine.c  the CPython type: the SA table, batches, locks, counters and events for Python,
 *              with batch.c (moving packets in and out) and params.c (checking install's arguments).
 *
 * Batches: the Python thread copies the packets into C memory and allocates the output objects
 * while it holds the GIL, then releases the GIL for the whole crypto loop and takes it back only to
 * hand the results over. Locking (a lock is only ever taken, waited for or held by a thread that
 * has released the GIL, and no Python API is called under a lock, so locks and the GIL never wait
 * on each other):
 *   - a read-write lock guards the SA table: batches and stats read it, install/remove write it;
 *   - each SA has a mutex guarding its state (cipher context, sequence counter, window, counters);
 *   - the event queue and the engine-wide counters have a mutex each, taken innermost.
 *
 * Nothing from the network can make the engine read or write out of bounds: every length is
 * checked against the bytes actually present before it is used; refused packets are counted by
 * reason (the strings of ipsecstack/errors.py) and returned as that reason.
 */
#ifndef IPSECSTACK_NATIVE_ENGINE_H
#define IPSECSTACK_NATIVE_ENGINE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

/* The largest IP datagram: an IPv6 header plus 65535 bytes of payload. Bytes beyond it are never
 * copied (no IP header can claim them; the Python engine ignores them too). */
#define IPS_MAX_DATAGRAM 65575
/* protect adds at most 40 (IPv6) + 8 (UDP) + 8 (ESP) + 16 (IV) + 15 + 2 (padding, trailer)
 * + 32 (ICV) = 121 bytes to what it carries */
#define IPS_HEADROOM 128
#define IPS_NO_LIMIT UINT64_MAX

/* Drop reasons: the same stable strings as ipsecstack.errors.Reason (ips_reason_name). */
typedef enum {
    IPS_OK = 0,
    IPS_R_TRUNCATED,
    IPS_R_MALFORMED,
    IPS_R_BAD_IP_VERSION,
    IPS_R_FRAGMENT,
    IPS_R_UNKNOWN_SPI,
    IPS_R_SA_EXPIRED,
    IPS_R_SEQ_EXHAUSTED,
    IPS_R_ENCAP_MISMATCH,
    IPS_R_REPLAY,
    IPS_R_TOO_OLD,
    IPS_R_BAD_ICV,
    IPS_R_BAD_PADDING,
    IPS_R_BAD_LENGTH,
    IPS_R_BAD_NEXT_HEADER,
    IPS_R_DUMMY,
    IPS_R_NAT_KEEPALIVE,
    IPS_R_ECN_DROP,
    IPS_R_CRYPTO_ERROR,
    IPS_R_POLICY_DISCARD, /* the forwarder: a flow the SPD discards (RFC 4301 §5.1) */
    IPS_R_QUEUE_DELAY,    /* the forwarder: CoDel dropped it, it waited too long to be read (codel.c) */
    IPS_R_COUNT
} ips_reason;

extern const char *const ips_reason_name[IPS_R_COUNT];

enum { IPS_IN = 0, IPS_OUT = 1 };

/* ---- replay.c ------------------------------------------------------------------------------- */

typedef struct {
    uint64_t top;     /* highest authenticated sequence number */
    uint64_t *words;  /* ring of 64-bit words, seq s at bit s & 63 of word (s >> 6) & mask */
    uint32_t size;    /* window size; 0 = no replay protection (manual keying only) */
    uint32_t mask;    /* number of words - 1 (a power of two minus one) */
} ips_replay;

int ips_replay_init(ips_replay *w, uint32_t size, uint64_t top);
void ips_replay_free(ips_replay *w);
ips_reason ips_replay_check(const ips_replay *w, uint64_t seq);
void ips_replay_update(ips_replay *w, uint64_t seq);
int ips_replay_infer(const ips_replay *w, uint32_t seq_low, uint64_t *seq);

/* ---- cipher.c ------------------------------------------------------------------------------- */

typedef enum { IPS_GCM, IPS_CHACHA, IPS_CBC, IPS_NULL } ips_kind;

typedef struct {
    const char *keyword;  /* the canonical ipsecstack transform keyword */
    ips_kind kind;
    int key_len;          /* cipher key */
    int salt_len;         /* AEAD salt after the cipher key (RFC 4106 §8.1, RFC 7634 §3) */
    int integ_key_len;    /* HMAC key after the cipher key (RFC 4868 §2.1) */
    int iv_len;
    int block;            /* padding alignment (RFC 4303 §2.4: at least 4) */
    int icv_len;
    const char *digest;   /* HMAC digest name, NULL for AEAD */
} ips_suite;

const ips_suite *ips_suite_find(const char *keyword);
const ips_suite *ips_suite_at(size_t i); /* NULL past the end */

typedef struct {
    const ips_suite *suite;
    EVP_CIPHER_CTX *cctx;  /* NULL for ENCR_NULL */
    EVP_MAC_CTX *mac;      /* NULL for AEAD */
    uint8_t salt[4];
} ips_cipher;

int ips_cipher_init(ips_cipher *c, const ips_suite *s, const uint8_t *key, int encrypt, const char **why);
void ips_cipher_free(ips_cipher *c);
int ips_seal(ips_cipher *c, uint8_t *esp, size_t pt_len, uint64_t seq, const uint8_t *seq_hi, const uint8_t *rand16);
ips_reason ips_open(ips_cipher *c, const uint8_t *esp, size_t body_len, const uint8_t *seq_hi, uint8_t *dst,
                    size_t *pt_len);

/* ---- sa.c ----------------------------------------------------------------------------------- */

/* IPS_EV_SEEN: the first packet an inbound SA accepted since the owner last re-armed it (ips_sa_note_seen) */
typedef enum { IPS_EV_SOFT = 0, IPS_EV_HARD = 1, IPS_EV_SEEN = 2 } ips_event_kind;
typedef enum { IPS_TRIG_SECONDS = 0, IPS_TRIG_BYTES, IPS_TRIG_PACKETS, IPS_TRIG_SEQ } ips_trigger;

typedef struct {
    uint32_t spi;
    uint8_t kind, trigger, dir;
} ips_event;

typedef struct {
    pthread_mutex_t lock;
    ips_event *ring;
    uint32_t cap, head, count;
    uint64_t lost;  /* events that found the queue full */
} ips_events;

int ips_events_init(ips_events *q, uint32_t cap);
void ips_events_free(ips_events *q);
int ips_events_push(ips_events *q, uint32_t spi, uint8_t dir, ips_event_kind kind, ips_trigger trigger); /* -1: full */
uint32_t ips_events_take(ips_events *q, ips_event *out, uint32_t max);
uint64_t ips_events_lost(ips_events *q);
uint32_t ips_events_pending(ips_events *q);

typedef struct {
    uint64_t bytes, packets;  /* IPS_NO_LIMIT: none */
} ips_limits;

typedef struct ips_sa {
    struct ips_sa *next;  /* hash chain of the engine's table */
    uint32_t spi;
    uint8_t dir;
    uint8_t tunnel, esn, udp;
    uint16_t sport, dport;        /* UDP encapsulation (RFC 3948) */
    uint8_t outer_version;        /* tunnel mode: 4 or 6; 0 in transport mode */
    uint8_t outer_src[16], outer_dst[16];
    uint8_t ttl, tos_mask;        /* RFC 4301 §5.1.2.1, RFC 6040 §4.1 */
    int32_t df_flags;             /* RFC 4301 §8.1: -1 copies DF from the inner header */
    ips_cipher cipher;
    uint64_t seq, seq_max, seq_soft;
    ips_replay replay;
    ips_limits soft, hard;
    uint64_t next_bytes, next_packets;
    uint64_t packets, bytes;
    uint64_t drops[IPS_R_COUNT];
    uint8_t soft_fired, dead;
    uint8_t seen;  /* atomic: an IPS_EV_SEEN is queued or taken and not yet re-armed (ips_sa_rearm_seen) */
    ips_events *events;
    pthread_mutex_t lock;
} ips_sa;

typedef struct {
    uint32_t spi;
    uint8_t dir, tunnel, esn, udp;
    uint16_t sport, dport;
    uint8_t outer_version, ttl, copy_dscp, ecn_normal;
    int32_t df_flags;
    uint8_t outer_src[16], outer_dst[16];
    uint32_t replay_window;
    uint64_t seq, replay_top;
    ips_limits soft, hard;
} ips_sa_params;

ips_sa *ips_sa_new(const ips_sa_params *p, const ips_suite *s, const uint8_t *key, ips_events *events,
                   const char **why);
void ips_sa_free(ips_sa *sa);
ips_reason ips_sa_next_seq(ips_sa *sa, uint64_t *seq);
void ips_sa_charge(ips_sa *sa, uint64_t nbytes);
void ips_sa_expire_soft(ips_sa *sa, ips_trigger trigger);
void ips_sa_expire_hard(ips_sa *sa, ips_trigger trigger);
void ips_sa_note_seen(ips_sa *sa);   /* an inbound packet passed: IPS_EV_SEEN unless already told */
void ips_sa_rearm_seen(ips_sa *sa);  /* the owner wants to hear of the next packet (no lock needed) */

/* ---- esp.c ---------------------------------------------------------------------------------- */

/* ESP header location in a received packet: ips_locate() fills it, ips_unprotect() consumes it. */
typedef struct {
    uint8_t version, udp;
    size_t off;       /* the IP payload: ESP header, or the UDP header when udp */
    size_t nh_field;  /* the byte naming the protocol at off */
    size_t end;       /* end of the datagram per its IP header */
    size_t esp_off;
    uint32_t spi;
} ips_located;

/* pkt holds `len` copied bytes of an object `orig` bytes long (len = min(orig, IPS_MAX_DATAGRAM)) */
ips_reason ips_protect(ips_sa *sa, const uint8_t *pkt, size_t len, size_t orig, uint8_t *out, size_t cap,
                       size_t *out_len, const uint8_t *rand16);
ips_reason ips_locate(const uint8_t *pkt, size_t len, size_t orig, ips_located *loc);
ips_reason ips_unprotect(ips_sa *sa, const uint8_t *pkt, const ips_located *loc, uint8_t *out, size_t cap,
                         size_t *out_len);

#endif
