/* calls.bpf.c: one generic entry program and one generic return program for every probed
 * library call (CUDA runtime and driver, NCCL, PyTorch c10d), compiled after argus.bpf.c.
 *
 * Attaches to: uprobes (argus_call_entry) and uretprobes (argus_call_return) placed by user
 *   space, per traced process, at the addresses the probe specs resolve to.
 * Maps:
 *   probes       (tgid, probed address) -> argus_probe_info: the in-kernel filter AND what to
 *                capture; a miss (an untraced process) costs one lookup and returns
 *   call_counts  (tgid, probe_id) -> calls entered: exact, never dropped, no ring buffer
 *   seqs         (tgid, communicator, peer) -> next sequence number (collectives, p2p)
 *   inflight     tid -> stack of entered calls awaiting their return (ARGUS_MAX_DEPTH deep);
 *                read by user space at the end: calls still blocked are hangs
 *   calls        ring buffer of struct argus_call / argus_call_str records, submitted with
 *                BPF_RB_NO_WAKEUP (user space reads it every 100 ms: Tracer.poll) except a
 *                communicator's first call (argus_wakeup); before a c10d group's first
 *                call, a struct argus_group_rec (argus_group_record)
 *   call_scratch per-CPU scratch for the inflight value (too big for the BPF stack)
 * Cost per hit (measured by `make bench`): entry-only ~ the uprobe trap plus two hash
 * lookups and a 128-byte ring-buffer record; entry+return adds the uretprobe trap and one
 * hash update.
 */
#ifndef ARGUS_MAX_PROBES
#define ARGUS_MAX_PROBES 65536
#endif
#ifndef ARGUS_MAX_COUNTS
#define ARGUS_MAX_COUNTS 65536
#endif
#ifndef ARGUS_MAX_THREADS
#define ARGUS_MAX_THREADS 16384
#endif
#ifndef ARGUS_CALL_PAGES
#define ARGUS_CALL_PAGES 1024
#endif
#if ARGUS_MAX_DEPTH != 4
#error "calls.bpf.c masks frame indexes with 3: keep ARGUS_MAX_DEPTH at 4"
#endif

BPF_HASH(probes, struct argus_probe_key, struct argus_probe_info, ARGUS_MAX_PROBES);
BPF_HASH(call_counts, struct argus_count_key, u64, ARGUS_MAX_COUNTS);
BPF_HASH(seqs, struct argus_seq_key, s64, ARGUS_MAX_COUNTS);
BPF_HASH(inflight, u32, struct argus_inflight, ARGUS_MAX_THREADS);
BPF_PERCPU_ARRAY(call_scratch, struct argus_inflight, 1);
BPF_RINGBUF_OUTPUT(calls, ARGUS_CALL_PAGES);

static __always_inline u64 argus_fnv1a_128(const u64 *w)
{
    u64 h = 0xcbf29ce484222325ULL;
#pragma unroll
    for (int i = 0; i < 16; i++) {
        h ^= w[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static __always_inline void argus_capture_args(struct pt_regs *ctx, u32 flags, u64 *args)
{
    args[0] = PT_REGS_PARM1(ctx);
    args[1] = PT_REGS_PARM2(ctx);
    args[2] = PT_REGS_PARM3(ctx);
    args[3] = PT_REGS_PARM4(ctx);
    args[4] = PT_REGS_PARM5(ctx);
    args[5] = PT_REGS_PARM6(ctx);
    if (flags & ARGUS_PF_STACK) {
        /* At function entry sp points at the return address; the 7th argument is at sp+8. */
        if (bpf_probe_read_user(&args[ARGUS_REG_ARGS], ARGUS_STACK_ARGS * sizeof(u64),
                                (void *)(PT_REGS_SP(ctx) + 8)) != 0)
            argus_drop(ARGUS_DROP_READ_FAULT);
    }
}

static __always_inline s64 argus_next_seq(u32 tgid, u64 comm, s32 peer)
{
    struct argus_seq_key k = {.tgid = tgid, .peer = peer, .comm = comm};
    s64 zero = 0;
    s64 *v = seqs.lookup_or_try_init(&k, &zero);
    if (!v) {
        argus_drop(ARGUS_DROP_COUNTS_FULL);
        return -1;
    }
    s64 s = *v;  /* one thread issues a communicator's calls: no atomic needed */
    *v = s + 1;
    return s;
}

/* A record wakes user space only when it is the first call on its communicator since
 * attach (seq 0): user space names a c10d group from the live process's memory then, which
 * must not wait for the next poll (a short job's rank may be gone by then). Every other
 * record waits for the poll's clock: a wakeup per record took argus from 1.15 to 1.37 % of
 * a core per traced rank on a 4-rank torch job. */
static __always_inline u64 argus_wakeup(s64 seq)
{
    return seq == 0 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

/* A c10d group's first call since attach: its Backend's head and name bytes, read now (user
 * space names the group from them, argus/collect/c10d.py). Reading the live process later,
 * when the ring is drained, fails once the rank has exited: a busy machine delays the drain
 * of a nice-10 tracer past the end of a short job. */
static __always_inline void argus_group_record(u32 tgid, u64 backend)
{
    struct argus_group_rec *g = calls.ringbuf_reserve(sizeof(*g));
    if (!g) {
        argus_drop(ARGUS_DROP_CALL_RINGBUF);
        return;
    }
    g->type = ARGUS_REC_GROUP;
    g->tgid = tgid;
    g->backend = backend;
    g->name_len = 0;
    g->pad = 0;
    if (bpf_probe_read_user(g->head, sizeof(g->head), (void *)backend) != 0) {
        argus_drop(ARGUS_DROP_READ_FAULT);
        calls.ringbuf_discard(g, BPF_RB_NO_WAKEUP);
        return;
    }
    u64 ptr = 0, n = 0;
    __builtin_memcpy(&ptr, &g->head[ARGUS_C10D_NAME_OFF], sizeof(ptr));
    __builtin_memcpy(&n, &g->head[ARGUS_C10D_NAME_OFF + 8], sizeof(n));
    if (n >= 1 && n <= ARGUS_C10D_NAME_LEN) {
        u32 len = (((u32)n - 1) & (ARGUS_C10D_NAME_LEN - 1)) + 1;  /* 1..64 for the verifier */
        if (bpf_probe_read_user(g->name, len, (void *)ptr) == 0)
            g->name_len = len;
        else
            argus_drop(ARGUS_DROP_READ_FAULT);
    }
    calls.ringbuf_submit(g, BPF_RB_NO_WAKEUP);  /* the call's own record wakes (seq 0) */
}

int argus_call_entry(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct argus_probe_key pk = {.tgid = tgid, .pad = 0, .addr = PT_REGS_IP(ctx)};
    struct argus_probe_info *pi = probes.lookup(&pk);
    if (!pi)
        return 0;
    u64 ts = bpf_ktime_get_ns();
    u32 flags = pi->flags;

    struct argus_count_key ck = {.tgid = tgid, .probe_id = pi->probe_id};
    u64 one = 0;
    u64 *cnt = call_counts.lookup_or_try_init(&ck, &one);
    if (cnt)
        __sync_fetch_and_add(cnt, 1);
    else
        argus_drop(ARGUS_DROP_COUNTS_FULL);
    if (flags & ARGUS_PF_NO_RECORD)
        return 0;

    int zero = 0;
    struct argus_inflight *scratch = call_scratch.lookup(&zero);
    if (!scratch)
        return 0;
    struct argus_frame *f = &scratch->frames[0];
    f->ts_ns = ts;
    f->sp = PT_REGS_SP(ctx);
    f->probe_id = pi->probe_id;
    f->flags = flags;
    f->out_arg = pi->out_arg;
    f->str_arg = pi->str_arg;
    argus_capture_args(ctx, flags, f->args);
    f->uid_hash = 0;
    f->seq = -1;
    if (flags & ARGUS_PF_UID_HASH) {
        u64 uid[16] = {};
        if (bpf_probe_read_user(uid, sizeof(uid), (void *)(PT_REGS_SP(ctx) + 8)) == 0)
            f->uid_hash = argus_fnv1a_128(uid);
        else
            argus_drop(ARGUS_DROP_READ_FAULT);
    }
    if (flags & ARGUS_PF_SEQ) {
        u32 ci = pi->seq_arg, pi_ = pi->peer_arg;
        u64 comm = 0;
        if (ci < ARGUS_MAX_ARGS)
            comm = f->args[ci];
        s32 peer = -1;
        if ((flags & ARGUS_PF_PEER) && pi_ < ARGUS_MAX_ARGS)
            peer = (s32)f->args[pi_];
        f->seq = argus_next_seq(tgid, comm, peer);
        if ((flags & ARGUS_PF_GROUP) && f->seq == 0)
            argus_group_record(tgid, comm);
    }

    if (!(flags & ARGUS_PF_EXIT)) {
        struct argus_call *r = calls.ringbuf_reserve(sizeof(*r));
        if (!r) {
            argus_drop(ARGUS_DROP_CALL_RINGBUF);
            return 0;
        }
        r->type = ARGUS_REC_CALL;
        r->probe_id = f->probe_id;
        r->tgid = tgid;
        r->tid = tid;
        r->ts_ns = ts;
        r->dur_ns = 0;
        __builtin_memcpy(r->args, f->args, sizeof(r->args));
        r->uid_hash = f->uid_hash;
        r->out = 0;
        r->seq = f->seq;
        r->ret = 0;
        calls.ringbuf_submit(r, argus_wakeup(f->seq));
        return 0;
    }

    /* Push onto this thread's in-flight stack; the return program pops it. */
    struct argus_inflight *st = inflight.lookup(&tid);
    if (!st) {
        scratch->tgid = tgid;
        scratch->depth = 0;
        inflight.update(&tid, scratch);
        st = inflight.lookup(&tid);
        if (!st) {
            argus_drop(ARGUS_DROP_COUNTS_FULL);
            return 0;
        }
    }
    u32 d = st->depth;
    if (d > ARGUS_MAX_DEPTH)
        d = ARGUS_MAX_DEPTH;
    /* The stack grows down: a frame whose entry sp is not above ours has returned without
     * its return being seen. Discard such frames (counted) before pushing. */
#pragma unroll
    for (int i = ARGUS_MAX_DEPTH - 1; i >= 0; i--) {
        if ((u32)i + 1 == d && st->frames[i].sp <= f->sp) {
            d = i;
            argus_drop(ARGUS_DROP_RET_ORPHAN);
        }
    }
    if (d >= ARGUS_MAX_DEPTH) {
        argus_drop(ARGUS_DROP_DEPTH);
        return 0;
    }
    st->tgid = tgid;
    st->frames[d & (ARGUS_MAX_DEPTH - 1)] = *f;
    st->depth = d + 1;
    return 0;
}

int argus_call_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct argus_inflight *st = inflight.lookup(&tid);
    if (!st)
        return 0;  /* not a traced thread, or the entry was not recorded */
    /* Find the frame this return belongs to: its entry stack pointer is ours minus the
     * popped return address. Frames above it are entries whose return was never seen (a
     * return probe attached after the entry fired, longjmp, a killed thread): discard them,
     * counted, so one lost return never wedges the thread's stack. */
    u64 sp = PT_REGS_SP(ctx) - 8;
    u32 d = st->depth;
    if (d > ARGUS_MAX_DEPTH)
        d = ARGUS_MAX_DEPTH;
    s32 hit = -1;
#pragma unroll
    for (int i = ARGUS_MAX_DEPTH - 1; i >= 0; i--) {
        if (hit < 0 && (u32)i < d && st->frames[i].sp == sp)
            hit = i;
    }
    if (hit < 0) {
        argus_drop(ARGUS_DROP_RET_ORPHAN);
        return 0;
    }
    for (u32 i = hit + 1; i < ARGUS_MAX_DEPTH; i++) {
        if (i < d)
            argus_drop(ARGUS_DROP_RET_ORPHAN);
    }
    st->depth = hit;
    /* The compiler may drop a plain mask after the checks above and the verifier then
     * loses the bound: mask inside asm so it stays. */
    u64 idx = (u32)hit;
    asm volatile("%0 &= 3" : "+r"(idx));
    struct argus_frame *f = &st->frames[idx];
    u64 now = bpf_ktime_get_ns();
    u32 want_str = f->flags & ARGUS_PF_STR;
    struct argus_call *r;
    if (want_str)
        r = calls.ringbuf_reserve(sizeof(struct argus_call_str));
    else
        r = calls.ringbuf_reserve(sizeof(struct argus_call));
    if (!r) {
        argus_drop(ARGUS_DROP_CALL_RINGBUF);
        return 0;
    }
    r->type = want_str ? ARGUS_REC_CALL_STR : ARGUS_REC_CALL;
    r->probe_id = f->probe_id;
    r->tgid = tgid;
    r->tid = tid;
    r->ts_ns = f->ts_ns;
    r->dur_ns = now - f->ts_ns;
    __builtin_memcpy(r->args, f->args, sizeof(r->args));
    r->uid_hash = f->uid_hash;
    r->out = 0;
    r->seq = f->seq;
    r->ret = PT_REGS_RC(ctx);
    if (f->flags & ARGUS_PF_OUT) {
        u64 v = 0;
        u32 oi = f->out_arg;
        u64 ptr = 0;
        if (oi < ARGUS_MAX_ARGS)
            ptr = f->args[oi];
        if (bpf_probe_read_user(&v, sizeof(v), (void *)ptr) == 0)
            r->out = v;
        else
            argus_drop(ARGUS_DROP_READ_FAULT);
    }
    if (want_str) {
        struct argus_call_str *rs = (struct argus_call_str *)r;
        u32 si = f->str_arg;
        u64 ptr = 0;
        if (si < ARGUS_MAX_ARGS)
            ptr = f->args[si];
        if (bpf_probe_read_user_str(rs->str, sizeof(rs->str), (void *)ptr) < 0)
            rs->str[0] = 0;
    }
    calls.ringbuf_submit(r, argus_wakeup(r->seq));
    return 0;
}
