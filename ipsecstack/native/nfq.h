/*
 * The NFQUEUE netlink codec (nfq.c) and the forwarder's queue threads (fwd_nfq.c), ipsecstack issue #10.
 *
 * Theory of operation
 * -------------------
 * Transport mode on the host's own traffic (backends/nfqueue.py) gets its packets from netfilter
 * queues. Python binds each queue (NetfilterQueue) and installs the firewall rules; the bound netlink
 * socket is then handed to the engine (Engine.nfq_start), whose one thread per queue is its only
 * reader. The kernel sends one NFQNL_MSG_PACKET per queued packet (nfnetlink_queue); the packet stays
 * in the kernel until a NFQNL_MSG_VERDICT names its id. The threads answer almost every packet at
 * once (a replacement payload: ESP for the out queue, the plaintext for the in queue) and hand the
 * rest to Python as punts, which Python answers with Engine.nfq_verdict on the same socket.
 *
 * Wire format (<linux/netfilter/nfnetlink_queue.h>): nlmsghdr (host byte order) with type
 * NFNL_SUBSYS_QUEUE << 8 | message, then nfgenmsg (res_id = the queue number, big-endian), then
 * netlink attributes (nla_len, nla_type host order, 4-byte aligned; the values the queue defines are
 * big-endian). The parser reads NFQA_PACKET_HDR (id), NFQA_PAYLOAD, NFQA_CAP_LEN, NFQA_MARK and NFQA_SKB_INFO and
 * skips the others; every length is checked against the bytes received before it is used, and a
 * message that does not add up ends the walk of its datagram (counted by the caller). The builder
 * writes a verdict's header bytes (nlmsghdr, nfgenmsg, NFQA_VERDICT_HDR, NFQA_MARK, the NFQA_PAYLOAD
 * attribute header) so that the payload itself is sent from where it lies, with an iovec.
 */
#ifndef IPSECSTACK_NATIVE_NFQ_H
#define IPSECSTACK_NATIVE_NFQ_H

#include <stddef.h>
#include <stdint.h>

/* the header bytes of one verdict before its payload: 16 + 4 + 12 + 8 + 4 */
#define IPS_NFQ_VERDICT_HDR 44
/* the longest payload an attribute can carry (nla_len is 16 bits) */
#define IPS_NFQ_MAX_PAYLOAD (0xFFFF - 4)
#define IPS_NFQ_DROP 0u   /* NF_DROP */
#define IPS_NFQ_ACCEPT 1u /* NF_ACCEPT */
/* NFQA_SKB_INFO bits, on a queue configured with NFQA_CFG_F_GSO (ips_nfq_config_flags) */
#define IPS_NFQ_SKB_CSUMNOTREADY 1u /* CHECKSUM_PARTIAL: the L4 checksum field holds the pseudo-header sum */
#define IPS_NFQ_SKB_GSO 2u          /* a GSO super-packet (its segment size is not given) */
#define IPS_NFQ_CFG_F_GSO 4u        /* NFQA_CFG_F_GSO: hand GSO packets over whole */

typedef struct {
    uint32_t id;
    uint16_t queue_num, hw_protocol;
    uint8_t hook, has_mark;
    uint32_t mark;
    uint32_t cap_len; /* NFQA_CAP_LEN: the packet's length when the payload was cut short; 0 absent */
    uint32_t skbinfo; /* NFQA_SKB_INFO: IPS_NFQ_SKB_* (0 absent) */
    const uint8_t *payload;
    uint32_t payload_len;
} ips_nfq_packet;

typedef enum {
    IPS_NFQ_END = 0,       /* no more messages in this datagram */
    IPS_NFQ_PACKET,        /* *pkt filled (payload may be NULL: a packet without NFQA_PAYLOAD) */
    IPS_NFQ_BAD_PACKET,    /* a packet message with a readable id but bad attributes: drop that id */
    IPS_NFQ_ERROR,         /* NLMSG_ERROR from the kernel: *err is its errno (0: an acknowledgement) */
    IPS_NFQ_OTHER,         /* a message this codec does not use (skipped) */
    IPS_NFQ_MALFORMED      /* the datagram does not add up: stop walking it */
} ips_nfq_kind;

/* The next message of a received datagram buf[0..len) from *off (start at 0); advances *off. */
ips_nfq_kind ips_nfq_next(const uint8_t *buf, size_t len, size_t *off, ips_nfq_packet *pkt, int *err);

/* A verdict's header bytes into hdr (IPS_NFQ_VERDICT_HDR bytes of room). has_payload: an NFQA_PAYLOAD
 * attribute of payload_len bytes follows (sent from elsewhere, then pad_of(...) zero bytes). Returns
 * the header length, or 0 when payload_len cannot be carried. */
size_t ips_nfq_verdict_hdr(uint8_t *hdr, uint16_t queue_num, uint32_t id, uint32_t verdict, int has_mark,
                           uint32_t mark, int has_payload, size_t payload_len);
/* zero bytes after a message of this many bytes, so the next one starts aligned */
size_t ips_nfq_pad(size_t msg_len);

/* NFQNL_MSG_CONFIG with NFQA_CFG_MASK and NFQA_CFG_FLAGS (the bits of mask set to flags): its length (36). */
size_t ips_nfq_config_flags(uint8_t *buf, uint16_t queue_num, uint32_t flags, uint32_t mask);

/* NFQNL_MSG_CONFIG with NFQA_CFG_PARAMS (NFQNL_COPY_PACKET, range) for queue_num: its length (32). */
size_t ips_nfq_config_copy(uint8_t *buf, uint16_t queue_num, uint32_t range);

#endif
