/* udp-tunnel's kernel data path: a tc ingress program (attached through tcx
 * links) that relays the datagrams of known flows without waking the agent.
 *
 * One program serves both agents; what it does comes from the `flows` map,
 * which the agent fills (src/udp_tunnel/io/kernel.py):
 *
 *   key   (packet source address+port, packet destination address+port;
 *          destination address all zero: any local address, for an agent
 *          listening on the wildcard address)
 *   value (new source, new destination, flags, counters)
 *
 * outside agent: client -> its service's port  becomes  tunnel port -> tunnel
 *                tunnel -> tunnel port         becomes  the client's service's port -> client
 *                (one port for both with -l PORT)
 * inside agent:  outside -> tunnel socket becomes service socket -> service
 *                service -> service socket becomes tunnel socket -> outside
 *
 * Each entry carries its direction's rule (F_CTRL, F_LEN40, F_WG: which of its
 * datagrams the agent must see, src/udp_tunnel/core/classify.py); a wildcard
 * listener's entries take the address the datagram was sent to as their new
 * source (F_SRC_IS_DST), and their new source port from the entry.
 *
 * Addresses are 16 bytes, IPv4 as ::ffff:a.b.c.d, ports in network order.
 *
 * After the rewrite the packet goes where the routing table says, as if the
 * agent had sent it. A flow the loader marked local (its new destination is
 * an address of this host) is injected at the ingress of lo, so that every
 * tcx program of the host sees it again, in order (the other agent on the
 * same host rewrites it next: the up and the down direction need the two
 * programs in opposite orders; only a flow towards an agent, F_TO_AGENT,
 * needs that), and then the stack delivers it; its MAC
 * header gets lo's all-zero destination, or lo's stack would take it for
 * someone else's. (A packet already on lo goes on to the next program
 * instead, when the loader says no other agent's program runs before this
 * one there.) Any other destination is looked up with bpf_fib_lookup
 * from lo, as the stack looks up routes for what local sockets send, and
 * leaves through bpf_redirect_neigh on the egress device. Each rewrite takes
 * one from the TTL / hop limit, as a router does, and a packet arriving with
 * 1 or less is left to the stack: a table that sends packets in a circle
 * cannot make them circle for ever.
 *
 * Left untouched, for the agent to handle as it would without this program:
 * anything not addressed to this host (pkt_type), non-IP, non-UDP, IPv4 with
 * options, fragments (IPv4 MF or offset, any IPv6 extension header), short,
 * truncated or inconsistent packets, a zero IPv6 UDP checksum, what the
 * flow's rule (its flags, core/classify.py's rule for that direction) says
 * the agent must see: control messages (of the length the loader says, starting with "UDPT"), every
 * 40-byte datagram (legacy keepalives), WireGuard handshakes (148 and 92
 * bytes), GSO/GRO packets that may hold one of those, unknown flows, flows whose new
 * ends are of another address family, packets the route lookup does not send
 * to a neighbour, and packets over the egress MTU.
 *
 * SPDX-License-Identifier: MIT OR GPL-2.0
 */
#include "relay.h"

/* Sizes of the datagrams the agent must see (src/udp_tunnel/wire/proto.py, core/wireguard.py; a control
 * message's length comes from the loader, which takes it from wire/proto.py: struct config) */
#define LEGACY_LEN 40
#define WG_INITIATION_LEN 148
#define WG_RESPONSE_LEN 92
#define MAGIC 0x54504455 /* "UDPT" as a little-endian u32 */

/* config flags */
#define CFG_WILDCARD 4 /* some flow has a zero destination address: look it up too */
#define CFG_AGENT_BEFORE 8 /* another agent's program runs before this one on lo */

/* flow flags */
#define F_V4 1          /* the new ends are IPv4 */
#define F_SRC_IS_DST 2  /* the new source address is the packet's destination (a wildcard listener) */
#define F_LOCAL 4       /* the new destination is a local address: straight into lo */
/* The flow's rule (core/classify.py): which of its datagrams the agent must see. */
#define F_CTRL 8        /* ctrl_len bytes starting with "UDPT" (a control message) */
#define F_LEN40 16      /* every 40-byte datagram (the legacy keepalive) */
#define F_WG 32         /* 92 and 148 bytes (WireGuard handshake messages) */
#define F_TO_AGENT 64   /* the new destination is an agent (a tunnel, the outside agent), not a leaf (a client,
			 * a service): on this host, another agent's program may relay it on */

/* Per-CPU counters of what the program did, by reason (the loader names them in this order). */
enum {
	ST_RELAYED,      /* rewritten, sent to a neighbour */
	ST_LOCAL,        /* rewritten, delivered to a local socket */
	ST_NOT_IP,
	ST_NOT_UDP,
	ST_FRAGMENT,
	ST_IP_OPTIONS,
	ST_MALFORMED,
	ST_CONTROL,
	ST_WIREGUARD,
	ST_UNKNOWN,
	ST_FAMILY,
	ST_TTL,
	ST_NO_ROUTE,
	ST_MTU,
	ST_FWD_DISABLED,
	ST_ERROR,
	ST_OTHERHOST,
	ST_COUNT,
};

#define bswap16(x) __builtin_bswap16(x)
#define ETH_P_IP 0x0008   /* 0x0800 in network order, read as a little-endian u16 */
#define ETH_P_IPV6 0xdd86 /* 0x86dd */
#define IPPROTO_UDP 17

#define ETH_HLEN 14
#define IP4_OFF ETH_HLEN
#define IP4_TTL_OFF (IP4_OFF + 8)
#define IP4_CSUM_OFF (IP4_OFF + 10)
#define IP4_ADDR_OFF (IP4_OFF + 12)
#define UDP4_OFF (IP4_OFF + 20)
#define UDP4_CSUM_OFF (UDP4_OFF + 6)
#define IP6_OFF ETH_HLEN
#define IP6_HOP_OFF (IP6_OFF + 7)
#define IP6_ADDR_OFF (IP6_OFF + 8)
#define UDP6_OFF (IP6_OFF + 40)
#define UDP6_CSUM_OFF (UDP6_OFF + 6)
#define V4_MAPPED 0xffff0000 /* bytes 00 00 ff ff read as a little-endian u32 */

struct ethhdr {
	__u8 dst[6];
	__u8 src[6];
	__u16 proto;
};

struct iphdr {
	__u8 ver_ihl;
	__u8 tos;
	__u16 tot_len;
	__u16 id;
	__u16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__u16 check;
	__u32 saddr;
	__u32 daddr;
};

struct ipv6hdr {
	__u32 vtc_flow;
	__u16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u32 saddr[4];
	__u32 daddr[4];
};

struct udphdr {
	__u16 source;
	__u16 dest;
	__u16 len;
	__u16 check;
};

struct flow_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
};

struct flow {
	__u32 saddr[4]; /* new source (unless F_SRC_IS_DST) */
	__u32 daddr[4]; /* new destination */
	__u16 sport;
	__u16 dport;
	__u32 flags;
	__u64 packets;
	__u64 bytes;
	__u64 last_ns; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
};

struct config {
	__u32 flags;
	__u32 ctrl_len; /* a control message: this many bytes, starting with the magic */
};

struct map_def flows SEC("maps") = {
	.type = BPF_MAP_TYPE_HASH,
	.key_size = sizeof(struct flow_key),
	.value_size = sizeof(struct flow),
	.max_entries = 4096, /* the loader sets the size it needs */
};

struct map_def config SEC("maps") = {
	.type = BPF_MAP_TYPE_ARRAY,
	.key_size = sizeof(__u32),
	.value_size = sizeof(struct config),
	.max_entries = 1,
};

struct map_def stats SEC("maps") = {
	.type = BPF_MAP_TYPE_PERCPU_ARRAY,
	.key_size = sizeof(__u32),
	.value_size = sizeof(__u64),
	.max_entries = ST_COUNT,
};

/* The flow of a packet, by its exact key, else (with a wildcard flow in the map) by its key with
 * any destination address. */
INLINE struct flow *lookup(struct flow_key *k, __u32 cfg)
{
	struct flow *f = bpf_map_lookup_elem(&flows, k);

	if (!f && (cfg & CFG_WILDCARD)) {
		k->daddr[0] = 0;
		k->daddr[1] = 0;
		k->daddr[2] = 0;
		k->daddr[3] = 0;
		f = bpf_map_lookup_elem(&flows, k);
	}
	return f;
}

INLINE int count(__u32 reason)
{
	__u64 *c = bpf_map_lookup_elem(&stats, &reason);

	if (c)
		*c += 1;
	return TCX_NEXT;
}

/* The flow's rule by length alone: 0, or why a datagram of n bytes may be the agent's (a
 * control message then only with the magic). */
INLINE int special_len(__u32 n, __u32 rule, __u32 ctrl_len)
{
	if ((rule & F_LEN40) && n == LEGACY_LEN)
		return ST_CONTROL;
	if ((rule & F_CTRL) && n == ctrl_len)
		return ST_CONTROL;
	if ((rule & F_WG) && (n == WG_INITIATION_LEN || n == WG_RESPONSE_LEN))
		return ST_WIREGUARD;
	return 0;
}

/* 0, or the reason why the agent must see this datagram (payload of plen bytes at poff), by the
 * flow's rule (its flags). */
INLINE int special(struct __sk_buff *skb, __u32 poff, __u32 plen, __u32 rule, __u32 ctrl_len)
{
	__u32 gso = skb->gso_size;
	int r;

	if (gso) {
		/* GRO/GSO: segments of gso bytes, the last one shorter or equal */
		__u32 last = plen % gso;

		r = special_len(gso, rule, ctrl_len);
		if (r)
			return r;
		return special_len(last ? last : gso, rule, ctrl_len);
	}
	r = special_len(plen, rule, ctrl_len);
	if (r == ST_CONTROL && plen == ctrl_len) {
		__u32 magic = 0;

		if (bpf_skb_load_bytes(skb, poff, &magic, 4) < 0)
			return ST_MALFORMED;
		if (magic != MAGIC)
			r = 0;
	}
	return r;
}

/* Where the rewritten packet goes: 1 a neighbour (ifindex and nh set), 2 a local socket, or -reason.
 * The agent's loader marks flows whose new destination is a local address (F_LOCAL): fib only says
 * "not forwarded" for those, as for broadcast or no route at all. */
INLINE int route(struct __sk_buff *skb, __u32 flags, struct bpf_fib_lookup *p, __u32 *ifindex,
		 struct bpf_redir_neigh *nh)
{
	if (flags & F_LOCAL)
		return 2;
	long rc = bpf_fib_lookup(skb, p, sizeof(*p), 0);

	if (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		*ifindex = p->ifindex;
		nh->nh_family = p->family;
		nh->nh[0] = p->dst[0];
		nh->nh[1] = p->dst[1];
		nh->nh[2] = p->dst[2];
		nh->nh[3] = p->dst[3];
		return 1;
	}
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return -ST_MTU;
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED)
		return -ST_FWD_DISABLED;
	return -ST_NO_ROUTE;
}

INLINE void account(struct flow *f, __u32 plen, __u32 gso_segs)
{
	__sync_fetch_and_add(&f->packets, gso_segs ? gso_segs : 1);
	__sync_fetch_and_add(&f->bytes, plen);
	f->last_ns = bpf_ktime_get_ns();
}

/* Send the rewritten packet on. */
INLINE int deliver(struct __sk_buff *skb, int where, __u32 ifindex, struct bpf_redir_neigh *nh,
		   struct ethhdr *eth, __u32 cfg, __u32 flags)
{
	if (where == 1) {
		count(ST_RELAYED);
		return bpf_redirect_neigh(ifindex, nh, sizeof(*nh), 0);
	}
	count(ST_LOCAL);
	/* Already on lo, and no other agent's program ran before this one there, or none needs to
	 * see it (it goes to a leaf: a client, a service): the programs after this one see the
	 * packet as it is now, then the stack delivers it. Saves a pass through lo. (Were a leaf an
	 * agent's socket after all, that agent would relay it itself.) */
	if (skb->ifindex == LOOPBACK_IFINDEX && (!(cfg & CFG_AGENT_BEFORE) || !(flags & F_TO_AGENT)))
		return TCX_NEXT;
	/* into lo, whose address is all zeros: a packet from another device keeps its MAC
	 * header, whose destination would make lo's stack take it for someone else's */
	if (eth->dst[0] | eth->dst[1] | eth->dst[2] | eth->dst[3] | eth->dst[4] | eth->dst[5]) {
		__u8 zero[6] = {};

		bpf_skb_store_bytes(skb, 0, zero, 6, 0);
	}
	return bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

INLINE int relay4(struct __sk_buff *skb, __u32 cfg, __u32 ctrl_len, struct ethhdr *eth)
{
	struct iphdr ip;
	struct udphdr udp;

	if (bpf_skb_load_bytes(skb, IP4_OFF, &ip, sizeof(ip)) < 0)
		return count(ST_MALFORMED);
	if ((ip.ver_ihl >> 4) != 4 || (ip.ver_ihl & 15) < 5)
		return count(ST_MALFORMED);
	if ((ip.ver_ihl & 15) != 5)
		return count(ST_IP_OPTIONS); /* rare: the agent relays these */
	if (ip.protocol != IPPROTO_UDP)
		return count(ST_NOT_UDP);
	if (ip.frag_off & bswap16(0x3fff))
		return count(ST_FRAGMENT);
	__u32 tot = bswap16(ip.tot_len);
	if (tot < 28 || ETH_HLEN + tot > skb->len)
		return count(ST_MALFORMED);
	if (bpf_skb_load_bytes(skb, UDP4_OFF, &udp, sizeof(udp)) < 0)
		return count(ST_MALFORMED);
	if (bswap16(udp.len) != tot - 20)
		return count(ST_MALFORMED);
	__u32 plen = tot - 28;

	struct flow_key k = {
		.saddr = {0, 0, V4_MAPPED, ip.saddr},
		.daddr = {0, 0, V4_MAPPED, ip.daddr},
		.sport = udp.source,
		.dport = udp.dest,
	};
	struct flow *f = lookup(&k, cfg);
	if (!f)
		return count(ST_UNKNOWN);
	__u32 flags = f->flags;
	int r = special(skb, UDP4_OFF + 8, plen, flags, ctrl_len);
	if (r)
		return count(r);
	if (!(flags & F_V4))
		return count(ST_FAMILY);
	if (ip.ttl <= 1)
		return count(ST_TTL);
	__u32 nsrc = flags & F_SRC_IS_DST ? ip.daddr : f->saddr[3];
	__u16 nsport = f->sport;
	__u32 ndst = f->daddr[3];
	__u16 ndport = f->dport;

	struct bpf_fib_lookup p = {
		.family = AF_INET,
		.l4_protocol = IPPROTO_UDP,
		.sport = nsport,
		.dport = ndport,
		.tot_len = skb->gso_size ? 0 : tot,
		.ifindex = LOOPBACK_IFINDEX,
		.flowinfo = ip.tos,
		.src = {nsrc},
		.dst = {ndst},
	};
	struct bpf_redir_neigh nh = {};
	__u32 ifindex = 0;
	int where = route(skb, flags, &p, &ifindex, &nh);
	if (where < 0)
		return count(-where);

	/* make the headers writable (and linear) once: the writes below then cannot fail */
	if (bpf_skb_pull_data(skb, UDP4_OFF + 8) < 0)
		return count(ST_ERROR);
	__u32 old[2] = {ip.saddr, ip.daddr};
	__u32 new[2] = {nsrc, ndst};
	__u32 d = bpf_csum_diff(old, 8, new, 8, 0);
	__u16 oldtp = ip.ttl | (ip.protocol << 8); /* the TTL/protocol word as it is in memory */
	__u16 newtp = oldtp - 1;
	__u8 ttl = ip.ttl - 1;
	__u32 oldports = udp.source | ((__u32)udp.dest << 16);
	__u32 newports = nsport | ((__u32)ndport << 16);

	bpf_l3_csum_replace(skb, IP4_CSUM_OFF, oldtp, newtp, 2);
	bpf_l3_csum_replace(skb, IP4_CSUM_OFF, 0, d, 0);
	if (udp.check) {
		bpf_l4_csum_replace(skb, UDP4_CSUM_OFF, 0, d, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0);
		bpf_l4_csum_replace(skb, UDP4_CSUM_OFF, oldports, newports, BPF_F_MARK_MANGLED_0 | 4);
	}
	bpf_skb_store_bytes(skb, IP4_TTL_OFF, &ttl, 1, 0);
	bpf_skb_store_bytes(skb, IP4_ADDR_OFF, new, 8, 0);
	/* no UDP checksum (IPv4 allows it): it stays zero, and skb->csum follows the ports */
	bpf_skb_store_bytes(skb, UDP4_OFF, &newports, 4, udp.check ? 0 : BPF_F_RECOMPUTE_CSUM);
	account(f, plen, skb->gso_segs);
	return deliver(skb, where, ifindex, &nh, eth, cfg, flags);
}

INLINE int relay6(struct __sk_buff *skb, __u32 cfg, __u32 ctrl_len, struct ethhdr *eth)
{
	struct ipv6hdr ip;
	struct udphdr udp;

	if (bpf_skb_load_bytes(skb, IP6_OFF, &ip, sizeof(ip)) < 0)
		return count(ST_MALFORMED);
	if ((ip.vtc_flow & 0xf0) != 0x60)
		return count(ST_MALFORMED);
	if (ip.nexthdr != IPPROTO_UDP)
		return count(ip.nexthdr == 44 ? ST_FRAGMENT : ST_NOT_UDP);
	__u32 plen6 = bswap16(ip.payload_len);
	if (plen6 < 8 || ETH_HLEN + 40 + plen6 > skb->len)
		return count(ST_MALFORMED);
	if (bpf_skb_load_bytes(skb, UDP6_OFF, &udp, sizeof(udp)) < 0)
		return count(ST_MALFORMED);
	if (bswap16(udp.len) != plen6 || udp.check == 0)
		return count(ST_MALFORMED);
	__u32 plen = plen6 - 8;

	struct flow_key k = {
		.saddr = {ip.saddr[0], ip.saddr[1], ip.saddr[2], ip.saddr[3]},
		.daddr = {ip.daddr[0], ip.daddr[1], ip.daddr[2], ip.daddr[3]},
		.sport = udp.source,
		.dport = udp.dest,
	};
	struct flow *f = lookup(&k, cfg);
	if (!f)
		return count(ST_UNKNOWN);
	__u32 flags = f->flags;
	int r = special(skb, UDP6_OFF + 8, plen, flags, ctrl_len);
	if (r)
		return count(r);
	if (flags & F_V4)
		return count(ST_FAMILY);
	if (ip.hop_limit <= 1)
		return count(ST_TTL);

	/* old and new source+destination, side by side as in the header */
	__u32 old[8] = {ip.saddr[0], ip.saddr[1], ip.saddr[2], ip.saddr[3],
			ip.daddr[0], ip.daddr[1], ip.daddr[2], ip.daddr[3]};
	__u32 new[8];
	__u16 nsport = f->sport;
	if (flags & F_SRC_IS_DST) {
		new[0] = ip.daddr[0];
		new[1] = ip.daddr[1];
		new[2] = ip.daddr[2];
		new[3] = ip.daddr[3];
	} else {
		new[0] = f->saddr[0];
		new[1] = f->saddr[1];
		new[2] = f->saddr[2];
		new[3] = f->saddr[3];
	}
	new[4] = f->daddr[0];
	new[5] = f->daddr[1];
	new[6] = f->daddr[2];
	new[7] = f->daddr[3];
	__u16 ndport = f->dport;

	struct bpf_fib_lookup p = {
		.family = AF_INET6,
		.l4_protocol = IPPROTO_UDP,
		.sport = nsport,
		.dport = ndport,
		.tot_len = skb->gso_size ? 0 : 40 + plen6,
		.ifindex = LOOPBACK_IFINDEX,
		.flowinfo = ip.vtc_flow & 0xffffff0f, /* traffic class and flow label, as in the header */
		.src = {new[0], new[1], new[2], new[3]},
		.dst = {new[4], new[5], new[6], new[7]},
	};
	struct bpf_redir_neigh nh = {};
	__u32 ifindex = 0;
	int where = route(skb, flags, &p, &ifindex, &nh);
	if (where < 0)
		return count(-where);

	if (bpf_skb_pull_data(skb, UDP6_OFF + 8) < 0)
		return count(ST_ERROR);
	__u32 d = bpf_csum_diff(old, 32, new, 32, 0);
	__u32 oldports = udp.source | ((__u32)udp.dest << 16);
	__u32 newports = nsport | ((__u32)ndport << 16);
	/* the word holding the hop limit: payload length, next header, hop limit */
	__u32 oldw = ip.payload_len | ((__u32)ip.nexthdr << 16) | ((__u32)ip.hop_limit << 24);
	__u32 neww = oldw - (1 << 24);
	__u32 dw = bpf_csum_diff(&oldw, 4, &neww, 4, 0);
	__u8 hop = ip.hop_limit - 1;

	bpf_l4_csum_replace(skb, UDP6_CSUM_OFF, 0, d, BPF_F_PSEUDO_HDR);
	/* That call also takes d from skb->csum (CHECKSUM_COMPLETE), as it must where skb->csum covers
	 * the UDP part only; here it covers the IPv6 header too, whose addresses change by d: give it
	 * back, and add the hop limit's change, which no checksum field makes up for. */
	bpf_csum_update(skb, d);
	bpf_csum_update(skb, dw);
	bpf_l4_csum_replace(skb, UDP6_CSUM_OFF, oldports, newports, 4);
	bpf_skb_store_bytes(skb, IP6_HOP_OFF, &hop, 1, 0);
	bpf_skb_store_bytes(skb, IP6_ADDR_OFF, new, 32, 0);
	bpf_skb_store_bytes(skb, UDP6_OFF, &newports, 4, 0);
	account(f, plen, skb->gso_segs);
	return deliver(skb, where, ifindex, &nh, eth, cfg, flags);
}

SEC("tc")
int udpt_relay(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct config *c = bpf_map_lookup_elem(&config, &zero);
	struct ethhdr eth;

	if (!c)
		return TCX_NEXT;
	if (skb->pkt_type != PACKET_HOST)
		return count(ST_OTHERHOST);
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return count(ST_MALFORMED);
	if (eth.proto != skb->protocol)
		return count(ST_NOT_IP);
	if (eth.proto == ETH_P_IP)
		return relay4(skb, c->flags, c->ctrl_len, &eth);
	if (eth.proto == ETH_P_IPV6)
		return relay6(skb, c->flags, c->ctrl_len, &eth);
	return count(ST_NOT_IP);
}

char _license[] SEC("license") = "Dual MIT/GPL";
