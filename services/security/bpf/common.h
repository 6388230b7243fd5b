/* Records sent from the kernel to the agent; mirrored byte for byte by core/wire.py. */
#define EV_EXEC 1
#define EV_EXIT 2
#define EV_FORK 3
#define EV_TRACEPOINT 4

#define PATH_LEN 256
#define ARGS_LEN 512
#define CWD_LEN 256     /* the current directory as one string, at most this long */
#define CWD_DEPTH 16    /* path components walked up from the current directory */
#define EXEC_DATA_LEN (PATH_LEN + ARGS_LEN + CWD_LEN)
#define EXEC_TRUNC_ARGS 1
#define EXEC_TRUNC_CWD 2
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

/* Only the used prefix is submitted: header, lengths, then binary, args and cwd back to back
 * (no NULs between them, args keep their own separators). cwd_build is scratch where the cwd is
 * assembled from the leaf up; it is never submitted. */
struct ev_exec {
    struct ev_hdr h;
    u16 binary_len;
    u16 args_len;
    u16 cwd_len;
    u16 flags;      /* EXEC_TRUNC_* */
    char data[EXEC_DATA_LEN];
    char cwd_build[2 * CWD_LEN];
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
