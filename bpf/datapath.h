/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Types shared by the datapath programs and, through bpf2go, by Go (pkg/loader). Every field a
 * person reads in `bpftool map dump` is an address or MAC byte array, so it prints as
 * [10,0,0,5] rather than a number in host byte order. */
#ifndef VNETBPF_DATAPATH_H
#define VNETBPF_DATAPATH_H

#include <linux/types.h>

#define MAX_ENDPOINTS 65536
/* Endpoint ids run from 1 to MAX_ENDPOINT_IDS - 1 and index endpoint_stats, a per-CPU
 * array: 1,024 ids cost 32 KB per CPU. The agent hands out the lowest free id, so this caps
 * the containers on one node, not the addresses in the endpoints map. */
#define MAX_ENDPOINT_IDS 1024
#define MAX_VNET_CIDRS 1024
/* Room in the stats map for reasons added later: a map whose size changes cannot be reused
 * across an upgrade, and reusing the pinned maps is what keeps forwarding going. */
#define MAX_STAT_REASONS 64

/* Key of the endpoints map: a container's VNet address. */
struct endpoint_key {
	__u8 ip[4];
};

/* A container interface on this node. */
struct endpoint {
	__u32 ifindex;     /* host-side veth */
	__u32 id;          /* index into endpoint_stats, unique on the node, never 0 */
	__u8 mac[6];       /* the container's interface */
	__u8 host_mac[6];  /* the host-side veth: the container's next hop */
	__u32 flags;       /* reserved, 0 */
};

/* Key of the vnet_cidrs LPM trie. */
struct vnet_key {
	__u32 prefixlen;
	__u8 ip[4];
};

/* Bits of vnet_cidr.flags. */
enum vnet_cidr_flags {
	VNET_CIDR_F_HOST = 0x1,   /* the node's own address: deliver to the host stack */
	VNET_CIDR_F_ONLINK = 0x2, /* on the NIC's link: the destination is its own next hop */
	VNET_CIDR_F_VIA = 0x4,    /* reached through the gateway in nexthop, out of the NIC */
};

/* Value of the vnet_cidrs LPM trie. The node's own addresses are /32 entries with
 * VNET_CIDR_F_HOST, so that the longest match keeps them off the NIC even where the FIB
 * cannot be asked (forwarding disabled). A prefix with VNET_CIDR_F_ONLINK or
 * VNET_CIDR_F_VIA carries its next hop, which the agent read from the node's routes: packets
 * to it go out of the NIC through bpf_redirect_neigh without a FIB lookup. A prefix with
 * neither is looked up in the FIB for every packet. */
struct vnet_cidr {
	__u32 flags;       /* enum vnet_cidr_flags */
	__u8 nexthop[4];   /* the gateway, with VNET_CIDR_F_VIA */
};

/* Bits of node_config.flags. */
enum node_config_flags {
	/* Let containers reach the Instance Metadata Service. Off by default: a pod that
	 * reaches IMDS can take the node's managed identity. */
	CONFIG_F_ALLOW_IMDS = 0x1,
};

/* The node's single config entry; the agent may rewrite it at any time. */
struct node_config {
	__u32 nic_ifindex; /* 0 until the agent has attached to the NIC */
	__u32 flags;       /* enum node_config_flags */
	__u8 nic_mac[6];   /* Azure accepts only the NIC's own MAC as a source */
	__u16 nic_mtu;     /* larger plain packets take the FIB path, which answers FRAG_NEEDED */
};

/* Why a packet got the verdict it got; the key of the stats map. */
enum stat_reason {
	FWD_LOCAL = 0,       /* container -> container on this node (redirect_peer) */
	FWD_TO_VNET,         /* container -> the NIC, towards the VNet */
	FWD_FROM_VNET,       /* the NIC -> a container (redirect_peer) */
	PASS_TO_STACK,       /* container -> the host stack (node, services, other routes) */
	PASS_VNET_TO_HOST,   /* NIC traffic that is not for a container: the host's own */
	ARP_REPLY,           /* ARP request answered in BPF */
	ARP_TO_STACK,        /* a container's valid ARP reply or announcement, to the host */
	DROP_MALFORMED,      /* truncated or invalid header from a container */
	DROP_UNSUPPORTED,    /* an ethertype a container may not send (IPv6 comes later) */
	DROP_SPOOFED_IP,     /* source IPv4 not the sending container's own */
	DROP_SPOOFED_MAC,    /* source MAC not the sending container's own */
	DROP_ARP_SPOOFED,    /* ARP whose sender IP or MAC is not the container's own */
	DROP_TTL_EXCEEDED,   /* TTL would reach 0 */
	DROP_NO_ROUTE,       /* the FIB says blackhole, unreachable or prohibited */
	DROP_IMDS,           /* container -> 169.254.169.254 while CONFIG_F_ALLOW_IMDS is off */
	STAT_REASON_MAX,
};

/* Packet and byte counts for one reason on one CPU. */
struct stat {
	__u64 packets;
	__u64 bytes;
};

/* Per-endpoint counts on one CPU, indexed by endpoint.id. rx is towards the container. */
struct endpoint_stat {
	__u64 rx_packets;
	__u64 rx_bytes;
	__u64 tx_packets;
	__u64 tx_bytes;
};

/* One dropped packet, sent to user space through the events ring buffer. */
struct drop_event {
	__u64 ts_ns;              /* bpf_ktime_get_coarse_ns: CLOCK_MONOTONIC, to a jiffy */
	__u32 ifindex;            /* where it arrived */
	__u32 reason;             /* enum stat_reason */
	__u8 saddr[4];
	__u8 daddr[4];
	__u16 sport;              /* host byte order; 0 when not TCP/UDP or a later fragment */
	__u16 dport;
	__u16 ethertype;          /* host byte order */
	__u8 protocol;            /* IPv4 protocol, or 0 */
	__u8 _pad;
	__u8 smac[6];
	__u8 _pad2[2];
};

#endif
