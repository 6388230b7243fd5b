// Map keys and values shared by the tc programs that read the agent's pinned maps
// (datapath.c enforces policy; proxy/bpf/redirect.c looks the same maps up), and the event
// record every ring buffer carries (datapath.c, lb/bpf/lb.c). One definition:
// services/datapath/maps.py mirrors these layouts in ctypes, core/events.py the event.
#ifndef CILIATE_DATAPATH_MAPS_H
#define CILIATE_DATAPATH_MAPS_H

struct ipcache_key {
    u32 prefixlen;
    u32 ip;  // network order
};

struct ipcache_val {
    u32 identity;
    u32 flags;
};

struct endpoint_key {
    u32 ip;  // network order
};

struct endpoint_val {
    u32 endpoint_id;
    u32 identity;
    u32 flags;
};

struct policy_key {
    u32 prefixlen;
    u32 local_identity;
    u32 peer;
    u8 direction;
    u8 proto;
    u16 dport;  // network order, so a prefix over its bits is a port block
};

struct policy_val {
    u8 deny;
    u8 match_type;
    u16 proxy_port;
    u32 pad;
    u64 packets;
    u64 bytes;
};

// One flow/drop/trace record: services/datapath/core/events.py EVENT (48 bytes, no padding).
struct flow_event {
    u64 ts_ns;
    u32 src_identity;
    u32 dst_identity;
    u32 saddr;
    u32 daddr;
    u16 sport;  // host order
    u16 dport;
    u32 ifindex;
    u32 len;
    u32 endpoint_id;
    u8 type;
    u8 verdict;
    u8 drop_reason;
    u8 direction;
    u8 proto;
    u8 tcp_flags;
    u8 trace_reason;  // datapath.c: TR_* (0 for drops); the LB's events leave it 0
    u8 match_type;
};

#endif
