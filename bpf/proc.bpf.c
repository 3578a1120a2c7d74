/* proc.bpf.c: process lifecycle of watched processes (compiled after argus.bpf.c).
 *
 * Attaches to (argus_on_fork/exec/exit): tracepoints sched:sched_process_fork, sched:sched_process_exec,
 *   sched:sched_process_exit.
 * Maps: proc_events (ring buffer, its own: lifecycle never competes with call records for
 *   space; a failed reserve is still counted in drops[ARGUS_DROP_PROC_RINGBUF]).
 * A fork by a watched ARGUS_W_DESCEND process watches the child (ARGUS_W_DESCEND only: user
 * space turns on ARGUS_W_TRACE once the child maps a library argus probes), so ranks that
 * start after attach are never missed. Cost: one hash lookup per fork/exec/exit on the node.
 */
#ifndef ARGUS_PROC_PAGES
#define ARGUS_PROC_PAGES 64
#endif

BPF_RINGBUF_OUTPUT(proc_events, ARGUS_PROC_PAGES);

static __always_inline void argus_proc_emit(u32 what, u32 tgid, u32 child)
{
    struct argus_proc_event *e = proc_events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        argus_drop(ARGUS_DROP_PROC_RINGBUF);
        return;
    }
    e->type = ARGUS_REC_PROC;
    e->what = what;
    e->ts_ns = bpf_ktime_get_ns();
    e->tgid = tgid;
    e->child = child;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    proc_events.ringbuf_submit(e, 0);
}

/* The loader reads child_pid's offset from tracefs's format file (it moved between kernel
 * versions when the comm fields became __data_loc) and passes it as this define. */
#ifndef ARGUS_TP_FORK_CHILD_PID_OFF
#define ARGUS_TP_FORK_CHILD_PID_OFF 20
#endif

int argus_on_fork(void *ctx)
{
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    u32 *w = watched.lookup(&parent);
    if (!w || !(*w & ARGUS_W_DESCEND))
        return 0;
    u32 child = *(s32 *)((char *)ctx + ARGUS_TP_FORK_CHILD_PID_OFF);
    u32 flags = ARGUS_W_DESCEND;
    /* A new thread of the watched process also lands here (its tid is not a tgid); user
     * space ignores it and the exit tracepoint removes the entry. */
    watched.update(&child, &flags);
    argus_proc_emit(ARGUS_PROC_FORK, parent, child);
    return 0;
}

int argus_on_exec(void *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!watched.lookup(&tgid))
        return 0;
    argus_proc_emit(ARGUS_PROC_EXEC, tgid, 0);
    return 0;
}

int argus_on_exit(void *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    if (tid != tgid) {
        watched.delete(&tid);  /* a thread's entry added at fork, if any */
        return 0;
    }
    if (!watched.lookup(&tgid))
        return 0;
    argus_proc_emit(ARGUS_PROC_EXIT, tgid, 0);
    return 0;
}
