/* One TracingPolicy: a program per hook with its selectors compiled in. Template: the agent's
 * compiler fills the placeholders; map contents (binary sets, pod cgroups) are written after loading. */
{{COMMON}}

BPF_TABLE("extern", u32, struct proc_info, ciliate_procs, 65536);
BPF_CGROUP_ARRAY(node_cgroup, 1);
BPF_PERCPU_ARRAY(tp_scratch, struct ev_tp, 1);
BPF_RINGBUF_OUTPUT(events, {{RINGBUF_PAGES}});
BPF_PERCPU_ARRAY(lost_records, u64, 1);

static __always_inline void count_lost(void) {
    u32 zero = 0;
    u64 *n = lost_records.lookup(&zero);
    if (n)
        (*n)++;
}

struct rate_key {
    u32 tgid;
    u32 hook_selector;
};
BPF_TABLE("lru_hash", struct rate_key, u64, rate_limit, 16384);

static __always_inline void *kread_ptr(void *base, u64 off) {
    void *p = 0;
    bpf_probe_read_kernel(&p, sizeof(p), (char *)base + off);
    return p;
}

/* A function, not inline in the hook's macro: bcc rewrites map calls only outside macros. */
static __always_inline struct proc_info *lookup_proc(u32 tgid) {
    return ciliate_procs.lookup(&tgid);
}

static __always_inline void fill_hdr(struct ev_hdr *h, struct proc_info *pi) {
    u64 id = bpf_get_current_pid_tgid();
    h->kind = EV_TRACEPOINT;
    h->pid = id >> 32;
    h->tid = (u32)id;
    h->ppid = 0;
    h->ktime = bpf_ktime_get_ns();
    h->cgroup_id = bpf_get_current_cgroup_id();
    h->uid = (u32)bpf_get_current_uid_gid();
    h->aux0 = {{POLICY_ID}};
    h->exec_ktime = pi ? pi->exec_ktime : 0;
}

static __always_inline int rate_ok(u32 tgid, u32 hook_selector, u64 interval) {
    struct rate_key key = {.tgid = tgid, .hook_selector = hook_selector};
    u64 now = bpf_ktime_get_ns();
    u64 *last = rate_limit.lookup(&key);
    if (last && now - *last < interval)
        return 0;
    rate_limit.update(&key, &now);
    return 1;
}

{{DECLARATIONS}}

{{HOOKS}}
