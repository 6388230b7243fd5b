// Ciliate L7 redirect: hands connections whose policy entry carries a proxy port to the node's
// transparent proxy with bpf_sk_assign, so the proxy's accepted socket has the client's
// original destination as its local address (no NAT; both ends keep their addresses/ports).
//
// Attached on tc ingress of every pod's host veth (packets leaving the pod), ahead of the
// datapath's own program, and returns TC_ACT_UNSPEC so that program still runs (egress policy,
// conntrack, flow events). Reads the datapath's pinned maps; its structs mirror
// services/datapath/bpf/datapath.c (a unit test compares them).
//
//   * TCP packet of a connection the node already holds a socket for (the proxy's accepted
//     client side, or its upstream side talking to the server with the client's address):
//     mark it for local delivery (policy routing: fwmark -> table with a local default route).
//   * New TCP connection (bare SYN) or any UDP datagram: look up the source's egress and the
//     destination's ingress policy as the datapath does; a redirect entry sends it to the
//     proxy socket listening on proxy_port (bpf_sk_assign). No proxy socket = drop (an L7
//     policy must never be bypassed).
//
// Placeholders: __PIN_DIR__, __IPCACHE_SIZE__, __ENDPOINTS_SIZE__, __POLICY_MAP_SIZE__,
// __MARK__.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>

#define DIR_INGRESS 1
#define DIR_EGRESS 2
#define EP_ENFORCE_INGRESS 1
#define EP_ENFORCE_EGRESS 2
#define WORLD_IDENTITY 2
#define POLICY_FULL_PREFIX 96
#define TCP_STATE_LISTEN 10
#define TCPF_SYN 0x02
#define TCPF_ACK 0x10
#define MARK_TO_PROXY __MARK__

// Counter slots (cil_proxy_stats).
#define ST_REDIRECTED 0
#define ST_ESTABLISHED 1
#define ST_NO_PROXY 2
#define ST_ASSIGN_FAILED 3
#define ST_SLOTS 4

#include "maps.h"  // the agent's map layouts, shared with datapath.c

BPF_TABLE_PINNED7("lpm_trie", struct ipcache_key, struct ipcache_val, cil_ipcache,
                  __IPCACHE_SIZE__, "__PIN_DIR__/cil_ipcache", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct endpoint_key, struct endpoint_val, cil_lxc,
                 __ENDPOINTS_SIZE__, "__PIN_DIR__/cil_lxc");
BPF_TABLE_PINNED7("lpm_trie", struct policy_key, struct policy_val, cil_policy,
                  __POLICY_MAP_SIZE__, "__PIN_DIR__/cil_policy", BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(cil_proxy_stats, u64, ST_SLOTS);

static __always_inline void stat(u32 slot) {
    u64 *v = cil_proxy_stats.lookup(&slot);
    if (v)
        *v += 1;
}

static __always_inline u32 peer_identity(u32 ip) {
    struct ipcache_key k = {.prefixlen = 32, .ip = ip};
    struct ipcache_val *v = cil_ipcache.lookup(&k);
    return v ? v->identity : WORLD_IDENTITY;
}

// The proxy port the (local, peer, direction) policy redirects to; 0 = none (deny wins).
static __always_inline u16 proxy_port(u32 local, u32 peer, u8 dir, u8 proto, u16 dport) {
    struct policy_key pk = {.prefixlen = POLICY_FULL_PREFIX, .local_identity = local,
                            .peer = peer, .direction = dir, .proto = proto, .dport = dport};
    struct policy_val *by_peer = cil_policy.lookup(&pk);
    pk.peer = 0;
    struct policy_val *by_any = cil_policy.lookup(&pk);
    if ((by_peer && by_peer->deny) || (by_any && by_any->deny))
        return 0;
    if (by_peer && by_peer->proxy_port)
        return by_peer->proxy_port;
    if (by_any && by_any->proxy_port)
        return by_any->proxy_port;
    return 0;
}

static __always_inline u16 redirect_port(u32 saddr, u32 daddr, u8 proto, u16 dport) {
    struct endpoint_key sk = {.ip = saddr};
    struct endpoint_val *src = cil_lxc.lookup(&sk);
    if (src && (src->flags & EP_ENFORCE_EGRESS)) {
        u16 port = proxy_port(src->identity, peer_identity(daddr), DIR_EGRESS, proto, dport);
        if (port)
            return port;
    }
    struct endpoint_key dk = {.ip = daddr};
    struct endpoint_val *dst = cil_lxc.lookup(&dk);
    if (dst && (dst->flags & EP_ENFORCE_INGRESS))
        return proxy_port(dst->identity, peer_identity(saddr), DIR_INGRESS, proto, dport);
    return 0;
}

int to_proxy(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP))
        return TC_ACT_UNSPEC;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl != 5 || (ip->frag_off & htons(0x1FFF)))
        return TC_ACT_UNSPEC;
    u8 proto = ip->protocol;
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return TC_ACT_UNSPEC;
    void *l4 = (void *)(ip + 1);
    if (l4 + 14 > end)
        return TC_ACT_UNSPEC;
    struct bpf_sock_tuple t = {};
    t.ipv4.saddr = ip->saddr;
    t.ipv4.daddr = ip->daddr;
    t.ipv4.sport = *(u16 *)l4;
    t.ipv4.dport = *(u16 *)(l4 + 2);
    u16 dport = t.ipv4.dport;
    struct bpf_sock *sk;

    if (proto == IPPROTO_TCP) {
        u8 flags = *(u8 *)(l4 + 13);
        sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
        if (sk) {
            int owned = sk->state != TCP_STATE_LISTEN;
            bpf_sk_release(sk);
            if (owned) {
                skb->mark = MARK_TO_PROXY;
                stat(ST_ESTABLISHED);
                return TC_ACT_UNSPEC;
            }
        }
        if ((flags & (TCPF_SYN | TCPF_ACK)) != TCPF_SYN)
            return TC_ACT_UNSPEC;
    }

    u16 port = redirect_port(ip->saddr, ip->daddr, proto, dport);
    if (!port)
        return TC_ACT_UNSPEC;
    t.ipv4.dport = htons(port);
    if (proto == IPPROTO_TCP)
        sk = bpf_sk_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    else
        sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk) {
        stat(ST_NO_PROXY);
        return TC_ACT_SHOT;
    }
    if (proto == IPPROTO_TCP && sk->state != TCP_STATE_LISTEN) {
        bpf_sk_release(sk);
        stat(ST_NO_PROXY);
        return TC_ACT_SHOT;
    }
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err) {
        stat(ST_ASSIGN_FAILED);
        return TC_ACT_SHOT;
    }
    skb->mark = MARK_TO_PROXY;
    stat(ST_REDIRECTED);
    return TC_ACT_UNSPEC;
}
