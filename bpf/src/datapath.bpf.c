// SPDX-License-Identifier: GPL-2.0
/*
 * wiremesh tc programs: steering, NetworkPolicy and strict mode for pod traffic.
 *
 * from_pod  (tc ingress, host side of a pod veth): egress policy of the source pod; for a local
 *           destination also its ingress policy (one decision, one flow record); a remote pod
 *           destination with the encrypt flag is redirected into the tunnel device, unless
 *           the packet (or a GSO segment of it) is larger than the tunnel's MTU: such a packet
 *           goes to the routing stack, whose routes send remote pod CIDRs into the tunnel, so
 *           the kernel answers ICMP "fragmentation needed" / "packet too big" (PMTU) or
 *           fragments it, as for any smaller-MTU hop (a redirect would skip that and the
 *           packet would be lost in the tunnel).
 * to_pod    (tc egress, host side of a pod veth): ingress policy of the destination pod for
 *           traffic that did not enter the node on a known pod veth (from_pod decided those);
 *           the source is judged by its ingress interface, not its address: traffic this node
 *           generated is the host (always allowed to its pods, e.g. kubelet probes and PMTU
 *           errors), a local pod address arriving elsewhere is world.
 * underlay  (tc ingress and egress of the node's underlay device): in strict mode drops
 *           pod-to-pod packets (both addresses pods in the ipcache), whatever their ports;
 *           node addresses (their own /32 entries) are never pod addresses, so WireGuard
 *           between nodes passes.
 * Conntrack (wm_ct) remembers allowed flows for their idle lifetime (wm_config), so replies
 * pass and packets of a flow decided in the current policy epoch skip the policy lookups.
 * Anti-spoofing: from_pod drops a source address that is not the pod's own (wm_endpoints).
 * A veth whose entry is pending (WM_EP_PENDING) drops every IP packet both ways.
 * Fragments: later fragments take the ports of their datagram's first fragment (wm_frags).
 * Never-written config = strict mode without a tunnel (fail closed).
 * IPv4 and IPv6 alike (ipcache6, cidrs6, ct6, flows6 and 80-byte records in the same ring;
 * IPv6 verdicts are also counted in wm_stats6). On-link IPv6 (link-local, multicast: neighbour
 * discovery) passes.
 * Other traffic (ARP, ...) passes untouched.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "wiremesh.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct wm_lpm4_key);
	__type(value, struct wm_ipcache_val);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_ipcache4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct wm_lpm4_key);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_cidrs4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct wm_isolation_key);
	__type(value, __u8);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_isolated SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct wm_rule_key);
	__type(value, __u8);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct wm_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct wm_flow_key);
	__type(value, struct wm_flow_state);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct wm_ct_key);
	__type(value, struct wm_ct_val);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct wm_stats);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct wm_endpoint_val);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_policy_epoch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct wm_lpm6_key);
	__type(value, struct wm_ipcache_val);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_ipcache6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct wm_lpm6_key);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_cidrs6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct wm_ct6_key);
	__type(value, struct wm_ct_val);
	__uint(max_entries, 65536); /* preallocated: 262144 like wm_ct would cost ~30 MiB */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_ct6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct wm_flow6_key);
	__type(value, struct wm_flow_state);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_flows6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct wm_stats6);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_stats6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct wm_frag_key);
	__type(value, struct wm_frag_val);
	__uint(max_entries, 8192);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wm_frags SEC(".maps");

/* One packet's tuple; IPv4 addresses in src_ip/dst_ip, IPv6 ones in src6/dst6. */
struct pkt {
	__be32 src_ip;
	__be32 dst_ip;
	__be16 src_port;
	__be16 dst_port;
	__u8 protocol;
	__u8 v6;
	__u8 nd;        /* ICMPv6 neighbour discovery (RS, RA, NS, NA, redirect) */
	__u8 tcp_flags; /* FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10 */
	__u8 too_big;   /* ICMP fragmentation needed (3/4) or ICMPv6 packet too big (2) */
	__u8 pad[3];
	__u8 src6[16];
	__u8 dst6[16];
};

static __always_inline int is_l4(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* Fills the ports of p from an L4 header at l4, if it is in the packet. */
static __always_inline void parse_ports(struct pkt *p, void *l4, void *data_end)
{
	__be16 *ports = l4;
	if ((void *)(ports + 2) > data_end)
		return;
	p->src_port = ports[0];
	p->dst_port = ports[1];
	__u8 *tcp = l4;
	if (p->protocol == IPPROTO_TCP && (void *)(tcp + 14) <= data_end)
		p->tcp_flags = tcp[13];
}

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* The WM_CT_CLOSING state p leaves a connection in, given the entry's current flags. */
static __always_inline __u32 ct_flags_after(const struct pkt *p, __u32 flags)
{
	if (p->protocol != IPPROTO_TCP)
		return flags;
	if (p->tcp_flags & (TCP_FIN | TCP_RST))
		return flags | WM_CT_CLOSING;
	if ((p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
		return flags & ~WM_CT_CLOSING; /* a new connection on the same tuple */
	return flags;
}

/* The key of the fragmented datagram p belongs to (identification id). */
static __always_inline void frag_key(struct wm_frag_key *k, const struct pkt *p, __be32 id)
{
	__builtin_memset(k, 0, sizeof(*k));
	if (p->v6) {
		__builtin_memcpy(k->src, p->src6, 16);
		__builtin_memcpy(k->dst, p->dst6, 16);
		k->family = 6;
	} else {
		__builtin_memcpy(k->src, &p->src_ip, 4);
		__builtin_memcpy(k->dst, &p->dst_ip, 4);
		k->family = 4;
	}
	k->id = id;
	k->protocol = p->protocol;
}

/* A first fragment with its ports: remember them for the datagram's later fragments. */
static __always_inline void frag_remember(const struct pkt *p, __be32 id)
{
	if (!is_l4(p->protocol) || (!p->src_port && !p->dst_port))
		return;
	struct wm_frag_key k;
	frag_key(&k, p, id);
	struct wm_frag_val v = {.src_port = p->src_port, .dst_port = p->dst_port};
	bpf_map_update_elem(&wm_frags, &k, &v, BPF_ANY);
}

/* A later fragment: the ports its first fragment carried (0 when that was not seen). */
static __always_inline void frag_ports(struct pkt *p, __be32 id)
{
	if (!is_l4(p->protocol))
		return;
	struct wm_frag_key k;
	frag_key(&k, p, id);
	struct wm_frag_val *v = bpf_map_lookup_elem(&wm_frags, &k);
	if (!v)
		return;
	p->src_port = v->src_port;
	p->dst_port = v->dst_port;
}

/*
 * Returns 0 and fills *p for an IPv4 or IPv6 packet behind an Ethernet header, -1 otherwise.
 * A fragmented datagram's later fragments get the ports of its first fragment (wm_frags; port 0
 * when the first fragment was not seen before them). IPv6 extension headers other than a
 * fragment header are not walked (ports 0, the header's protocol number).
 */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__builtin_memset(p, 0, sizeof(*p));
	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return -1;
		p->v6 = 1;
		__builtin_memcpy(p->src6, &ip6->saddr, 16);
		__builtin_memcpy(p->dst6, &ip6->daddr, 16);
		p->protocol = ip6->nexthdr;
		void *l4 = ip6 + 1;
		if (ip6->nexthdr == IPPROTO_FRAGMENT) {
			struct frag_hdr {
				__u8 nexthdr;
				__u8 reserved;
				__be16 frag_off;
				__be32 identification;
			} *fh = l4;
			if ((void *)(fh + 1) > data_end)
				return 0;
			p->protocol = fh->nexthdr;
			if (fh->frag_off & bpf_htons(0xfff8)) {
				frag_ports(p, fh->identification);
				return 0;
			}
			l4 = fh + 1;
			if (is_l4(p->protocol))
				parse_ports(p, l4, data_end);
			if (fh->frag_off & bpf_htons(0x0001))
				frag_remember(p, fh->identification);
		} else if (is_l4(p->protocol)) {
			parse_ports(p, l4, data_end);
		}
		if (p->protocol == IPPROTO_ICMPV6 && l4 + 1 <= data_end) {
			__u8 type = *(__u8 *)l4;
			p->nd = type >= 133 && type <= 137;
			p->too_big = type == 2;
		}
		return 0;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->version != 4)
		return -1;
	p->src_ip = ip->saddr;
	p->dst_ip = ip->daddr;
	p->protocol = ip->protocol;
	if (ip->frag_off & bpf_htons(0x1fff)) {
		frag_ports(p, ip->id);
		return 0;
	}
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return -1;
	if (is_l4(ip->protocol))
		parse_ports(p, (void *)ip + ihl, data_end);
	if (ip->frag_off & bpf_htons(0x2000))
		frag_remember(p, ip->id);
	if (ip->protocol == IPPROTO_ICMP) {
		__u8 *icmp = (void *)ip + ihl;
		if ((void *)(icmp + 2) <= data_end)
			p->too_big = icmp[0] == 3 && icmp[1] == 4;
	}
	return 0;
}

/* Link-local (fe80::/10), multicast (ff00::/8) or unspecified: neighbour discovery and other
 * on-link IPv6 that is not pod-to-pod traffic. */
static __always_inline int v6_on_link(const __u8 *a)
{
	if (a[0] == 0xff || (a[0] == 0xfe && (a[1] & 0xc0) == 0x80))
		return 1;
	__u64 hi, lo;
	__builtin_memcpy(&hi, a, 8);
	__builtin_memcpy(&lo, a + 8, 8);
	return hi == 0 && lo == 0;
}

/* Idle lifetime of a conntrack entry of protocol proto. */
static __always_inline __u64 ct_lifetime_ns(const struct wm_config *cfg, __u8 proto)
{
	__u32 s;
	if (proto == IPPROTO_TCP)
		s = cfg->ct_tcp_timeout_s ? cfg->ct_tcp_timeout_s : WM_CT_TCP_TIMEOUT_S;
	else
		s = cfg->ct_other_timeout_s ? cfg->ct_other_timeout_s : WM_CT_OTHER_TIMEOUT_S;
	return (__u64)s * 1000000000ULL;
}

/* Conntrack state of one packet, gathered once per program run. */
struct ct {
	__u64 now;
	__u64 lifetime;
	__u32 epoch;
	struct wm_ct_val *fwd; /* entry of the packet's own tuple, if alive */
};

static __always_inline int ct_alive(const struct ct *c, const struct wm_ct_val *v)
{
	__u64 lifetime = c->lifetime;
	if ((v->flags & WM_CT_CLOSING) && lifetime > WM_CT_TCP_CLOSE_TIMEOUT_S * 1000000000ULL)
		lifetime = WM_CT_TCP_CLOSE_TIMEOUT_S * 1000000000ULL;
	/* A last_ns in the future (another CPU just refreshed it) counts as alive. */
	return c->now < v->last_ns || c->now - v->last_ns <= lifetime;
}

/* A packet of a live entry passed: refresh its last use and its TCP closing state. */
static __always_inline void ct_refresh(const struct ct *c, struct wm_ct_val *v,
				       const struct pkt *p)
{
	if (c->now > v->last_ns && c->now - v->last_ns >= WM_CT_REFRESH_NS)
		v->last_ns = c->now;
	__u32 flags = ct_flags_after(p, v->flags);
	if (flags != v->flags)
		v->flags = flags;
}

/* The conntrack key of p's tuple (reversed: of its reply) in the map of p's family. */
union ct_key {
	struct wm_ct_key v4;
	struct wm_ct6_key v6;
};

static __always_inline void ct_key(union ct_key *k, const struct pkt *p, int reversed)
{
	__builtin_memset(k, 0, sizeof(*k));
	__be16 sport = reversed ? p->dst_port : p->src_port;
	__be16 dport = reversed ? p->src_port : p->dst_port;
	if (p->v6) {
		__builtin_memcpy(k->v6.src_ip, reversed ? p->dst6 : p->src6, 16);
		__builtin_memcpy(k->v6.dst_ip, reversed ? p->src6 : p->dst6, 16);
		k->v6.src_port = sport;
		k->v6.dst_port = dport;
		k->v6.protocol = p->protocol;
		return;
	}
	k->v4.src_ip = reversed ? p->dst_ip : p->src_ip;
	k->v4.dst_ip = reversed ? p->src_ip : p->dst_ip;
	k->v4.src_port = sport;
	k->v4.dst_port = dport;
	k->v4.protocol = p->protocol;
}

static __always_inline struct wm_ct_val *ct_lookup(const struct pkt *p, int reversed)
{
	union ct_key k;
	ct_key(&k, p, reversed);
	return p->v6 ? bpf_map_lookup_elem(&wm_ct6, &k.v6) : bpf_map_lookup_elem(&wm_ct, &k.v4);
}

static __always_inline void ct_insert(const struct pkt *p, const struct wm_ct_val *v)
{
	union ct_key k;
	ct_key(&k, p, 0);
	if (p->v6)
		bpf_map_update_elem(&wm_ct6, &k.v6, v, BPF_ANY);
	else
		bpf_map_update_elem(&wm_ct, &k.v4, v, BPF_ANY);
}

/*
 * Policy now denies a flow that has an entry (decided in an earlier epoch, or expired): remove
 * it so its replies stop passing too.
 */
static __always_inline void ct_forget(const struct ct *c, const struct pkt *p)
{
	if (!c->fwd)
		return;
	union ct_key k;
	ct_key(&k, p, 0);
	if (p->v6)
		bpf_map_delete_elem(&wm_ct6, &k.v6);
	else
		bpf_map_delete_elem(&wm_ct, &k.v4);
}

/*
 * Looks up the packet's own tuple. Returns 1 when it belongs to a live flow decided in the
 * current policy epoch (the decision stands; the entry is refreshed).
 */
static __always_inline int ct_decided(struct ct *c, const struct wm_config *cfg,
				      const struct pkt *p)
{
	__u32 zero = 0;
	__u32 *epoch = bpf_map_lookup_elem(&wm_policy_epoch, &zero);
	c->epoch = epoch ? *epoch : 0;
	c->now = bpf_ktime_get_ns();
	c->lifetime = ct_lifetime_ns(cfg, p->protocol);
	struct wm_ct_val *v = ct_lookup(p, 0);
	c->fwd = v;
	if (!v || !ct_alive(c, v) || v->epoch != c->epoch)
		return 0;
	ct_refresh(c, v, p);
	return 1;
}

/* Whether p is a reply of a live connection policy allowed earlier (refreshes it). */
static __always_inline int ct_is_reply(const struct ct *c, const struct pkt *p)
{
	struct wm_ct_val *v = ct_lookup(p, 1);
	if (!v || !ct_alive(c, v))
		return 0;
	ct_refresh(c, v, p);
	return 1;
}

/* Records that policy allowed p's direction now, in the current epoch. */
static __always_inline void ct_allow(const struct ct *c, const struct pkt *p)
{
	struct wm_ct_val *v = c->fwd;
	if (v) {
		/* An expired entry starts over; a live one (new epoch) keeps its TCP state. */
		__u32 flags = ct_alive(c, v) ? v->flags : 0;
		v->last_ns = c->now;
		v->epoch = c->epoch;
		v->flags = ct_flags_after(p, flags);
		return;
	}
	struct wm_ct_val fresh = {
		.last_ns = c->now,
		.epoch = c->epoch,
		.flags = ct_flags_after(p, 0),
	};
	ct_insert(p, &fresh);
}

/* The ipcache entry of p's source (or destination). */
static __always_inline struct wm_ipcache_val *ipcache_lookup(const struct pkt *p, int src)
{
	if (p->v6) {
		struct wm_lpm6_key k = {.prefixlen = 128};
		__builtin_memcpy(k.addr, src ? p->src6 : p->dst6, 16);
		return bpf_map_lookup_elem(&wm_ipcache6, &k);
	}
	struct wm_lpm4_key k = {.prefixlen = 32};
	__be32 addr = src ? p->src_ip : p->dst_ip;
	__builtin_memcpy(k.addr, &addr, 4);
	return bpf_map_lookup_elem(&wm_ipcache4, &k);
}

/* The CIDR identity of p's source (or destination), if any. */
static __always_inline __u32 *cidr_lookup(const struct pkt *p, int src)
{
	if (p->v6) {
		struct wm_lpm6_key k = {.prefixlen = 128};
		__builtin_memcpy(k.addr, src ? p->src6 : p->dst6, 16);
		return bpf_map_lookup_elem(&wm_cidrs6, &k);
	}
	struct wm_lpm4_key k = {.prefixlen = 32};
	__be32 addr = src ? p->src_ip : p->dst_ip;
	__builtin_memcpy(k.addr, &addr, 4);
	return bpf_map_lookup_elem(&wm_cidrs4, &k);
}

static __always_inline __u32 identity_of(const struct wm_ipcache_val *v)
{
	if (!v || v->identity == WM_ID_UNKNOWN)
		return WM_ID_WORLD;
	return v->identity;
}

static __always_inline int is_pod(__u32 id)
{
	return id >= WM_ID_FIRST_POD && id < WM_ID_FIRST_CIDR;
}

static __always_inline int rule_hit(struct wm_rule_key *k, __u32 peer)
{
	k->peer = peer;
	return bpf_map_lookup_elem(&wm_rules, k) != 0;
}

/*
 * One side of the decision (docs/policy.md): subject is the pod whose policy applies, peer the
 * other end of p (its identity; its address is p's source for ingress, destination for
 * egress).
 */
static __always_inline int side_allows(__u32 subject, __u32 peer_id, const struct pkt *p,
				       __u8 dir)
{
	__u8 proto = p->protocol;
	__be16 port = p->dst_port;
	if (!is_pod(subject))
		return 1;
	struct wm_isolation_key ik = {.identity = subject, .direction = dir};
	if (!bpf_map_lookup_elem(&wm_isolated, &ik))
		return 1;
	struct wm_rule_key rk = {
		.prefixlen = WM_RULE_KEY_FIXED_BITS + 16,
		.subject = subject,
		.direction = dir,
		.protocol = proto,
		.port = port,
	};
	if (is_pod(peer_id) && rule_hit(&rk, peer_id))
		return 1;
	__u32 *cidr = cidr_lookup(p, dir == WM_DIR_INGRESS);
	if (cidr && *cidr != WM_ID_WORLD && rule_hit(&rk, *cidr))
		return 1;
	return rule_hit(&rk, WM_ID_ANY);
}

/*
 * Accounts one packet of the flow `key` in `flows` (creating its state). Returns 1 with the
 * packets/bytes to report when a record is due (the flow's first packet, then at most once per
 * WM_FLOW_REPORT_NS), 0 otherwise.
 */
static __always_inline int flow_due(void *flows, const void *key, __u64 now, __u32 len,
				    __u64 *packets, __u64 *bytes)
{
	*packets = 1;
	*bytes = len;
	struct wm_flow_state *st = bpf_map_lookup_elem(flows, key);
	if (!st) {
		struct wm_flow_state fresh = {.last_report_ns = now};
		bpf_map_update_elem(flows, key, &fresh, BPF_NOEXIST);
		return 1;
	}
	__sync_fetch_and_add(&st->packets, 1);
	__sync_fetch_and_add(&st->bytes, len);
	if (now - st->last_report_ns < WM_FLOW_REPORT_NS)
		return 0;
	/* Races between CPUs can move a few packets to the next record; none are lost. */
	st->last_report_ns = now;
	*packets = __sync_fetch_and_add(&st->packets, 0);
	*bytes = __sync_fetch_and_add(&st->bytes, 0);
	__sync_fetch_and_add(&st->packets, -*packets);
	__sync_fetch_and_add(&st->bytes, -*bytes);
	return 1;
}

static __always_inline void event_lost(void)
{
	__u32 zero = 0;
	struct wm_stats *s = bpf_map_lookup_elem(&wm_stats, &zero);
	if (s)
		s->events_lost += 1; /* per-CPU: no atomics needed */
}

/* The fields wm_flow_event and wm_flow_event6 share, from report's locals. */
#define FILL_EVENT(e)                                                                              \
	do {                                                                                       \
		(e)->ts_ns = now;                                                                  \
		(e)->packets = packets;                                                            \
		(e)->bytes = bytes;                                                                \
		(e)->src_identity = src_id;                                                        \
		(e)->dst_identity = dst_id;                                                        \
		(e)->peer_node_ip = peer_node;                                                     \
		(e)->ifindex = skb->ifindex;                                                       \
		(e)->src_port = p->src_port;                                                       \
		(e)->dst_port = p->dst_port;                                                       \
		(e)->protocol = p->protocol;                                                       \
		(e)->verdict = verdict;                                                            \
		(e)->hook = hook;                                                                  \
	} while (0)

static __always_inline void report6(struct __sk_buff *skb, const struct pkt *p, __u32 src_id,
				    __u32 dst_id, __be32 peer_node, __u8 verdict, __u8 hook)
{
	__u32 zero = 0;
	struct wm_stats6 *s6 = bpf_map_lookup_elem(&wm_stats6, &zero);
	if (s6 && verdict < 8)
		s6->by_verdict[verdict] += 1; /* per-CPU */
	if (verdict == WM_STATS6_SPOOFED)
		return;
	__u64 now = bpf_ktime_get_ns(), packets, bytes;
	struct wm_flow6_key fk = {
		.src_port = p->src_port,
		.dst_port = p->dst_port,
		.protocol = p->protocol,
		.verdict = verdict,
		.hook = hook,
		.ifindex = skb->ifindex,
	};
	__builtin_memcpy(fk.src_ip, p->src6, 16);
	__builtin_memcpy(fk.dst_ip, p->dst6, 16);
	if (!flow_due(&wm_flows6, &fk, now, skb->len, &packets, &bytes))
		return;
	struct wm_flow_event6 *e = bpf_ringbuf_reserve(&wm_events, sizeof(*e), 0);
	if (!e) {
		event_lost();
		return;
	}
	FILL_EVENT(e);
	__builtin_memcpy(e->src_ip, p->src6, 16);
	__builtin_memcpy(e->dst_ip, p->dst6, 16);
	e->family = 6;
	bpf_ringbuf_submit(e, 0);
}

/* Aggregates per flow and verdict in wm_flows/wm_flows6; writes a record when due. */
static __always_inline void report(struct __sk_buff *skb, const struct pkt *p, __u32 src_id,
				   __u32 dst_id, __be32 peer_node, __u8 verdict, __u8 hook)
{
	if (p->v6) {
		report6(skb, p, src_id, dst_id, peer_node, verdict, hook);
		return;
	}
	__u64 now = bpf_ktime_get_ns(), packets, bytes;
	struct wm_flow_key fk = {
		.src_ip = p->src_ip,
		.dst_ip = p->dst_ip,
		.src_port = p->src_port,
		.dst_port = p->dst_port,
		.protocol = p->protocol,
		.verdict = verdict,
		.hook = hook,
		.ifindex = skb->ifindex,
	};
	if (!flow_due(&wm_flows, &fk, now, skb->len, &packets, &bytes))
		return;
	struct wm_flow_event *e = bpf_ringbuf_reserve(&wm_events, sizeof(*e), 0);
	if (!e) {
		event_lost();
		return;
	}
	FILL_EVENT(e);
	e->src_ip = p->src_ip;
	e->dst_ip = p->dst_ip;
	e->pad = 0;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline struct wm_config *config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&wm_config, &zero);
}

/* Strict handling: configured so, or never configured (fail closed). */
static __always_inline int strict(const struct wm_config *cfg)
{
	return cfg->mode == WM_MODE_STRICT || !(cfg->flags & WM_CONFIG_SET);
}

/* The identity of this node (WM_ID_HOST unless the config names another). */
static __always_inline __u32 host_identity(const struct wm_config *cfg)
{
	return cfg->node_identity ? cfg->node_identity : WM_ID_HOST;
}

/* The anti-spoofing entry of the pod veth with this ifindex (0: none). */
static __always_inline struct wm_endpoint_val *endpoint(__u32 ifindex)
{
	if (!ifindex)
		return 0;
	return bpf_map_lookup_elem(&wm_endpoints, &ifindex);
}

/* Whether the source of p may leave the pod whose veth entry is ep (anti-spoofing). */
static __always_inline int source_ok(const struct wm_endpoint_val *ep, const struct pkt *p)
{
	if (!ep)
		return 1;
	if (!p->v6)
		return ep->ip4 == p->src_ip;
	/* Link-local and unspecified sources only on the link (neighbour discovery, DAD), so
	 * they cannot stand in for the pod's address towards the node; never a multicast one. */
	if (v6_on_link(p->src6))
		return p->src6[0] != 0xff && (p->nd || v6_on_link(p->dst6));
	__u64 a[2], b[2];
	__builtin_memcpy(a, p->src6, 16);
	__builtin_memcpy(b, ep->ip6, 16);
	return (b[0] | b[1]) && a[0] == b[0] && a[1] == b[1];
}

/*
 * Whether the packet, or each segment of a GSO packet, fits the tunnel device's MTU (read
 * live from the device, so an MTU change needs no config write). skb->len counts the
 * Ethernet header of the veth, the tunnel has none: the plain check subtracts it; the
 * segment check works on L3 lengths and takes no length adjustment. An error (no such
 * device) counts as fitting: the redirect behaves as before.
 */
static __always_inline int fits_tunnel(struct __sk_buff *skb, __u32 tunnel)
{
	__u32 mtu_len = 0;
	long r;
	if (skb->gso_size)
		r = bpf_check_mtu(skb, tunnel, &mtu_len, 0, BPF_MTU_CHK_SEGS);
	else
		r = bpf_check_mtu(skb, tunnel, &mtu_len, -ETH_HLEN, 0);
	return r <= 0;
}

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	struct pkt p;
	if (parse(skb, &p) < 0)
		return TC_ACT_OK;
	struct wm_config *cfg = config();
	if (!cfg)
		return TC_ACT_OK;
	struct wm_ipcache_val *src = ipcache_lookup(&p, 1);
	struct wm_ipcache_val *dst = ipcache_lookup(&p, 0);
	__u32 src_id = identity_of(src), dst_id = identity_of(dst);
	__u8 dst_flags = dst ? dst->flags : 0;
	__be32 peer_node = (dst && (dst_flags & WM_IPCACHE_REMOTE_POD)) ? dst->node_ip : 0;
	struct wm_endpoint_val *ep = endpoint(skb->ifindex);

	/* A new veth whose pod has no entries yet while policy isolates one: fail closed. */
	if (ep && (ep->flags & WM_EP_PENDING)) {
		report(skb, &p, src_id, dst_id, peer_node, WM_VERDICT_DROPPED_POLICY,
		       WM_HOOK_FROM_POD);
		return TC_ACT_SHOT;
	}
	if (!source_ok(ep, &p)) {
		if (p.v6)
			report(skb, &p, 0, 0, 0, WM_STATS6_SPOOFED, WM_HOOK_FROM_POD);
		report(skb, &p, src_id, dst_id, peer_node, WM_VERDICT_DROPPED_POLICY,
		       WM_HOOK_FROM_POD);
		return TC_ACT_SHOT;
	}
	/* Neighbour discovery and other on-link IPv6 is not pod-to-pod traffic. */
	if (p.v6 && (p.nd || v6_on_link(p.dst6)))
		return TC_ACT_OK;

	struct ct c;
	int decided = ct_decided(&c, cfg, &p);
	int reply = !decided && ct_is_reply(&c, &p);
	int check = !decided && !reply;

	/* Traffic to this node is always allowed (NetworkPolicy: the pod's own node). */
	if (check && dst_id != host_identity(cfg) &&
	    !side_allows(src_id, dst_id, &p, WM_DIR_EGRESS)) {
		ct_forget(&c, &p);
		report(skb, &p, src_id, dst_id, peer_node, WM_VERDICT_DROPPED_POLICY,
		       WM_HOOK_FROM_POD);
		return TC_ACT_SHOT;
	}
	if (dst_flags & WM_IPCACHE_LOCAL) {
		if (check && !side_allows(dst_id, src_id, &p, WM_DIR_INGRESS)) {
			ct_forget(&c, &p);
			report(skb, &p, src_id, dst_id, 0, WM_VERDICT_DROPPED_POLICY,
			       WM_HOOK_FROM_POD);
			return TC_ACT_SHOT;
		}
		if (check)
			ct_allow(&c, &p);
		report(skb, &p, src_id, dst_id, 0, WM_VERDICT_FORWARDED_LOCAL, WM_HOOK_FROM_POD);
		return TC_ACT_OK;
	}
	/* The remote node's to_pod decides ingress; remember the egress decision here. */
	if (check)
		ct_allow(&c, &p);
	if (dst_flags & WM_IPCACHE_REMOTE_POD) {
		__u32 tunnel = cfg->tunnel_ifindex;
		if ((dst_flags & WM_IPCACHE_ENCRYPT) && tunnel) {
			/* Too big for the tunnel: the routing stack sends it into the tunnel
			 * (fragmented) or answers with a PMTU error; see the header. Recorded
			 * as such, not as encrypted: it may never reach the tunnel. */
			int fits = fits_tunnel(skb, tunnel);
			report(skb, &p, src_id, dst_id, peer_node,
			       fits ? WM_VERDICT_FORWARDED_ENCRYPTED : WM_VERDICT_TOO_BIG,
			       WM_HOOK_FROM_POD);
			if (!fits)
				return TC_ACT_OK;
			return bpf_redirect(tunnel, 0);
		}
		if (strict(cfg)) {
			report(skb, &p, src_id, dst_id, peer_node, WM_VERDICT_DROPPED_PLAINTEXT,
			       WM_HOOK_FROM_POD);
			return TC_ACT_SHOT;
		}
	}
	report(skb, &p, src_id, dst_id, peer_node, WM_VERDICT_FORWARDED_PLAIN, WM_HOOK_FROM_POD);
	return TC_ACT_OK;
}

SEC("classifier")
int to_pod(struct __sk_buff *skb)
{
	struct pkt p;
	if (parse(skb, &p) < 0)
		return TC_ACT_OK;
	struct wm_config *cfg = config();
	if (!cfg)
		return TC_ACT_OK;
	struct wm_ipcache_val *src = ipcache_lookup(&p, 1);
	struct wm_ipcache_val *dst = ipcache_lookup(&p, 0);
	__u32 dst_id = identity_of(dst);
	/* The pod behind this veth has no entries yet while policy isolates one: fail closed. */
	struct wm_endpoint_val *own = endpoint(skb->ifindex);
	if (own && (own->flags & WM_EP_PENDING)) {
		report(skb, &p, identity_of(src), dst_id, 0, WM_VERDICT_DROPPED_POLICY,
		       WM_HOOK_TO_POD);
		return TC_ACT_SHOT;
	}
	if (p.v6 && (p.nd || v6_on_link(p.src6) || v6_on_link(p.dst6)))
		return TC_ACT_OK;
	/*
	 * Who sent it is decided by where it entered the node, not by the address it claims:
	 * - on a known pod veth (an endpoint entry): from_pod checked its source and, for a local
	 *   destination, decided both sides already;
	 * - on no interface (ingress_ifindex 0): this node generated it (host-network processes,
	 *   kubelet probes, PMTU errors): the host identity, always allowed to its own pods;
	 * - elsewhere (underlay, tunnel, a bridge): the ipcache identity of the source, except that
	 *   a local pod's address arriving there is spoofed and counts as world.
	 */
	__u32 in_if = skb->ingress_ifindex;
	struct wm_endpoint_val *in_ep = endpoint(in_if);
	if (in_ep && dst && (dst->flags & WM_IPCACHE_LOCAL))
		return TC_ACT_OK;
	__u32 host = host_identity(cfg);
	__u32 src_id;
	if (in_if == 0)
		src_id = host;
	else if (!in_ep && src && (src->flags & WM_IPCACHE_LOCAL))
		src_id = WM_ID_WORLD;
	else
		src_id = identity_of(src);
	__be32 peer_node = (src && (src->flags & WM_IPCACHE_REMOTE_POD)) ? src->node_ip : 0;
	struct ct c;
	int decided = ct_decided(&c, cfg, &p);
	int check = !decided && !ct_is_reply(&c, &p);
	if (check && src_id != host &&
	    !side_allows(dst_id, src_id, &p, WM_DIR_INGRESS)) {
		ct_forget(&c, &p);
		report(skb, &p, src_id, dst_id, peer_node, WM_VERDICT_DROPPED_POLICY,
		       WM_HOOK_TO_POD);
		return TC_ACT_SHOT;
	}
	if (check)
		ct_allow(&c, &p);
	__u8 verdict = (cfg->tunnel_ifindex && skb->ingress_ifindex == cfg->tunnel_ifindex)
			       ? WM_VERDICT_FORWARDED_ENCRYPTED
			       : WM_VERDICT_FORWARDED_PLAIN;
	report(skb, &p, src_id, dst_id, peer_node, verdict, WM_HOOK_TO_POD);
	return TC_ACT_OK;
}

static __always_inline int is_pod_addr(const struct wm_ipcache_val *v)
{
	return v && !(v->flags & WM_IPCACHE_NODE) &&
	       (v->flags & (WM_IPCACHE_LOCAL | WM_IPCACHE_REMOTE_POD));
}

static __always_inline int underlay(struct __sk_buff *skb, __u8 hook)
{
	struct pkt p;
	if (parse(skb, &p) < 0)
		return TC_ACT_OK;
	struct wm_config *cfg = config();
	if (!cfg || !strict(cfg))
		return TC_ACT_OK;
	struct wm_ipcache_val *src = ipcache_lookup(&p, 1);
	struct wm_ipcache_val *dst = ipcache_lookup(&p, 0);
	/* Node addresses (WM_IPCACHE_NODE /32s) are not pod addresses: WireGuard between nodes
	 * passes; a pod-to-pod packet passes on no port. */
	if (!is_pod_addr(src) || !is_pod_addr(dst))
		return TC_ACT_OK;
	__be32 peer_node = (dst->flags & WM_IPCACHE_REMOTE_POD) ? dst->node_ip : src->node_ip;
	report(skb, &p, identity_of(src), identity_of(dst), peer_node, WM_VERDICT_DROPPED_PLAINTEXT,
	       hook);
	return TC_ACT_SHOT;
}

SEC("classifier")
int underlay_ingress(struct __sk_buff *skb)
{
	return underlay(skb, WM_HOOK_UNDERLAY_INGRESS);
}

SEC("classifier")
int underlay_egress(struct __sk_buff *skb)
{
	return underlay(skb, WM_HOOK_UNDERLAY_EGRESS);
}
