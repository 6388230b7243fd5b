// Map keys and values shared by the tc programs that read the agent's pinned maps
// (datapath.c enforces policy; proxy/bpf/redirect.c looks the same maps up). One definition:
// services/datapath/maps.py mirrors these layouts in ctypes.
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

#endif
