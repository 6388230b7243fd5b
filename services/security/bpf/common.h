/* Records sent from the kernel to the agent; mirrored byte for byte by core/wire.py. */
#define EV_EXEC 1
#define EV_EXIT 2
#define EV_FORK 3
#define EV_TRACEPOINT 4

#define PATH_LEN 256
#define ARGS_LEN 512
#define CWD_DEPTH 16
#define NAME_LEN 64
#define TP_MAX_ARGS 5
#define TP_STR_LEN 256

struct ev_hdr {
    u32 kind;
    u32 pid;        /* thread group id: what users call the pid */
    u32 tid;
    u32 ppid;       /* parent's thread group id (exec, fork) */
    u64 ktime;      /* bpf_ktime_get_ns() when the event happened */
    u64 cgroup_id;  /* cgroup v2 id of the task */
    u32 uid;
    u32 aux0;       /* exit: exit code; tracepoint: policy id */
    u32 aux1;       /* exit: signal; tracepoint: hook << 8 | selector */
    u32 aux2;       /* exec: argument bytes; tracepoint: action code */
    u64 exec_ktime; /* ktime of the exec (or fork) that started this process image */
};

struct ev_exec {
    struct ev_hdr h;
    char binary[PATH_LEN];
    char args[ARGS_LEN];
    char cwd[CWD_DEPTH][NAME_LEN]; /* path components, leaf first */
};

struct ev_tp {
    struct ev_hdr h;
    u64 ints[TP_MAX_ARGS];
    char strs[TP_MAX_ARGS][TP_STR_LEN];
};

/* What the policy programs know about a running process, keyed by tgid. */
struct proc_info {
    u64 exec_ktime;
    char binary[PATH_LEN]; /* zero padded, so it can be a hash key */
};
