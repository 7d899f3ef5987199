//go:build ignore
// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* vnetbpf datapath: forwards between a node's VNet addresses and its containers by map
 * lookups, so neither the Linux bridge nor the kernel's IP forwarding is needed.
 *
 *   from_container  tc ingress of every host-side veth: what a container sends.
 *   from_vnet       tc ingress of the host NIC: what the VNet sends to this node.
 *
 * Rules for frames the programs cannot use: a container is untrusted, so anything from it
 * that is truncated, malformed or of another ethertype is dropped and counted. The NIC carries
 * the node's own traffic, so from_vnet only ever takes IPv4 packets and ARP requests addressed
 * to an endpoint; everything else, malformed or not, goes to the host stack untouched. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf_helpers.h>
#include <bpf_endian.h>

#include "datapath.h"

/* From linux/if_arp.h and sys/socket.h, which pull in libc headers. */
#define AF_INET 2
#define ARPHRD_ETHER 1
#define ARPOP_REQUEST 1
#define ARPOP_REPLY 2

/* 169.254.169.254: Azure's Instance Metadata Service (and its token endpoint). */
#define IMDS_ADDR 0xa9fea9fe

char __license[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint);
	__uint(max_entries, MAX_ENDPOINTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct vnet_key);
	__type(value, struct vnet_cidr);
	__uint(max_entries, MAX_VNET_CIDRS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vnet_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct node_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32); /* enum stat_reason: array keys must be plain integers for BTF */
	__type(value, struct stat);
	__uint(max_entries, MAX_STAT_REASONS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} stats SEC(".maps");

/* Per-CPU, so that counting is two plain adds on a line no other CPU writes: the atomic adds
 * of a shared array cost 13 ns of a 52 ns local delivery. Sized by ids, not addresses. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct endpoint_stat);
	__uint(max_entries, MAX_ENDPOINT_IDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoint_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

/* Referenced so that bpf2go can generate Go types for them. */
const struct drop_event *unused_drop_event __attribute__((unused));
const enum stat_reason *unused_stat_reason __attribute__((unused));
const enum vnet_cidr_flags *unused_vnet_cidr_flags __attribute__((unused));
const enum node_config_flags *unused_node_config_flags __attribute__((unused));

/* ARP for IPv4 over Ethernet, the only kind the programs accept. */
struct arp_eth {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[ETH_ALEN];
	__u8 spa[4];
	__u8 tha[ETH_ALEN];
	__u8 tpa[4];
} __attribute__((packed));

/* What a program learned of a packet, for counters and drop events. */
struct pkt {
	struct ethhdr *eth;
	__u16 ethertype;
	struct iphdr *ip;
};

static __always_inline void count(struct __sk_buff *skb, enum stat_reason reason)
{
	__u32 key = reason;
	struct stat *s = bpf_map_lookup_elem(&stats, &key);

	if (s) {
		s->packets++;
		s->bytes += skb->len;
	}
}

static __always_inline void count_endpoint(struct __sk_buff *skb, const struct endpoint *ep, int rx)
{
	__u32 key = ep->id;
	struct endpoint_stat *s = bpf_map_lookup_elem(&endpoint_stats, &key);

	if (!s)
		return;
	if (rx) {
		s->rx_packets++;
		s->rx_bytes += skb->len;
	} else {
		s->tx_packets++;
		s->tx_bytes += skb->len;
	}
}

/* drop counts the reason and tells user space which packet it was. The event is written in
 * place in the ring; the coarse clock (a jiffy's resolution) costs a load where
 * bpf_ktime_get_ns reads the TSC, 26 ns in a VM. When the ring is full the counter still
 * has the packet. */
static __always_inline int drop(struct __sk_buff *skb, struct pkt *p, enum stat_reason reason)
{
	void *data_end = (void *)(long)skb->data_end;
	struct drop_event *ev;

	count(skb, reason);
	ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev)
		return TC_ACT_SHOT;
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_coarse_ns();
	ev->ifindex = skb->ifindex;
	ev->reason = reason;
	ev->ethertype = p->ethertype;
	if (p->eth)
		__builtin_memcpy(ev->smac, p->eth->h_source, ETH_ALEN);
	if (p->ip) {
		struct iphdr *ip = p->ip;

		__builtin_memcpy(ev->saddr, &ip->saddr, 4);
		__builtin_memcpy(ev->daddr, &ip->daddr, 4);
		ev->protocol = ip->protocol;
		/* Ports only where they are: TCP/UDP in the first fragment. */
		if ((ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) &&
		    !(ip->frag_off & bpf_htons(0x1fff))) {
			__u16 *ports = (void *)ip + ip->ihl * 4;

			if ((void *)(ports + 2) <= data_end) {
				ev->sport = bpf_ntohs(ports[0]);
				ev->dport = bpf_ntohs(ports[1]);
			}
		}
	}
	bpf_ringbuf_submit(ev, 0);
	return TC_ACT_SHOT;
}

static __always_inline int pass(struct __sk_buff *skb, enum stat_reason reason)
{
	count(skb, reason);
	return TC_ACT_OK;
}

static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	return *(const __u32 *)a == *(const __u32 *)b &&
	       *(const __u16 *)(a + 4) == *(const __u16 *)(b + 4);
}

/* parse_ipv4 returns the IPv4 header when it is whole and sane, else NULL. */
static __always_inline struct iphdr *parse_ipv4(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);

	if ((void *)(ip + 1) > data_end)
		return NULL;
	if (ip->version != 4 || ip->ihl < 5)
		return NULL;
	if ((void *)ip + ip->ihl * 4 > data_end)
		return NULL;
	if (bpf_ntohs(ip->tot_len) < ip->ihl * 4)
		return NULL;
	return ip;
}

static __always_inline struct arp_eth *parse_arp(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct arp_eth *arp = data + sizeof(struct ethhdr);

	if ((void *)(arp + 1) > data_end)
		return NULL;
	if (arp->htype != bpf_htons(ARPHRD_ETHER) || arp->ptype != bpf_htons(ETH_P_IP) ||
	    arp->hlen != ETH_ALEN || arp->plen != 4)
		return NULL;
	return arp;
}

/* ip_decrease_ttl, as the kernel does it: the checksum changes by exactly 0x0100. */
static __always_inline void decrease_ttl(struct iphdr *ip)
{
	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

/* arp_reply turns a request into the answer "tpa is at mac" and sends it back out of the
 * device it came in on. */
static __always_inline int arp_reply(struct __sk_buff *skb, struct ethhdr *eth, struct arp_eth *arp,
				     const __u8 *mac)
{
	__u8 ip[4];

	__builtin_memcpy(ip, arp->tpa, 4);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	arp->op = bpf_htons(ARPOP_REPLY);
	__builtin_memcpy(arp->tha, arp->sha, ETH_ALEN);
	__builtin_memcpy(arp->tpa, arp->spa, 4);
	__builtin_memcpy(arp->sha, mac, ETH_ALEN);
	__builtin_memcpy(arp->spa, ip, 4);
	count(skb, ARP_REPLY);
	return bpf_redirect(skb->ifindex, 0);
}

/* deliver hands a packet to a container on this node: straight into its namespace, skipping
 * the host-side veth's transmit path and the host stack. */
static __always_inline int deliver(struct __sk_buff *skb, struct ethhdr *eth, struct iphdr *ip,
				   const struct endpoint *dst, enum stat_reason reason)
{
	decrease_ttl(ip);
	__builtin_memcpy(eth->h_dest, dst->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, dst->host_mac, ETH_ALEN);
	count(skb, reason);
	count_endpoint(skb, dst, 1);
	return bpf_redirect_peer(dst->ifindex, 0);
}

/* fits_nic says whether the NIC can send skb as it is. A plain packet is compared with the
 * NIC's MTU from config (0 until the agent has written it: nothing fits). A GSO packet is
 * checked by the kernel, segment by segment, against the device: the container's MTU may be
 * larger than the NIC's. The helper costs a device lookup, paid once per GSO packet of up to
 * 64 KB. */
static __always_inline int fits_nic(struct __sk_buff *skb, const struct node_config *cfg)
{
	__u32 mtu = 0;

	if (skb->gso_size)
		return bpf_check_mtu(skb, cfg->nic_ifindex, &mtu, 0, 0) == BPF_MTU_CHK_RET_SUCCESS;
	return skb->len <= (__u32)cfg->nic_mtu + ETH_HLEN;
}

/* out_neigh sends a container's packet out of the NIC to next hop nh; the kernel fills the
 * MACs from its neighbour entry, resolving it first if need be. With nh 0 the kernel routes
 * the packet itself to find the next hop. */
static __always_inline int out_neigh(struct __sk_buff *skb, struct iphdr *ip, const struct node_config *cfg,
				     __be32 nh)
{
	struct bpf_redir_neigh via = { .nh_family = AF_INET, .ipv4_nh = nh };

	decrease_ttl(ip);
	count(skb, FWD_TO_VNET);
	if (!nh)
		return bpf_redirect_neigh(cfg->nic_ifindex, NULL, 0, 0);
	return bpf_redirect_neigh(cfg->nic_ifindex, &via, sizeof(via), 0);
}

/* to_vnet_fib asks the FIB for next hop and MAC, for prefixes without a known next hop. */
static __always_inline int to_vnet_fib(struct __sk_buff *skb, struct pkt *p, const struct node_config *cfg)
{
	struct ethhdr *eth = p->eth;
	struct iphdr *ip = p->ip;
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.tos = ip->tos,
		.l4_protocol = ip->protocol,
		.tot_len = bpf_ntohs(ip->tot_len),
		.ipv4_src = ip->saddr,
		.ipv4_dst = ip->daddr,
		.ifindex = cfg->nic_ifindex,
	};
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);

	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		if (fib.ifindex != cfg->nic_ifindex)
			return pass(skb, PASS_TO_STACK);
		decrease_ttl(ip);
		__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, cfg->nic_mac, ETH_ALEN);
		count(skb, FWD_TO_VNET);
		return bpf_redirect(cfg->nic_ifindex, 0);
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		if (fib.ifindex != cfg->nic_ifindex)
			return pass(skb, PASS_TO_STACK);
		return out_neigh(skb, ip, cfg, fib.ipv4_dst);
	case BPF_FIB_LKUP_RET_FWD_DISABLED:
		return out_neigh(skb, ip, cfg, 0);
	case BPF_FIB_LKUP_RET_BLACKHOLE:
	case BPF_FIB_LKUP_RET_UNREACHABLE:
	case BPF_FIB_LKUP_RET_PROHIBIT:
		return drop(skb, p, DROP_NO_ROUTE);
	default:
		/* Fragmentation needed, not forwardable, or an error: the stack decides. */
		return pass(skb, PASS_TO_STACK);
	}
}

/* to_vnet sends a container's packet out of the NIC towards the VNet. A prefix whose next hop
 * the agent knows goes straight to bpf_redirect_neigh with it: the kernel finds the MAC in
 * its neighbour table, and nothing routes the packet. Otherwise the FIB gives next hop and
 * MAC; where it cannot (no neighbour yet, or forwarding disabled on the node), the kernel
 * routes and resolves the next hop itself through bpf_redirect_neigh without one. */
static __always_inline int to_vnet(struct __sk_buff *skb, struct pkt *p, const struct node_config *cfg,
				   const struct vnet_cidr *cidr)
{
	struct iphdr *ip = p->ip;

	/* A packet the NIC cannot send as it is goes to the FIB path, whose FRAG_NEEDED hands it
	 * to the stack to fragment or answer. */
	if (cidr->flags & VNET_CIDR_F_ONLINK && fits_nic(skb, cfg))
		return out_neigh(skb, ip, cfg, ip->daddr);
	if (cidr->flags & VNET_CIDR_F_VIA && fits_nic(skb, cfg))
		return out_neigh(skb, ip, cfg, *(__be32 *)cidr->nexthop);
	return to_vnet_fib(skb, p, cfg);
}

static __always_inline int container_arp(struct __sk_buff *skb, struct pkt *p)
{
	struct arp_eth *arp = parse_arp(skb);
	struct endpoint_key key;
	struct endpoint *self;

	if (!arp)
		return drop(skb, p, DROP_MALFORMED);
	__builtin_memcpy(key.ip, arp->spa, 4);
	self = bpf_map_lookup_elem(&endpoints, &key);
	if (!self || self->ifindex != skb->ifindex || !mac_equal(arp->sha, self->mac) ||
	    !mac_equal(p->eth->h_source, self->mac))
		return drop(skb, p, DROP_ARP_SPOOFED);
	if (arp->op == bpf_htons(ARPOP_REQUEST)) {
		/* A request for its own address is an announcement: nothing to answer. */
		if (__builtin_memcmp(arp->tpa, arp->spa, 4) == 0)
			return pass(skb, ARP_TO_STACK);
		return arp_reply(skb, p->eth, arp, self->host_mac);
	}
	if (arp->op == bpf_htons(ARPOP_REPLY))
		return pass(skb, ARP_TO_STACK); /* answers the node's own requests */
	return drop(skb, p, DROP_MALFORMED);
}

SEC("tc")
int from_container(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct pkt p = { .eth = data };
	struct endpoint_key key;
	struct endpoint *self, *dst;
	struct vnet_key vkey;
	struct vnet_cidr *cidr;
	__u32 zero = 0;
	struct node_config *cfg;

	if ((void *)(p.eth + 1) > data_end) {
		p.eth = NULL;
		return drop(skb, &p, DROP_MALFORMED);
	}
	p.ethertype = bpf_ntohs(p.eth->h_proto);
	if (p.ethertype == ETH_P_ARP)
		return container_arp(skb, &p);
	if (p.ethertype != ETH_P_IP)
		return drop(skb, &p, DROP_UNSUPPORTED);

	p.ip = parse_ipv4(skb);
	if (!p.ip)
		return drop(skb, &p, DROP_MALFORMED);

	__builtin_memcpy(key.ip, &p.ip->saddr, 4);
	self = bpf_map_lookup_elem(&endpoints, &key);
	if (!self || self->ifindex != skb->ifindex)
		return drop(skb, &p, DROP_SPOOFED_IP);
	if (!mac_equal(p.eth->h_source, self->mac))
		return drop(skb, &p, DROP_SPOOFED_MAC);
	count_endpoint(skb, self, 0);

	__builtin_memcpy(key.ip, &p.ip->daddr, 4);
	dst = bpf_map_lookup_elem(&endpoints, &key);
	if (dst) {
		if (p.ip->ttl <= 1)
			return drop(skb, &p, DROP_TTL_EXCEEDED);
		return deliver(skb, p.eth, p.ip, dst, FWD_LOCAL);
	}

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (p.ip->daddr == bpf_htonl(IMDS_ADDR) && !(cfg && cfg->flags & CONFIG_F_ALLOW_IMDS))
		return drop(skb, &p, DROP_IMDS);
	if (!cfg || !cfg->nic_ifindex)
		return pass(skb, PASS_TO_STACK);
	vkey.prefixlen = 32;
	__builtin_memcpy(vkey.ip, &p.ip->daddr, 4);
	cidr = bpf_map_lookup_elem(&vnet_cidrs, &vkey);
	if (!cidr || cidr->flags & VNET_CIDR_F_HOST)
		return pass(skb, PASS_TO_STACK);
	if (p.ip->ttl <= 1)
		return drop(skb, &p, DROP_TTL_EXCEEDED);
	return to_vnet(skb, &p, cfg, cidr);
}

SEC("tc")
int from_vnet(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct pkt p = { .eth = data };
	struct endpoint_key key;
	struct endpoint *dst;

	if ((void *)(p.eth + 1) > data_end)
		return pass(skb, PASS_VNET_TO_HOST);
	p.ethertype = bpf_ntohs(p.eth->h_proto);

	if (p.ethertype == ETH_P_ARP) {
		struct arp_eth *arp = parse_arp(skb);
		__u32 zero = 0;
		struct node_config *cfg;

		if (!arp || arp->op != bpf_htons(ARPOP_REQUEST))
			return pass(skb, PASS_VNET_TO_HOST);
		__builtin_memcpy(key.ip, arp->tpa, 4);
		if (!bpf_map_lookup_elem(&endpoints, &key))
			return pass(skb, PASS_VNET_TO_HOST);
		cfg = bpf_map_lookup_elem(&config, &zero);
		if (!cfg || !cfg->nic_ifindex)
			return pass(skb, PASS_VNET_TO_HOST);
		return arp_reply(skb, p.eth, arp, cfg->nic_mac);
	}
	if (p.ethertype != ETH_P_IP)
		return pass(skb, PASS_VNET_TO_HOST);

	p.ip = parse_ipv4(skb);
	if (!p.ip)
		return pass(skb, PASS_VNET_TO_HOST);
	__builtin_memcpy(key.ip, &p.ip->daddr, 4);
	dst = bpf_map_lookup_elem(&endpoints, &key);
	if (!dst)
		return pass(skb, PASS_VNET_TO_HOST);
	if (p.ip->ttl <= 1)
		return drop(skb, &p, DROP_TTL_EXCEEDED);
	return deliver(skb, p.eth, p.ip, dst, FWD_FROM_VNET);
}
