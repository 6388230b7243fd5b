/* Always-on process lifecycle: exec, fork, exit with code or signal. Template: the agent fills
 * every placeholder from the running kernel (struct offsets from its BTF) before compiling. */
{{COMMON}}

BPF_TABLE_PUBLIC("hash", u32, struct proc_info, ciliate_procs, 65536);
BPF_CGROUP_ARRAY(node_cgroup, 1);
BPF_PERCPU_ARRAY(exec_scratch, struct ev_exec, 1);
BPF_PERCPU_ARRAY(proc_scratch, struct proc_info, 1);
BPF_RINGBUF_OUTPUT(events, {{RINGBUF_PAGES}});
BPF_PERCPU_ARRAY(lost_records, u64, 1);

/* A full ring buffer drops the record; count it so the agent reports the loss. */
static __always_inline void count_lost(void) {
    u32 zero = 0;
    u64 *n = lost_records.lookup(&zero);
    if (n)
        (*n)++;
}

struct exit_info {
    u32 code;
    u32 sig;
    u32 from_exit_group;
};
BPF_HASH(exits, u32, struct exit_info, 65536);

static __always_inline void *kread_ptr(void *base, u64 off) {
    void *p = 0;
    bpf_probe_read_kernel(&p, sizeof(p), (char *)base + off);
    return p;
}

static __always_inline void fill_hdr(struct ev_hdr *h, u32 kind) {
    u64 id = bpf_get_current_pid_tgid();
    h->kind = kind;
    h->pid = id >> 32;
    h->tid = (u32)id;
    h->ppid = 0;
    h->ktime = bpf_ktime_get_ns();
    h->cgroup_id = bpf_get_current_cgroup_id();
    h->uid = (u32)bpf_get_current_uid_gid();
    h->aux0 = 0;
    h->aux1 = 0;
    h->aux2 = 0;
    h->exec_ktime = 0;
}

static __always_inline u32 parent_tgid(void *task) {
    void *parent = kread_ptr(task, {{task_struct.real_parent}});
    u32 tgid = 0;
    bpf_probe_read_kernel(&tgid, sizeof(tgid), (char *)parent + {{task_struct.tgid}});
    return tgid;
}

/* The current directory as one string, crossing mount points: each name is copied, from the
 * leaf up, in front of what is already in the tail of cwd_build (after a '/'); one bounded read
 * per component of exactly its length. Returns the start of the string in cwd_build, which ends
 * at CWD_LEN; deeper or longer paths are cut at the root side and flagged. */
static __always_inline u32 read_cwd(void *task, struct ev_exec *e) {
    void *fs = kread_ptr(task, {{task_struct.fs}});
    void *dentry = kread_ptr(fs, {{fs_struct.pwd}} + {{path.dentry}});
    void *vfsmnt = kread_ptr(fs, {{fs_struct.pwd}} + {{path.mnt}});
    void *mnt = (char *)vfsmnt - {{mount.mnt}};
    u32 pos = CWD_LEN;
    int depth = 0;
#pragma unroll
    for (int i = 0; i < CWD_DEPTH + 4; i++) {
        void *mnt_root = kread_ptr(vfsmnt, {{vfsmount.mnt_root}});
        void *parent = kread_ptr(dentry, {{dentry.d_parent}});
        if (dentry == mnt_root) {
            void *mnt_parent = kread_ptr(mnt, {{mount.mnt_parent}});
            if (mnt_parent == mnt)
                break;
            dentry = kread_ptr(mnt, {{mount.mnt_mountpoint}});
            mnt = mnt_parent;
            vfsmnt = (char *)mnt + {{mount.mnt}};
            continue;
        }
        if (dentry == parent)
            break;
        u32 raw_len = 0;
        bpf_probe_read_kernel(&raw_len, sizeof(raw_len), (char *)dentry + {{dentry.d_name}} + {{qstr.len}});
        u32 nlen = raw_len & (CWD_LEN - 1);  /* names are at most NAME_MAX (255) bytes */
        if (depth >= CWD_DEPTH || nlen == 0 || nlen + 1 > pos) {
            e->flags |= EXEC_TRUNC_CWD;
            break;
        }
        pos = (pos - nlen) & (CWD_LEN - 1);
        void *name = kread_ptr(dentry, {{dentry.d_name}} + {{qstr.name}});
        bpf_probe_read_kernel(&e->cwd_build[pos], nlen & (CWD_LEN - 1), name);
        pos = (pos - 1) & (CWD_LEN - 1);
        e->cwd_build[pos] = '/';
        depth++;
        dentry = parent;
    }
    if (pos == CWD_LEN) {  /* the root itself */
        pos = CWD_LEN - 1;
        e->cwd_build[pos] = '/';
    }
    return pos;
}

/* Records go out without waking the reader, except every WAKE_EVERY-th on a CPU: the agent
 * reads in batches (a poll timeout bounds the delay), not once per exec. */
#define WAKE_EVERY 64
BPF_PERCPU_ARRAY(since_wakeup, u32, 1);

static __always_inline u64 wake_flags(void) {
    u32 zero = 0;
    u32 *n = since_wakeup.lookup(&zero);
    if (!n)
        return 0;
    *n += 1;
    if (*n < WAKE_EVERY)
        return BPF_RB_NO_WAKEUP;
    *n = 0;
    return BPF_RB_FORCE_WAKEUP;
}

TRACEPOINT_PROBE(sched, sched_process_exec) {
    if (node_cgroup.check_current_task(0) != 1)
        return 0;
    u32 zero = 0;
    struct ev_exec *e = exec_scratch.lookup(&zero);
    struct proc_info *pi = proc_scratch.lookup(&zero);
    if (!e || !pi)
        return 0;
    fill_hdr(&e->h, EV_EXEC);
    e->h.exec_ktime = e->h.ktime;
    e->flags = 0;
    void *task = (void *)bpf_get_current_task();
    e->h.ppid = parent_tgid(task);
    unsigned short loc = args->data_loc_filename & 0xFFFF;

    __builtin_memset(pi->binary, 0, PATH_LEN);
    long blen = bpf_probe_read_kernel_str(pi->binary, PATH_LEN, (char *)args + loc);
    u32 off = 0;
    if (blen > 1)
        off = (u32)(blen - 1);
    off &= PATH_LEN - 1;  /* the read stops at PATH_LEN - 1 bytes and a NUL */
    bpf_probe_read_kernel(e->data, off, pi->binary);
    e->binary_len = off;

    void *mm = kread_ptr(task, {{task_struct.mm}});
    u64 arg_start = 0, arg_end = 0;
    bpf_probe_read_kernel(&arg_start, sizeof(arg_start), (char *)mm + {{mm_struct.arg_start}});
    bpf_probe_read_kernel(&arg_end, sizeof(arg_end), (char *)mm + {{mm_struct.arg_end}});
    u64 len = arg_end - arg_start;
    if (len > ARGS_LEN - 1) {
        len = ARGS_LEN - 1;
        e->flags |= EXEC_TRUNC_ARGS;
    }
    u32 alen = 0;
    if (len > 0 && bpf_probe_read_user(&e->data[off], len, (void *)arg_start) == 0)
        alen = len;
    e->args_len = alen;
    off = (off + alen) & (EXEC_DATA_LEN - 1);  /* at most PATH_LEN + ARGS_LEN - 2 */

    u32 start = read_cwd(task, e);
    if (start > CWD_LEN - 1)
        start = CWD_LEN - 1;
    u32 clen = (CWD_LEN - start) & (2 * CWD_LEN - 1);
    bpf_probe_read_kernel(&e->data[off], clen, &e->cwd_build[start]);
    e->cwd_len = clen;
    off = (off + clen) & (2 * EXEC_DATA_LEN - 1);

    pi->exec_ktime = e->h.ktime;
    u32 tgid = e->h.pid;
    ciliate_procs.update(&tgid, pi);
    exits.delete(&tgid);
    u64 size = offsetof(struct ev_exec, data) + off;
    if (size > offsetof(struct ev_exec, cwd_build))
        size = offsetof(struct ev_exec, cwd_build);
    if (events.ringbuf_output(e, size, wake_flags()))
        count_lost();
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork) {
    if (node_cgroup.check_current_task(0) != 1)
        return 0;
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    u32 child = args->child_pid;
    struct ev_hdr h = {};
    fill_hdr(&h, EV_FORK);
    h.ppid = parent;
    h.pid = child;
    h.tid = child;
    struct proc_info *pi = ciliate_procs.lookup(&parent);
    if (pi) {
        h.exec_ktime = pi->exec_ktime;
        ciliate_procs.update(&child, pi);
    }
    if (events.ringbuf_output(&h, sizeof(h), wake_flags()))
        count_lost();
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group) {
    if (node_cgroup.check_current_task(0) != 1)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct exit_info info = {};
    info.code = (u32)args->error_code & 0xFF;
    info.from_exit_group = 1;
    exits.update(&tgid, &info);
    return 0;
}

/* Signals whose default action ends the process (signal(7)); bit n set for signal n. */
#define FATAL_BY_DEFAULT (~((1ULL << 17) | (1ULL << 18) | (1ULL << 19) | (1ULL << 20) | \
                           (1ULL << 21) | (1ULL << 22) | (1ULL << 23) | (1ULL << 28) | 1ULL))

TRACEPOINT_PROBE(signal, signal_deliver) {
    int sig = args->sig;
    if (sig <= 0 || sig >= 64)
        return 0;
    if (sig != 9 && (args->sa_handler != 0 || !((FATAL_BY_DEFAULT >> sig) & 1)))
        return 0;
    if (node_cgroup.check_current_task(0) != 1)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct exit_info *old = exits.lookup(&tgid);
    if (old && old->from_exit_group)
        return 0;  /* siblings of an exit_group caller are killed; keep the real code */
    struct exit_info info = {};
    info.sig = sig;
    exits.update(&tgid, &info);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u32 tgid = id >> 32;
    if (tid != tgid)
        ciliate_procs.delete(&tid);
    if (!args->group_dead)
        return 0;
    if (node_cgroup.check_current_task(0) != 1)
        return 0;
    struct ev_hdr h = {};
    fill_hdr(&h, EV_EXIT);
    struct exit_info *info = exits.lookup(&tgid);
    if (info) {
        h.aux0 = info->code;
        h.aux1 = info->sig;
    }
    struct proc_info *pi = ciliate_procs.lookup(&tgid);
    if (pi)
        h.exec_ktime = pi->exec_ktime;
    if (events.ringbuf_output(&h, sizeof(h), wake_flags()))
        count_lost();
    exits.delete(&tgid);
    ciliate_procs.delete(&tgid);
    return 0;
}
