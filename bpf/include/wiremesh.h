/* SPDX-License-Identifier: Apache-2.0 */
/*
 * wiremesh map ABI: the one place that defines the keys, values and events shared by the tc
 * programs (bpf/src/datapath.bpf.c) and the Rust loader (bpf/src/abi.rs mirrors every struct here with
 * #[repr(C)] and a size assert; change both together).
 *
 * Byte order: identities, prefix lengths, ifindexes, flags and counters are native (host) order;
 * IPv4 addresses are network order (as on the wire); ports are network order in the policy rule
 * key (so that an LPM prefix of the port is its leading bits) and in flow keys/events.
 * The policy maps are exactly what the wiremesh-policy compiler emits (docs/policy.md).
 */
#ifndef WIREMESH_H
#define WIREMESH_H

#include <linux/types.h>

/* Reserved identities (docs/policy.md). */
#define WM_ID_UNKNOWN 0u
#define WM_ID_HOST 1u
#define WM_ID_WORLD 2u
#define WM_ID_REMOTE_NODE 3u
#define WM_ID_ANY 4u
#define WM_ID_FIRST_POD 256u
#define WM_ID_FIRST_CIDR (1u << 24)

/* Direction relative to the subject pod. */
#define WM_DIR_INGRESS 0
#define WM_DIR_EGRESS 1

/* Key of every IPv4 LPM trie (ipcache4, cidrs4): 8 bytes. */
struct wm_lpm4_key {
	__u32 prefixlen;
	__u8 addr[4]; /* network order */
};

/* Key of every IPv6 LPM trie (ipcache6, cidrs6): 20 bytes. */
struct wm_lpm6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* ipcache4 / ipcache6 value flags. */
#define WM_IPCACHE_ENCRYPT 0x1    /* traffic to this prefix goes through the tunnel */
#define WM_IPCACHE_LOCAL 0x2      /* a pod on this node */
#define WM_IPCACHE_REMOTE_POD 0x4 /* a pod (or pod range) on another node */
/* A node's own address (/32): identity WM_ID_HOST for this node, WM_ID_REMOTE_NODE for another.
 * Never a pod address, also when it lies inside a pod CIDR (the longest match wins), so strict
 * mode never drops node-to-node traffic such as WireGuard. */
#define WM_IPCACHE_NODE 0x8

/* ipcache4: prefix -> where it lives and who it is. 16 bytes. */
struct wm_ipcache_val {
	__u32 identity; /* pod identity, or a reserved one; 0 = unknown (treated as world) */
	__u32 node_id;  /* agent-assigned node number (0 = this node / none) */
	__be32 node_ip; /* underlay IPv4 of the node hosting the prefix, network order */
	__u8 flags;     /* WM_IPCACHE_* */
	__u8 pad[3];
};

/* isolated: (identity, direction) present = default deny. Value: __u8 (1). 8 bytes. */
struct wm_isolation_key {
	__u32 identity;
	__u8 direction;
	__u8 pad[3];
};

/* Bits of a rule key before the port: subject, peer, direction, protocol. */
#define WM_RULE_KEY_FIXED_BITS 80

/* rules (LPM trie): prefixlen = 80 + port prefix bits. Value: __u8 (1). 16 bytes. */
struct wm_rule_key {
	__u32 prefixlen;
	__u32 subject;
	__u32 peer;
	__u8 direction;
	__u8 protocol;
	__be16 port;
};

/* cidrs4: wm_lpm4_key -> __u32 CIDR identity (or WM_ID_WORLD). */

#define WM_MODE_PERMISSIVE 0
#define WM_MODE_STRICT 1

/* wm_config.flags */
#define WM_CONFIG_SET 0x1 /* written by an agent (the loader's Config::new sets it) */

/* Conntrack lifetimes when the config leaves them 0 (seconds of idleness). */
#define WM_CT_TCP_TIMEOUT_S 21600 /* 6 h, as Cilium's established TCP */
#define WM_CT_OTHER_TIMEOUT_S 60  /* UDP, SCTP, ICMP, ... */

/*
 * config: array with one entry (key 0). 32 bytes. An array entry that was never written reads
 * as all zeros: without WM_CONFIG_SET the programs act as strict mode with no tunnel (fail
 * closed for cross-node plaintext) and default conntrack lifetimes.
 */
struct wm_config {
	__u32 tunnel_ifindex; /* 0 = no tunnel device yet */
	__u32 mode;           /* WM_MODE_* */
	__u32 node_identity;  /* identity of this node (WM_ID_HOST); 0 = WM_ID_HOST */
	__u16 wg_port;        /* WireGuard UDP port, host order (information: node addresses are
			       * exempt from strict mode by their ipcache entries, not by port) */
	__u16 pad;
	__u32 ct_tcp_timeout_s;   /* idle lifetime of TCP conntrack entries; 0 = default */
	__u32 ct_other_timeout_s; /* idle lifetime of other conntrack entries; 0 = default */
	__u32 flags;              /* WM_CONFIG_* */
	__u32 reserved;
};

/*
 * endpoints (hash): ifindex of the host side of a pod veth -> the pod's addresses. from_pod
 * drops a packet whose source is not the pod's own address (anti-spoofing; for IPv6 also
 * link-local and unspecified sources, but only towards on-link destinations or in neighbour
 * discovery); an interface
 * without an entry is not checked. An entry also tells to_pod that a packet which entered the
 * node on that interface was decided by from_pod (a known pod veth); a claimed local pod source
 * that did not is not trusted. 24 bytes.
 */
struct wm_endpoint_val {
	__be32 ip4;    /* the pod's IPv4 (network order); 0 = the pod has none */
	__u8 ip6[16];  /* the pod's IPv6; all zero = the pod has none */
	__u32 flags;   /* WM_EP_* */
};

/* wm_endpoint_val.flags: a new veth whose pod the agent cannot name yet while policy isolates a
 * local pod without entries: from_pod and to_pod drop every IP packet on it (fail closed) until
 * the agent writes the pod's entry. */
#define WM_EP_PENDING 0x1

/*
 * frags (LRU hash): the ports of the first fragment of a fragmented datagram, so that its later
 * fragments (which carry no L4 header) are decided with the same tuple. IPv4 addresses in the
 * first 4 bytes of src/dst. Key 40 bytes, value 4 bytes.
 */
struct wm_frag_key {
	__u8 src[16];
	__u8 dst[16];
	__be32 id; /* IPv4 identification (16 bits) or IPv6 fragment identification */
	__u8 protocol;
	__u8 family; /* 4 or 6 */
	__u8 pad[2];
};

struct wm_frag_val {
	__be16 src_port;
	__be16 dst_port;
};

/*
 * policy_epoch: array with one u32 (key 0), incremented by the loader after every change of
 * the policy maps or the ipcache. A conntrack entry remembers the epoch it was decided in;
 * packets of a flow decided in the current epoch skip the policy lookups.
 */

/* Verdicts in flow events. */
#define WM_VERDICT_FORWARDED_ENCRYPTED 1 /* redirected into (or arrived from) the tunnel */
#define WM_VERDICT_FORWARDED_LOCAL 2     /* pod to pod on this node */
#define WM_VERDICT_DROPPED_POLICY 3
#define WM_VERDICT_DROPPED_PLAINTEXT 4   /* strict mode: cross-node pod traffic outside WireGuard */
#define WM_VERDICT_FORWARDED_PLAIN 5     /* passed unencrypted: non-pod peer, or permissive mode */
/* Larger than the tunnel MTU: handed to the routing stack instead of the tunnel; the kernel answers
 * with a PMTU error (DF set / IPv6) or fragments it into the tunnel. Never sent in plaintext. */
#define WM_VERDICT_TOO_BIG 6
/* A spoofed source (not the pod behind the veth) is reported as WM_VERDICT_DROPPED_POLICY. */

/* Program that reported a flow. */
#define WM_HOOK_FROM_POD 1
#define WM_HOOK_TO_POD 2
#define WM_HOOK_UNDERLAY_INGRESS 3
#define WM_HOOK_UNDERLAY_EGRESS 4

/*
 * Ring buffer record (events). One per flow and verdict when the flow is first seen, then at
 * most one per WM_FLOW_REPORT_NS carrying the packets/bytes since the previous record. 56 bytes.
 */
struct wm_flow_event {
	__u64 ts_ns;   /* bpf_ktime_get_ns() */
	__u64 packets; /* since the previous record of this flow */
	__u64 bytes;
	__be32 src_ip;
	__be32 dst_ip;
	__u32 src_identity;
	__u32 dst_identity;
	__be32 peer_node_ip; /* underlay IPv4 of the remote node, 0 if none */
	__u32 ifindex;       /* device the program ran on */
	__be16 src_port;
	__be16 dst_port;
	__u8 protocol;
	__u8 verdict; /* WM_VERDICT_* */
	__u8 hook;    /* WM_HOOK_* */
	__u8 pad;
};

/*
 * The IPv6 record in the same ring (told apart by its size, 80 bytes). Same semantics as
 * wm_flow_event; family is 6.
 */
struct wm_flow_event6 {
	__u64 ts_ns;
	__u64 packets;
	__u64 bytes;
	__u8 src_ip[16];
	__u8 dst_ip[16];
	__u32 src_identity;
	__u32 dst_identity;
	__be32 peer_node_ip; /* underlay IPv4 of the remote node, 0 if none */
	__u32 ifindex;
	__be16 src_port;
	__be16 dst_port;
	__u8 protocol;
	__u8 verdict;
	__u8 hook;
	__u8 family; /* 6 */
};

/* flows6 (LRU hash): aggregation state of IPv6 flows. 44 bytes. */
struct wm_flow6_key {
	__u8 src_ip[16];
	__u8 dst_ip[16];
	__be16 src_port;
	__be16 dst_port;
	__u8 protocol;
	__u8 verdict;
	__u8 hook;
	__u8 pad;
	__u32 ifindex;
};

/* flows (LRU hash): aggregation state per flow and verdict. */
struct wm_flow_key {
	__be32 src_ip;
	__be32 dst_ip;
	__be16 src_port;
	__be16 dst_port;
	__u8 protocol;
	__u8 verdict;
	__u8 hook;
	__u8 pad;
	__u32 ifindex;
}; /* 20 bytes */

struct wm_flow_state {
	__u64 last_report_ns;
	__u64 packets; /* not yet reported */
	__u64 bytes;
}; /* 24 bytes */

#define WM_FLOW_REPORT_NS 1000000000ULL

/* stats: per-CPU array with one entry (key 0); the loader sums the CPUs. 8 bytes. */
struct wm_stats {
	__u64 events_lost; /* flow records dropped because the ring buffer was full */
};

/*
 * ct (LRU hash): connections whose first direction policy allowed. A packet whose reversed
 * tuple is present and alive is a reply and skips policy (NetworkPolicy allows replies); a
 * packet whose own tuple is alive and decided in the current policy epoch skips the lookups.
 * An entry is alive while its last use is younger than the protocol's lifetime (wm_config);
 * allowed packets and replies refresh it. 16 bytes.
 */
struct wm_ct_key {
	__be32 src_ip;
	__be32 dst_ip;
	__be16 src_port;
	__be16 dst_port;
	__u8 protocol;
	__u8 pad[3];
};

struct wm_ct_val {
	__u64 last_ns; /* bpf_ktime_get_ns() of the last use */
	__u32 epoch;   /* policy epoch of the decision */
	__u32 flags;   /* WM_CT_* */
}; /* 16 bytes */

/* wm_ct_val.flags: a TCP FIN or RST passed; the entry lives at most WM_CT_TCP_CLOSE_TIMEOUT_S
 * idle (a SYN on the same tuple clears it). */
#define WM_CT_CLOSING 0x1
#define WM_CT_TCP_CLOSE_TIMEOUT_S 10

/* ct6 (LRU hash): the IPv6 conntrack, same semantics and value as ct. 40 bytes. */
struct wm_ct6_key {
	__u8 src_ip[16];
	__u8 dst_ip[16];
	__be16 src_port;
	__be16 dst_port;
	__u8 protocol;
	__u8 pad[3];
};

/*
 * stats6: per-CPU array with one entry (key 0): IPv6 packets by verdict (besides the flow
 * records). Index WM_VERDICT_* (1..6); 0 counts spoofed sources. 64 bytes.
 */
struct wm_stats6 {
	__u64 by_verdict[8];
};
#define WM_STATS6_SPOOFED 0

/* A refresh writes last_ns at most this often (fewer writes to a shared cache line). */
#define WM_CT_REFRESH_NS 100000000ULL

#endif /* WIREMESH_H */
