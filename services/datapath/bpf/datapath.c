// Ciliate datapath: identity-based policy with conntrack on the host side of each pod's veth.
//
// Attached with tc clsact (direct-action):
//   from_container  on the host veth's ingress  = packets leaving the pod  = egress policy
//   to_container    on the host veth's egress   = packets entering the pod = ingress policy
//
// Placeholders (__NAME__) are filled by loader.py before compiling, once per agent.
// Struct layouts must match services/datapath/maps.py (ctypes) and core/events.py (EVENT).

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>

#define DIR_INGRESS 1
#define DIR_EGRESS 2

#define EP_ENFORCE_INGRESS 1
#define EP_ENFORCE_EGRESS 2
#define EP_AUDIT 4

#define CT_SEEN_REPLY 1
#define CT_TX_CLOSING 2
#define CT_RX_CLOSING 4
#define CT_RST 8

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

// flow_event.trace_reason: Cilium's TRACE_REASON_* (the connection's conntrack state);
// reply = TR_REPLY, so the byte that once said is_reply keeps its meaning for replies.
#define TR_UNKNOWN 0
#define TR_NEW 1
#define TR_ESTABLISHED 2
#define TR_REPLY 3
#define TR_RELATED 4
#define TR_REOPENED 5
#define MSG_DROP 1
#define MSG_TRACE 4
#define MSG_POLICY_VERDICT 5
#define VERDICT_FORWARDED 1
#define VERDICT_DROPPED 2
#define VERDICT_AUDIT 4
#define DROP_POLICY_DENIED 133
#define DROP_POLICY_DENY 181

// Monitor aggregation (Cilium's --monitor-aggregation): 0 none = a trace event per packet;
// >= 3 medium = per connection and direction only when new TCP flags appear or the report
// interval passed; >= 4 maximum = only on new TCP flags.
//
// From lowest on, packets are traced only where they enter the pod (to_container, Cilium's
// TO_LXC); the from_container side (FROM_LXC, a receive point) is silent, as Cilium hides
// receive-side traces (TRACE_AGGREGATE_RX), so each packet of a same-node connection is
// reported once at most.
#define MONITOR_AGGREGATION __MONITOR_AGGREGATION__
#define MONITOR_INTERVAL_S __MONITOR_INTERVAL_S__
#define AGG_LOWEST 1
#define AGG_MEDIUM 3
#define AGG_MAXIMUM 4

// Policy-verdict log (CILIATE_POLICY_VERDICT_LOG): 0 none; 1 denied (default) = verdict events
// for audited (would-be denied) connections, and for allowed ones only below medium
// aggregation; 2 all = a verdict for every new connection. Drops always make a drop event.
// When no verdict stands for an allowed connection's first packet, it is traced instead
// (subject to the aggregation above).
#define POLICY_VERDICT_LOG __POLICY_VERDICT_LOG__
#define PV_LOG_NONE 0
#define PV_LOG_DENIED 1
#define PV_LOG_ALL 2
#define LOG_ALLOWED_VERDICTS \
    (POLICY_VERDICT_LOG == PV_LOG_ALL || \
     (POLICY_VERDICT_LOG == PV_LOG_DENIED && MONITOR_AGGREGATION < AGG_MEDIUM))
// TCP flags whose first appearance per connection side is reported at medium aggregation
// (Cilium's --monitor-aggregation-flags; default syn,fin,rst).
#define TRACE_FLAGS (__MONITOR_FLAGS__)

// Ring-buffer wake-ups: a record wakes the reader only every EVENTS_WAKEUP_BATCH-th time per
// CPU (BPF_RB_NO_WAKEUP otherwise), so the reader takes records in batches; its poll timeout
// (100 ms) bounds how long a quiet record waits.
#define EVENTS_WAKEUP_BATCH 64
#define RB_NO_WAKEUP 1
#define RB_FORCE_WAKEUP 2

// Metrics index: reason * 4 + direction (reason 0 = forwarded).
#define METRICS_SLOTS 1024

#define WORLD_IDENTITY 2
#define POLICY_FULL_PREFIX 96

#include "maps.h"

struct ct_key {
    u32 saddr;
    u32 daddr;
    u16 sport;  // network order
    u16 dport;
    u8 proto;
    u8 direction;
    u16 pad;
};

struct ct_val {
    u64 last_seen_ns;
    u64 created_ns;
    u64 packets;
    u64 bytes;
    u32 local_identity;
    u32 peer_identity;
    u32 flags;
    u32 pad;
};

// struct flow_event (the event record): maps.h, shared with lb/bpf/lb.c.

BPF_TABLE_PINNED7("lpm_trie", struct ipcache_key, struct ipcache_val, cil_ipcache,
                  __IPCACHE_SIZE__, "__PIN_DIR__/cil_ipcache", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct endpoint_key, struct endpoint_val, cil_lxc,
                 __ENDPOINTS_SIZE__, "__PIN_DIR__/cil_lxc");
BPF_TABLE_PINNED7("lpm_trie", struct policy_key, struct policy_val, cil_policy,
                  __POLICY_MAP_SIZE__, "__PIN_DIR__/cil_policy", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_val, cil_ct_tcp,
                 __CT_TCP_SIZE__, "__PIN_DIR__/cil_ct_tcp");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_val, cil_ct_any,
                 __CT_ANY_SIZE__, "__PIN_DIR__/cil_ct_any");
BPF_RINGBUF_OUTPUT(cil_events, __EVENTS_PAGES__);

struct metrics_val {
    u64 packets;
    u64 bytes;
};

// Per-CPU counters read by the agent: packets/bytes per (drop reason or 0, direction), and
// events the ring buffer refused (reported as LostEvent records, never silently).
BPF_PERCPU_ARRAY(cil_metrics, struct metrics_val, METRICS_SLOTS);
BPF_PERCPU_ARRAY(cil_events_lost, u64, 1);
BPF_PERCPU_ARRAY(cil_events_wake, u32, 1);

static __always_inline void count(u8 reason, u8 dir, u32 len) {
    u32 idx = ((u32)reason << 2) | dir;
    struct metrics_val *m = cil_metrics.lookup(&idx);
    if (m) {
        m->packets += 1;
        m->bytes += len;
    }
}

struct pkt {
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 proto;
    u8 tcp_flags;
};

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return -1;
    if (eth->h_proto != htons(ETH_P_IP))
        return -1;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end)
        return -1;
    p->saddr = ip->saddr;
    p->daddr = ip->daddr;
    p->proto = ip->protocol;
    p->sport = 0;
    p->dport = 0;
    p->tcp_flags = 0;
    if (ip->frag_off & htons(0x1FFF))  // non-first fragment: no L4 header
        return 0;
    u32 ihl = ip->ihl * 4;
    if (ihl < 20 || ihl > 60)
        return -1;
    void *l4 = (void *)ip + ihl;
    if (p->proto == IPPROTO_TCP) {
        if (l4 + 14 > end)
            return -1;
        p->sport = *(u16 *)l4;
        p->dport = *(u16 *)(l4 + 2);
        p->tcp_flags = *(u8 *)(l4 + 13);
    } else if (p->proto == IPPROTO_UDP || p->proto == IPPROTO_SCTP) {
        if (l4 + 4 > end)
            return -1;
        p->sport = *(u16 *)l4;
        p->dport = *(u16 *)(l4 + 2);
    }
    return 0;
}

static __always_inline struct ct_val *ct_lookup(struct ct_key *k) {
    if (k->proto == IPPROTO_TCP)
        return cil_ct_tcp.lookup(k);
    return cil_ct_any.lookup(k);
}

static __always_inline void ct_create(struct ct_key *k, struct ct_val *v) {
    if (k->proto == IPPROTO_TCP)
        cil_ct_tcp.update(k, v);
    else
        cil_ct_any.update(k, v);
}

static __always_inline void ct_touch(struct ct_val *e, struct pkt *p, u32 len, int reply) {
    e->last_seen_ns = bpf_ktime_get_ns();
    __sync_fetch_and_add(&e->packets, 1);
    __sync_fetch_and_add(&e->bytes, len);
    u32 f = e->flags;
    if (reply)
        f |= CT_SEEN_REPLY;
    if (p->tcp_flags & TCPF_RST)
        f |= CT_RST;
    if (p->tcp_flags & TCPF_FIN)
        f |= reply ? CT_RX_CLOSING : CT_TX_CLOSING;
    if (f != e->flags)
        e->flags = f;
}

static __always_inline void emit(struct pkt *p, struct __sk_buff *skb, u8 type, u8 verdict,
                                 u8 reason, u8 dir, u32 src_id, u32 dst_id, u32 ep_id,
                                 u8 match, u8 trace_reason) {
    struct flow_event ev = {};
    ev.ts_ns = bpf_ktime_get_ns();
    ev.src_identity = src_id;
    ev.dst_identity = dst_id;
    ev.saddr = p->saddr;
    ev.daddr = p->daddr;
    ev.sport = ntohs(p->sport);
    ev.dport = ntohs(p->dport);
    ev.ifindex = skb->ifindex;
    ev.len = skb->len;
    ev.endpoint_id = ep_id;
    ev.type = type;
    ev.verdict = verdict;
    ev.drop_reason = reason;
    ev.direction = dir;
    ev.proto = p->proto;
    ev.tcp_flags = p->tcp_flags;
    ev.trace_reason = trace_reason;
    ev.match_type = match;
    u32 zero = 0;
    u64 flags = RB_NO_WAKEUP;
    u32 *since_wake = cil_events_wake.lookup(&zero);
    if (since_wake && ++*since_wake >= EVENTS_WAKEUP_BATCH) {
        *since_wake = 0;
        flags = RB_FORCE_WAKEUP;
    }
    if (cil_events.ringbuf_output(&ev, sizeof(ev), flags) != 0) {
        u64 *lost = cil_events_lost.lookup(&zero);
        if (lost)
            *lost += 1;
    }
}

// Trace events for packets of known connections, aggregated: ct_val.pad holds the TCP flags
// already reported per side (bits 0-7 original direction, 8-15 reply) and the last report
// time in seconds (bits 16-31, wrapping).
static __always_inline void trace(struct ct_val *e, struct pkt *p, struct __sk_buff *skb, u8 dir,
                                  int reply) {
    if (dir == DIR_EGRESS && MONITOR_AGGREGATION >= AGG_LOWEST)
        return;  // receive-side (FROM_LXC) traces are hidden from lowest on
    u32 src_id = dir == DIR_EGRESS ? e->local_identity : e->peer_identity;
    u32 dst_id = dir == DIR_EGRESS ? e->peer_identity : e->local_identity;
    if (MONITOR_AGGREGATION < AGG_MEDIUM) {
        emit(p, skb, MSG_TRACE, VERDICT_FORWARDED, 0, dir, src_id, dst_id, 0, 0,
             reply ? TR_REPLY : TR_ESTABLISHED);
        return;
    }
    u32 state = e->pad;
    u32 shift = reply ? 8 : 0;
    u32 seen = (state >> shift) & 0xff;
    u32 flags = p->tcp_flags & TRACE_FLAGS;
    u32 now_s = (u32)(bpf_ktime_get_ns() / 1000000000ULL) & 0xffff;
    u32 last_s = state >> 16;
    int report = (flags | seen) != seen;
    if (!report && MONITOR_AGGREGATION < AGG_MAXIMUM && ((now_s - last_s) & 0xffff) >= MONITOR_INTERVAL_S)
        report = 1;
    if (!report)
        return;
    seen |= flags;
    e->pad = (now_s << 16) | (state & ~(0xffu << shift) & 0xffff) | (seen << shift);
    emit(p, skb, MSG_TRACE, VERDICT_FORWARDED, 0, dir, src_id, dst_id, 0, 0,
             reply ? TR_REPLY : TR_ESTABLISHED);
}

// The first packet of an allowed connection when no verdict event stands for it: traced where
// traces are kept (always at to_container, at from_container only without aggregation).
static __always_inline void trace_first(struct pkt *p, struct __sk_buff *skb, u8 dir, u32 src_id,
                                        u32 dst_id, u32 ep_id, u8 tr) {
    if (dir == DIR_EGRESS && MONITOR_AGGREGATION >= AGG_LOWEST)
        return;
    emit(p, skb, MSG_TRACE, VERDICT_FORWARDED, 0, dir, src_id, dst_id, ep_id, 0, tr);
}

static __always_inline int handle(struct __sk_buff *skb, u8 dir) {
    struct pkt p = {};
    if (parse(skb, &p) < 0)
        return TC_ACT_OK;

    // The local endpoint is the pod on this veth: source when leaving, destination when entering.
    struct endpoint_key ek = {.ip = dir == DIR_EGRESS ? p.saddr : p.daddr};
    struct endpoint_val *ep = cil_lxc.lookup(&ek);
    if (!ep)
        return TC_ACT_OK;
    u32 local_id = ep->identity;
    u32 ep_id = ep->endpoint_id;
    u32 ep_flags = ep->flags;

    struct ct_key k = {.saddr = p.saddr, .daddr = p.daddr, .sport = p.sport, .dport = p.dport,
                       .proto = p.proto, .direction = dir};
    u8 syn_only = p.proto == IPPROTO_TCP && (p.tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
    struct ct_val *e = ct_lookup(&k);
    if (e && !syn_only) {
        ct_touch(e, &p, skb->len, 0);
        trace(e, &p, skb, dir, 0);
        count(0, dir, skb->len);
        return TC_ACT_OK;
    }
    if (!e) {
        // A reply to a connection opened the other way (same node, the other hook made it).
        struct ct_key r = {.saddr = p.daddr, .daddr = p.saddr, .sport = p.dport, .dport = p.sport,
                           .proto = p.proto,
                           .direction = dir == DIR_EGRESS ? DIR_INGRESS : DIR_EGRESS};
        struct ct_val *re = ct_lookup(&r);
        if (re) {
            ct_touch(re, &p, skb->len, 1);
            trace(re, &p, skb, dir, 1);
            count(0, dir, skb->len);
            return TC_ACT_OK;
        }
    }

    // New connection (or a SYN reopening a tuple): decide policy once.
    u8 tr = e ? TR_REOPENED : TR_NEW;
    struct ipcache_key ik = {.prefixlen = 32, .ip = dir == DIR_EGRESS ? p.daddr : p.saddr};
    struct ipcache_val *peer_v = cil_ipcache.lookup(&ik);
    u32 peer_id = peer_v ? peer_v->identity : WORLD_IDENTITY;
    u32 src_id = dir == DIR_EGRESS ? local_id : peer_id;
    u32 dst_id = dir == DIR_EGRESS ? peer_id : local_id;

    u32 enforce_bit = dir == DIR_EGRESS ? EP_ENFORCE_EGRESS : EP_ENFORCE_INGRESS;
    struct ct_val nv = {};
    nv.created_ns = bpf_ktime_get_ns();
    nv.last_seen_ns = nv.created_ns;
    nv.packets = 1;
    nv.bytes = skb->len;
    nv.local_identity = local_id;
    nv.peer_identity = peer_id;
    if (p.tcp_flags & TCPF_RST)
        nv.flags |= CT_RST;

    // The first packet's flags count as reported (the verdict event stands for them).
    nv.pad = (((u32)(nv.created_ns / 1000000000ULL) & 0xffff) << 16) | (p.tcp_flags & TRACE_FLAGS);
    if (!(ep_flags & enforce_bit)) {
        ct_create(&k, &nv);
        count(0, dir, skb->len);
        trace_first(&p, skb, dir, src_id, dst_id, ep_id, tr);
        return TC_ACT_OK;
    }

    struct policy_key pk = {.prefixlen = POLICY_FULL_PREFIX, .local_identity = local_id,
                            .peer = peer_id, .direction = dir, .proto = p.proto,
                            .dport = p.dport};
    if (p.proto == IPPROTO_ICMP)
        pk.dport = 0;
    struct policy_val *by_peer = cil_policy.lookup(&pk);
    pk.peer = 0;
    struct policy_val *by_any = cil_policy.lookup(&pk);

    struct policy_val *hit = 0;
    u8 reason = DROP_POLICY_DENIED;
    if (by_peer && by_peer->deny) {
        hit = by_peer;
        reason = DROP_POLICY_DENY;
    } else if (by_any && by_any->deny) {
        hit = by_any;
        reason = DROP_POLICY_DENY;
    } else if (by_peer) {
        hit = by_peer;
        reason = 0;
    } else if (by_any) {
        hit = by_any;
        reason = 0;
    }
    u8 match = 0;
    if (hit) {
        __sync_fetch_and_add(&hit->packets, 1);
        __sync_fetch_and_add(&hit->bytes, skb->len);
        match = hit->match_type;
    }
    if (reason == 0) {
        ct_create(&k, &nv);
        count(0, dir, skb->len);
        if (LOG_ALLOWED_VERDICTS)
            emit(&p, skb, MSG_POLICY_VERDICT, VERDICT_FORWARDED, 0, dir, src_id, dst_id, ep_id,
                 match, tr);
        else
            trace_first(&p, skb, dir, src_id, dst_id, ep_id, tr);
        return TC_ACT_OK;
    }
    if (ep_flags & EP_AUDIT) {
        ct_create(&k, &nv);
        count(0, dir, skb->len);
        if (POLICY_VERDICT_LOG != PV_LOG_NONE)
            emit(&p, skb, MSG_POLICY_VERDICT, VERDICT_AUDIT, reason, dir, src_id, dst_id, ep_id,
                 match, tr);
        else
            trace_first(&p, skb, dir, src_id, dst_id, ep_id, tr);
        return TC_ACT_OK;
    }
    count(reason, dir, skb->len);
    emit(&p, skb, MSG_DROP, VERDICT_DROPPED, reason, dir, src_id, dst_id, ep_id, match, 0);
    return TC_ACT_SHOT;
}

int from_container(struct __sk_buff *skb) { return handle(skb, DIR_EGRESS); }

int to_container(struct __sk_buff *skb) { return handle(skb, DIR_INGRESS); }
