// Ciliate service load balancing: socket LB (cgroup sock_addr hooks) and tc NodePort LB.
//
// Socket LB, attached at a node's cgroup subtree:
//   sock4_connect      connect(): frontend -> backend (TCP and connected UDP)
//   sock4_sendmsg      sendto() on unconnected UDP: frontend -> backend
//   sock4_recvmsg      recvfrom() on UDP: backend -> frontend (reverse, per socket cookie)
//   sock4_getpeername  getpeername(): backend -> frontend
// tc LB, on the node's bridge-facing interface:
//   nodeport_ingress   NodePort/LB/external traffic from other nodes: DNAT (+SNAT when the
//                      backend is remote) with conntrack; replies to SNATed flows: reverse NAT
//   nodeport_egress    replies of local backends leaving the node: reverse NAT
// DSR mode (DSR_MODE): a remote backend gets the client's packet unSNATed with the service
// address in an IPv4 option; the backend's node strips it on ingress, remembers the reverse
// translation, and its egress program sends the reply straight to the client.
//
// Placeholders (__NAME__) are filled by loader.py. Struct layouts match maps.py (ctypes); the
// event record (struct flow_event, services/datapath/bpf/maps.h) matches
// services/datapath/core/events.py (EVENT).

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>

#include "maps.h"  // struct flow_event, shared with datapath.c (-I services/datapath/bpf)

#define PIN(name) "__PIN_DIR__/" name
#define MAGLEV_M __MAGLEV_M__
#define NODE_IP __NODE_IP__  // network order
#define NODEPORT_MIN __NODEPORT_MIN__
#define NODEPORT_MAX __NODEPORT_MAX__
#define DSR_MODE __DSR__  // 1: NodePort to a remote backend without SNAT (bpf-lb-mode=dsr)

#define SVC_NODEPORT 0x01
#define SVC_EXTERNAL_IP 0x02
#define SVC_LOADBALANCER 0x04
#define SVC_AFFINITY 0x08
#define SVC_LOCAL_SCOPE 0x10
#define SVC_MAGLEV 0x20

#define BE_STATE_ACTIVE 0
#define BE_REMOTE 0x01

#define NODE_ADDR_LOCAL 1
#define NODE_ADDR_REMOTE 2

#define CT_FWD 0
#define CT_REV 1
#define CT_SNAT 0x01
#define CT_DSR 0x02  // REV entry made on the backend's node from a DSR option

// Cilium's DSR_IPV4_OPT_TYPE: IPOPT_COPY | 26 (copied to fragments, unassigned number), 8
// bytes: type, length, service port, service address (both network order).
#define DSR_OPT_TYPE 0x9a
#define DSR_OPT_LEN 8

#define MSG_DROP 1
#define MSG_TRACE_SOCK 7
#define VERDICT_DROPPED 2
#define DIR_INGRESS 1
#define DIR_EGRESS 2
#define DROP_NO_SERVICE_BACKEND 158

#define ECONNREFUSED 111

struct dsr_opt {
    u8 type;
    u8 len;
    u16 port;
    u32 addr;
};

struct lb4_key {
    u32 address;      // network order
    u16 dport;        // network order
    u16 backend_slot;
    u8 proto;
    u8 scope;
    u16 pad;
};

struct lb4_service {
    u32 backend_id;
    u32 affinity_timeout;  // seconds
    u32 rev_nat_index;
    u16 count;
    u8 flags;
    u8 pad;
    u64 table_id;
};

struct lb4_backend {
    u32 address;  // network order
    u16 port;     // network order
    u8 proto;
    u8 state;
    u8 flags;
    u8 pad[3];
};

struct lb4_revnat {
    u32 address;
    u16 port;
    u16 pad;
};

struct sk_revnat_key {
    u64 cookie;
    u32 address;
    u16 port;
    u16 pad;
};

struct sk_revnat_val {
    u32 address;
    u16 port;
    u16 pad;
    u32 rev_nat_index;
};

struct affinity_key {
    u64 client;  // netns cookie (socket LB) or client address (tc LB)
    u32 rev_nat_index;
    u8 netns;    // 1 = client is a netns cookie
    u8 pad[3];
};

struct affinity_val {
    u64 last_used_ns;
    u32 backend_id;
    u32 pad;
};

struct maglev_inner {
    u32 backend_ids[MAGLEV_M];
};

struct lb_ct_key {
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 proto;
    u8 dir;
    u16 pad;
};

struct lb_ct_val {
    u32 backend_id;
    u32 rev_nat_index;
    u32 orig_addr;  // FWD: unused; REV: the frontend address to restore as source
    u32 client_addr;  // REV+SNAT: the client to restore as destination
    u16 orig_port;
    u16 client_port;
    u8 flags;
    u8 pad[3];
    u64 last_seen_ns;
};

BPF_TABLE_PINNED("hash", struct lb4_key, struct lb4_service, lb4_services,
                 __SERVICES_SIZE__, PIN("lb4_services"));
BPF_TABLE_PINNED("hash", u32, struct lb4_backend, lb4_backends,
                 __BACKENDS_SIZE__, PIN("lb4_backends"));
BPF_TABLE_PINNED("hash", u32, struct lb4_revnat, lb4_reverse_nat,
                 __REVNAT_SIZE__, PIN("lb4_reverse_nat"));
BPF_TABLE_PINNED("lru_hash", struct sk_revnat_key, struct sk_revnat_val, lb4_reverse_sk,
                 __SK_REVNAT_SIZE__, PIN("lb4_reverse_sk"));
BPF_TABLE_PINNED("lru_hash", struct affinity_key, struct affinity_val, lb4_affinity,
                 __AFFINITY_SIZE__, PIN("lb4_affinity"));
BPF_TABLE_PINNED("hash", u32, u8, lb4_node_addrs, 1024, PIN("lb4_node_addrs"));
BPF_TABLE_PINNED("lru_hash", struct lb_ct_key, struct lb_ct_val, lb4_ct,
                 __CT_SIZE__, PIN("lb4_ct"));
// Maglev tables: one entry per distinct table (keyed by table id), the whole table as the
// value. A flat hash instead of Cilium's hash-of-maps: every map-in-map update or delete from
// user space waits for an RCU grace period (~10 ms here), which made loading 2,000 tables take
// 22 s; a hash value is replaced atomically without waiting.
BPF_TABLE_PINNED7("hash", u64, struct maglev_inner, lb4_maglev, __MAGLEV_TABLES__,
                  PIN("lb4_maglev"), BPF_F_NO_PREALLOC);
BPF_RINGBUF_OUTPUT(lb_events, __EVENTS_PAGES__);

// --- shared selection --------------------------------------------------------------------

static __always_inline struct lb4_service *lookup_service(struct lb4_key *key, int nodeport_ok)
{
    struct lb4_service *svc = lb4_services.lookup(key);
    if (svc || !nodeport_ok)
        return svc;
    u16 port = bpf_ntohs(key->dport);
    if (port < NODEPORT_MIN || port > NODEPORT_MAX)
        return 0;
    u32 addr = key->address;
    u8 *kind = lb4_node_addrs.lookup(&addr);
    if (!kind || (nodeport_ok == NODE_ADDR_LOCAL && *kind != NODE_ADDR_LOCAL))
        return 0;
    key->address = 0;  // Cilium's surrogate frontend: every address of the node
    svc = lb4_services.lookup(key);
    key->address = addr;
    if (svc && !(svc->flags & SVC_NODEPORT))
        return 0;
    return svc;
}

static __always_inline u32 maglev_pick(struct lb4_service *svc, u32 hash)
{
    u64 tid = svc->table_id;
    struct maglev_inner *t = lb4_maglev.lookup(&tid);
    if (!t)
        return 0;
    u32 idx = hash % MAGLEV_M;
    asm volatile("" : "+r"(idx));  // keep the bound check: the verifier loses '%' bounds
    if (idx >= MAGLEV_M)
        return 0;
    return t->backend_ids[idx];
}

static __always_inline u32 slot_pick(struct lb4_key *key, struct lb4_service *svc, u32 hash)
{
    struct lb4_key slot = *key;
    slot.backend_slot = (hash % svc->count) + 1;
    struct lb4_service *s = lb4_services.lookup(&slot);
    return s ? s->backend_id : 0;
}

static __always_inline u32 select_backend(struct lb4_key *key, struct lb4_service *svc, u32 hash)
{
    if (svc->flags & SVC_MAGLEV) {
        u32 id = maglev_pick(svc, hash);
        if (id)
            return id;
    }
    return slot_pick(key, svc, hash);
}

static __always_inline u32 affinity_get(struct lb4_service *svc, u64 client, u8 netns)
{
    struct affinity_key ak = {.client = client, .rev_nat_index = svc->rev_nat_index,
                              .netns = netns};
    struct affinity_val *av = lb4_affinity.lookup(&ak);
    if (!av)
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (now - av->last_used_ns > (u64)svc->affinity_timeout * 1000000000ULL)
        return 0;
    u32 id = av->backend_id;
    struct lb4_backend *be = lb4_backends.lookup(&id);
    if (!be || be->state != BE_STATE_ACTIVE)
        return 0;
    av->last_used_ns = now;
    return id;
}

static __always_inline void affinity_put(struct lb4_service *svc, u64 client, u8 netns, u32 id)
{
    struct affinity_key ak = {.client = client, .rev_nat_index = svc->rev_nat_index,
                              .netns = netns};
    struct affinity_val av = {.last_used_ns = bpf_ktime_get_ns(), .backend_id = id};
    lb4_affinity.update(&ak, &av);
}

static __always_inline void emit_event(u8 type, u32 saddr, u32 daddr, u16 sport, u16 dport,
                                       u8 proto, u32 ifindex, u32 len, u8 dir)
{
    struct flow_event *e = lb_events.ringbuf_reserve(sizeof(struct flow_event));
    if (!e)
        return;
    __builtin_memset(e, 0, sizeof(*e));
    e->ts_ns = bpf_ktime_get_ns();
    e->saddr = saddr;
    e->daddr = daddr;
    e->sport = sport;
    e->dport = dport;
    e->ifindex = ifindex;
    e->len = len;
    e->type = type;
    e->verdict = VERDICT_DROPPED;
    e->drop_reason = DROP_NO_SERVICE_BACKEND;
    e->direction = dir;
    e->proto = proto;
    lb_events.ringbuf_submit(e, 0);
}

// --- socket LB ---------------------------------------------------------------------------

// 0 = not a service (leave alone), 1 = translated, -1 = no backend (refuse)
static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx, int udp_only)
{
    u8 proto = (u8)ctx->protocol;
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return 0;
    if (udp_only && proto != IPPROTO_UDP)
        return 0;
    struct lb4_key key = {};
    key.address = ctx->user_ip4;
    key.dport = (u16)ctx->user_port;
    key.proto = proto;
    struct lb4_service *svc = lookup_service(&key, NODE_ADDR_REMOTE);
    if (!svc)
        return 0;
    if (svc->count == 0) {
        emit_event(MSG_TRACE_SOCK, 0, key.address, 0, bpf_ntohs(key.dport), proto, 0, 0,
                   DIR_EGRESS);
        return -1;
    }
    u64 netns = bpf_get_netns_cookie(ctx);
    u32 id = 0;
    if (svc->flags & SVC_AFFINITY)
        id = affinity_get(svc, netns, 1);
    if (!id) {
        // TCP: a fresh random pick per connect; UDP: stable per socket.
        u32 hash = proto == IPPROTO_TCP ? bpf_get_prandom_u32()
                                        : (u32)bpf_get_socket_cookie(ctx) * 2654435761u;
        id = select_backend(&key, svc, hash);
        if (id && (svc->flags & SVC_AFFINITY))
            affinity_put(svc, netns, 1, id);
    }
    struct lb4_backend *be = id ? lb4_backends.lookup(&id) : 0;
    if (!be) {
        emit_event(MSG_TRACE_SOCK, 0, key.address, 0, bpf_ntohs(key.dport), proto, 0, 0,
                   DIR_EGRESS);
        return -1;
    }
    struct sk_revnat_key rk = {.cookie = bpf_get_socket_cookie(ctx), .address = be->address,
                               .port = be->port};
    struct sk_revnat_val rv = {.address = ctx->user_ip4, .port = (u16)ctx->user_port,
                               .rev_nat_index = svc->rev_nat_index};
    lb4_reverse_sk.update(&rk, &rv);
    ctx->user_ip4 = be->address;
    ctx->user_port = be->port;
    return 1;
}

static __always_inline void sock4_xlate_rev(struct bpf_sock_addr *ctx)
{
    struct sk_revnat_key rk = {.cookie = bpf_get_socket_cookie(ctx), .address = ctx->user_ip4,
                               .port = (u16)ctx->user_port};
    struct sk_revnat_val *rv = lb4_reverse_sk.lookup(&rk);
    if (!rv)
        return;
    u32 rev = rv->rev_nat_index;
    if (!lb4_reverse_nat.lookup(&rev)) {  // the service is gone: stale
        lb4_reverse_sk.delete(&rk);
        return;
    }
    ctx->user_ip4 = rv->address;
    ctx->user_port = rv->port;
}

int sock4_connect(struct bpf_sock_addr *ctx)
{
    if (sock4_xlate_fwd(ctx, 0) < 0) {
        bpf_set_retval(-ECONNREFUSED);
        return 0;
    }
    return 1;
}

int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
    if (sock4_xlate_fwd(ctx, 1) < 0) {
        bpf_set_retval(-ECONNREFUSED);
        return 0;
    }
    return 1;
}

int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
    sock4_xlate_rev(ctx);
    return 1;
}

int sock4_getpeername(struct bpf_sock_addr *ctx)
{
    sock4_xlate_rev(ctx);
    return 1;
}

// --- tc LB -------------------------------------------------------------------------------

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))

struct pkt {
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 proto;
    u32 l4_off;
    u32 csum_off;
    u32 len;
};

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return -1;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl != 5)
        return -1;
    if (ip->frag_off & bpf_htons(0x3fff))
        return -1;
    p->proto = ip->protocol;
    if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
        return -1;
    u16 *ports = (void *)(ip + 1);
    if ((void *)(ports + 2) > end)
        return -1;
    p->saddr = ip->saddr;
    p->daddr = ip->daddr;
    p->sport = ports[0];
    p->dport = ports[1];
    p->l4_off = ETH_HLEN + sizeof(struct iphdr);
    p->csum_off = p->l4_off + (p->proto == IPPROTO_TCP ? 16 : 6);
    p->len = skb->len;
    return 0;
}

static __always_inline int udp_csum_zero(struct __sk_buff *skb, struct pkt *p)
{
    u16 c = 0;
    if (p->proto != IPPROTO_UDP)
        return 0;
    if (bpf_skb_load_bytes(skb, p->csum_off, &c, 2) < 0)
        return 1;
    return c == 0;
}

static __always_inline void set_addr(struct __sk_buff *skb, struct pkt *p, u32 off, u32 old,
                                     u32 new)
{
    if (!udp_csum_zero(skb, p))
        bpf_l4_csum_replace(skb, p->csum_off, old, new, BPF_F_PSEUDO_HDR | 4);
    bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, 4);
    bpf_skb_store_bytes(skb, off, &new, 4, 0);
}

static __always_inline void set_port(struct __sk_buff *skb, struct pkt *p, u32 off, u16 old,
                                     u16 new)
{
    if (!udp_csum_zero(skb, p))
        bpf_l4_csum_replace(skb, p->csum_off, old, new, 2);
    bpf_skb_store_bytes(skb, off, &new, 2, 0);
}

static __always_inline u32 tuple_hash(struct pkt *p)
{
    u32 h = p->saddr * 2654435761u;
    h ^= (p->daddr + 0x9e3779b9 + (h << 6) + (h >> 2));
    h ^= ((((u32)p->sport) << 16 | p->dport) + 0x9e3779b9 + (h << 6) + (h >> 2));
    h ^= (p->proto + 0x9e3779b9 + (h << 6) + (h >> 2));
    return h;
}

// Send a packet we SNATed (or un-SNATed) straight out of the interface the FIB picks: its
// source is now a node address, which the stack would drop as a martian on input.
static __always_inline int fib_redirect(struct __sk_buff *skb, u32 saddr, u32 daddr, u8 proto)
{
    struct bpf_fib_lookup fib = {};
    fib.family = 2;  // AF_INET
    fib.l4_protocol = proto;
    fib.tot_len = skb->len - ETH_HLEN;
    fib.ipv4_src = saddr;
    fib.ipv4_dst = daddr;
    fib.ifindex = skb->ifindex;
    int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
        return TC_ACT_SHOT;
    // bcc declares an older 3-argument prototype; call the helper by number (4 arguments).
    return ((long (*)(u32, void *, int, u64))BPF_FUNC_redirect_neigh)(fib.ifindex, 0, 0, 0);
}

// The TCP header's flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, ...).
static __always_inline u8 tcp_flags(struct __sk_buff *skb, struct pkt *p)
{
    u8 fl = 0;
    bpf_skb_load_bytes(skb, p->l4_off + 13, &fl, 1);
    return fl;
}

// A TCP segment opening a connection: SYN without ACK.
static __always_inline int is_syn(struct __sk_buff *skb, struct pkt *p)
{
    return (tcp_flags(skb, p) & 0x12) == 0x02;
}

// Reverse NAT of a reply whose tuple has a REV conntrack entry.
static __always_inline int rev_nat(struct __sk_buff *skb, struct pkt *p)
{
    struct lb_ct_key k = {.saddr = p->saddr, .daddr = p->daddr, .sport = p->sport,
                          .dport = p->dport, .proto = p->proto, .dir = CT_REV};
    struct lb_ct_val *v = lb4_ct.lookup(&k);
    if (!v)
        return 0;
    v->last_seen_ns = bpf_ktime_get_ns();
    u32 orig_addr = v->orig_addr, client_addr = v->client_addr;
    u16 orig_port = v->orig_port, client_port = v->client_port;
    u8 flags = v->flags;
    set_addr(skb, p, IP_SRC_OFF, p->saddr, orig_addr);
    set_port(skb, p, p->l4_off, p->sport, orig_port);
    if (flags & CT_SNAT) {
        set_addr(skb, p, IP_DST_OFF, p->daddr, client_addr);
        set_port(skb, p, p->l4_off + 2, p->dport, client_port);
        p->saddr = orig_addr;
        p->daddr = client_addr;
        return 2;
    }
    return 1;
}

// --- DSR (bpf-lb-mode=dsr) ---------------------------------------------------------------

// Entry node: after the DNAT to a remote backend, put the service address and port in an IPv4
// option (Cilium's dsr_set_opt4). The option goes into the room bpf_skb_adjust_room(NET)
// opens right after the 20-byte base header; the IP checksum is patched by difference.
static __always_inline int dsr_insert(struct __sk_buff *skb, u32 svc_addr, u16 svc_port)
{
    u32 old0 = 0;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &old0, 4) < 0)
        return -1;
    u32 new0 = old0;
    u8 *b = (u8 *)&new0;
    u16 tot = (((u16)b[2] << 8) | b[3]) + DSR_OPT_LEN;
    b[0] = 0x45 + (DSR_OPT_LEN >> 2);  // version 4, ihl 7
    b[2] = tot >> 8;
    b[3] = tot & 0xff;
    struct dsr_opt opt = {.type = DSR_OPT_TYPE, .len = DSR_OPT_LEN, .port = svc_port,
                          .addr = svc_addr};
    s64 sum = bpf_csum_diff(&old0, 4, &new0, 4, 0);
    sum = bpf_csum_diff(0, 0, (u32 *)&opt, sizeof(opt), sum);
    if (bpf_skb_adjust_room(skb, DSR_OPT_LEN, BPF_ADJ_ROOM_NET, 0) < 0)
        return -1;
    if (bpf_skb_store_bytes(skb, ETH_HLEN, &new0, 4, 0) < 0 ||
        bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct iphdr), &opt, sizeof(opt), 0) < 0)
        return -1;
    return bpf_l3_csum_replace(skb, IP_CSUM_OFF, 0, sum, 0);
}

// Backend node: a packet carrying our DSR option (ihl 7, the option first) records the
// reverse translation {backend, client} -> service address/port in lb4_ct (the egress
// program rewrites the reply's source with it, so the reply goes straight to the client),
// then the option is removed so the pod sees a plain header (Cilium's dsr_extract_opt4 +
// the SNAT entry it creates).
static __always_inline int dsr_extract(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return 0;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl != 5 + (DSR_OPT_LEN >> 2))
        return 0;
    if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
        return 0;
    if (ip->frag_off & bpf_htons(0x3fff))
        return 0;
    struct dsr_opt *o = (void *)(ip + 1);
    u16 *ports = (void *)(o + 1);
    if ((void *)(ports + 2) > end)
        return 0;
    if (o->type != DSR_OPT_TYPE || o->len != DSR_OPT_LEN)
        return 0;
    struct dsr_opt opt = *o;
    struct lb_ct_key rk = {.saddr = ip->daddr, .daddr = ip->saddr, .sport = ports[1],
                           .dport = ports[0], .proto = ip->protocol, .dir = CT_REV};
    struct lb_ct_val rv = {.orig_addr = opt.addr, .orig_port = opt.port, .flags = CT_DSR,
                           .client_addr = ip->saddr, .client_port = ports[0],
                           .last_seen_ns = bpf_ktime_get_ns()};
    lb4_ct.update(&rk, &rv);
    u32 old0 = *(u32 *)ip;
    u32 new0 = old0;
    u8 *b = (u8 *)&new0;
    u16 tot = (((u16)b[2] << 8) | b[3]) - DSR_OPT_LEN;
    b[0] = 0x45;
    b[2] = tot >> 8;
    b[3] = tot & 0xff;
    s64 sum = bpf_csum_diff(&old0, 4, &new0, 4, 0);
    sum = bpf_csum_diff((u32 *)&opt, sizeof(opt), 0, 0, sum);
    if (bpf_skb_store_bytes(skb, ETH_HLEN, &new0, 4, 0) < 0)
        return 1;
    bpf_l3_csum_replace(skb, IP_CSUM_OFF, 0, sum, 0);
    bpf_skb_adjust_room(skb, -DSR_OPT_LEN, BPF_ADJ_ROOM_NET, 0);
    return 1;
}

int nodeport_ingress(struct __sk_buff *skb)
{
    int dsr = DSR_MODE ? dsr_extract(skb) : 0;  // 1: a DSR flow's first packet, entry written
    struct pkt p = {};
    if (parse(skb, &p) < 0)
        return TC_ACT_OK;
    int rev = rev_nat(skb, &p);
    if (rev == 2)  // a reply to a flow we SNATed: back to the client
        return fib_redirect(skb, p.saddr, p.daddr, p.proto);
    if (rev)
        return TC_ACT_OK;
    struct lb4_key key = {.address = p.daddr, .dport = p.dport, .proto = p.proto};
    struct lb4_service *svc = lookup_service(&key, NODE_ADDR_LOCAL);
    if (!svc || !(svc->flags & (SVC_NODEPORT | SVC_EXTERNAL_IP | SVC_LOADBALANCER))) {
        // Not service traffic (ClusterIPs are not reachable from outside the node). A new
        // connection straight to a backend may reuse the tuple of an earlier service flow
        // from the same client port: its reverse entry would rewrite this connection's
        // replies to the service address, so a SYN retires it (Cilium re-creates such CT
        // entries on a SYN too).
        if (!dsr && p.proto == IPPROTO_TCP && is_syn(skb, &p)) {
            struct lb_ct_key rk = {.saddr = p.daddr, .daddr = p.saddr, .sport = p.dport,
                                   .dport = p.sport, .proto = p.proto, .dir = CT_REV};
            if (lb4_ct.lookup(&rk))
                lb4_ct.delete(&rk);
        }
        return TC_ACT_OK;
    }

    struct lb_ct_key fk = {.saddr = p.saddr, .daddr = p.daddr, .sport = p.sport,
                           .dport = p.dport, .proto = p.proto, .dir = CT_FWD};
    struct lb_ct_val *fv = lb4_ct.lookup(&fk);
    u32 id = 0;
    struct lb4_backend *be = 0;
    u8 fresh = 0;  // a new pick: the reverse entry is (re)written
    if (fv) {
        id = fv->backend_id;
        be = lb4_backends.lookup(&id);  // gone: pick again, as Cilium does
        if (be)
            fv->last_seen_ns = bpf_ktime_get_ns();
    }
    if (!be) {
        if (svc->count == 0) {
            emit_event(MSG_DROP, p.saddr, p.daddr, bpf_ntohs(p.sport), bpf_ntohs(p.dport),
                       p.proto, skb->ifindex, p.len, DIR_INGRESS);
            return TC_ACT_SHOT;
        }
        id = 0;
        if (svc->flags & SVC_AFFINITY)
            id = affinity_get(svc, p.saddr, 0);
        if (!id) {
            id = select_backend(&key, svc, tuple_hash(&p));
            if (id && (svc->flags & SVC_AFFINITY))
                affinity_put(svc, p.saddr, 0, id);
        }
        be = id ? lb4_backends.lookup(&id) : 0;
        if (!be) {
            emit_event(MSG_DROP, p.saddr, p.daddr, bpf_ntohs(p.sport), bpf_ntohs(p.dport),
                       p.proto, skb->ifindex, p.len, DIR_INGRESS);
            return TC_ACT_SHOT;
        }
        struct lb_ct_val nv = {.backend_id = id, .rev_nat_index = svc->rev_nat_index,
                               .last_seen_ns = bpf_ktime_get_ns()};
        lb4_ct.update(&fk, &nv);
        fresh = 1;
    }
    u32 baddr = be->address;
    u16 bport = be->port;
    u8 remote = be->flags & BE_REMOTE;
    if (DSR_MODE && remote) {
        // DSR: keep the client's address, so the backend's node answers it directly. A
        // client that is itself a node address gets SNAT: the backend's node would drop a
        // packet from its own address as a martian.
        u32 client = p.saddr;
        if (!lb4_node_addrs.lookup(&client)) {
            u8 opt = p.proto == IPPROTO_UDP;  // UDP: every datagram; TCP: the SYN (as Cilium)
            if (!opt)
                opt = (tcp_flags(skb, &p) & 0x02) != 0;
            u32 svc_addr = p.daddr;
            u16 svc_port = p.dport;
            set_addr(skb, &p, IP_DST_OFF, p.daddr, baddr);
            set_port(skb, &p, p.l4_off + 2, p.dport, bport);
            if (opt && dsr_insert(skb, svc_addr, svc_port) < 0)
                return TC_ACT_SHOT;
            return fib_redirect(skb, client, baddr, p.proto);
        }
    }
    u8 snat = remote ? CT_SNAT : 0;
    u32 new_src = snat ? NODE_IP : p.saddr;
    struct lb_ct_key rk = {.saddr = baddr, .daddr = new_src, .sport = bport,
                           .dport = p.sport, .proto = p.proto, .dir = CT_REV};
    // Written once per flow, not per packet: an LRU update allocates a new element every
    // time (a quarter of the tc LB's per-connection cost with 3 client packets per flow).
    if (fresh || !lb4_ct.lookup(&rk)) {
        struct lb_ct_val rv = {.backend_id = id, .rev_nat_index = svc->rev_nat_index,
                               .orig_addr = p.daddr, .orig_port = p.dport,
                               .client_addr = p.saddr, .client_port = p.sport,
                               .flags = snat, .last_seen_ns = bpf_ktime_get_ns()};
        lb4_ct.update(&rk, &rv);
    }
    set_addr(skb, &p, IP_DST_OFF, p.daddr, baddr);
    set_port(skb, &p, p.l4_off + 2, p.dport, bport);
    if (snat) {
        set_addr(skb, &p, IP_SRC_OFF, p.saddr, new_src);
        return fib_redirect(skb, new_src, baddr, p.proto);
    }
    return TC_ACT_OK;
}

int nodeport_egress(struct __sk_buff *skb)
{
    struct pkt p = {};
    if (parse(skb, &p) < 0)
        return TC_ACT_OK;
    rev_nat(skb, &p);
    return TC_ACT_OK;
}
