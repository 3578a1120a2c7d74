/* cpu_stacks.bpf.c: on-CPU stack sampling of the traced processes (compiled after argus.bpf.c).
 *
 * Attaches to: a perf_event software cpu-clock event on every CPU at -F HZ (no hardware PMU
 *   is needed; the VMs argus runs in often have none).
 * Maps (double-buffered: stack_buf[0] names the live half; user space flips it, waits for
 *   in-flight samples, then drains and clears the other half, so stack ids are never deleted
 *   under a writer):
 *   stacks0/1        a 64-bit hash of the frames -> argus_native_stack (bpf_get_stack's
 *                    frames). Not a BPF_STACK_TRACE: that map keys a stack by 14 bits of its
 *                    hash and refuses (-EEXIST) a second stack in an occupied bucket, so
 *                    some 1 in 16,000 pairs of distinct stacks lose one of them (seen: 1-3
 *                    stacks lost per run on real torch jobs, and 2 on the simulator)
 *   stack_counts0/1  argus_stack_key (tgid, tid, user/kernel stack keys, comm) -> samples
 *   py_procs         tgid -> argus_py_proc: the interpreter layout of a traced Python
 *                    process (written by argus/collect/cpython_walk.py after it validated it)
 *   py_tstates       LRU tid -> its PyThreadState address (bit 0 set: none, the value is
 *                    the time of that miss; looked up again after 1 s)
 *   py_stacks0/1     hash of the frames -> argus_py_stack (code object addresses, innermost
 *                    first), double-buffered like the stacks; key.py_stack_id names one
 *   py_stats         samples with a Python stack, without a thread state, ... (ARGUS_PY_STAT_*)
 * Failed user/kernel walks and full maps are counted in drops. Cost: one hash lookup for an
 * untraced sample; two stack walks, a hash of their frames (at most ARGUS_NATIVE_DEPTH
 * words each) and three hash updates for a traced one; for a thread of a
 * Python process, a cached thread-state lookup (one or two reads to confirm it) and 2-3
 * 8-byte user reads per Python frame (at most ARGUS_PY_DEPTH frames) plus one hash update.
 */
#ifndef ARGUS_STACK_SLOTS
#define ARGUS_STACK_SLOTS 16384
#endif
#ifndef ARGUS_STACK_KEYS
#define ARGUS_STACK_KEYS 16384
#endif

BPF_ARRAY(stack_buf, u32, 1);
BPF_PERCPU_ARRAY(native_scratch, struct argus_native_stack, 1);
BPF_HASH(stacks0, u64, struct argus_native_stack, ARGUS_STACK_SLOTS);
BPF_HASH(stacks1, u64, struct argus_native_stack, ARGUS_STACK_SLOTS);
BPF_HASH(stack_counts0, struct argus_stack_key, u64, ARGUS_STACK_KEYS);
BPF_HASH(stack_counts1, struct argus_stack_key, u64, ARGUS_STACK_KEYS);

#ifndef ARGUS_PY_STACK_KEYS
#define ARGUS_PY_STACK_KEYS 8192
#endif
#define ARGUS_PY_OWNED_BY_CSTACK 3
#define ARGUS_PY_MISS_RETRY_NS 1000000000ull

BPF_HASH(py_procs, u32, struct argus_py_proc, 4096);
BPF_TABLE("lru_hash", u32, u64, py_tstates, 16384);
BPF_PERCPU_ARRAY(py_scratch, struct argus_py_stack, 1);
BPF_HASH(py_stacks0, u64, struct argus_py_stack, ARGUS_PY_STACK_KEYS);
BPF_HASH(py_stacks1, u64, struct argus_py_stack, ARGUS_PY_STACK_KEYS);
BPF_ARRAY(py_stats, u64, ARGUS_PY_NSTATS);

#define ARGUS_EFAULT 14

static __always_inline void argus_py_stat(u32 what)
{
    u64 *v = py_stats.lookup(&what);
    if (v)
        __sync_fetch_and_add(v, 1);
}

/* 0 and *out = the word at addr, or -1 (fault). */
static __always_inline int argus_py_read(u64 addr, u64 *out)
{
    *out = 0;
    return bpf_probe_read_user(out, sizeof(*out), (void *)addr) ? -1 : 0;
}

/* The kernel tid a PyThreadState belongs to, 0 when unknown or unreadable. */
static __always_inline u32 argus_py_tid_of(struct argus_py_proc *c, u64 ts)
{
    u64 v;
    if (argus_py_read(ts + c->ts_tid, &v))
        return 0;
    if (c->flags & ARGUS_PY_PTHREAD) {
        u32 tid = 0;
        if (!v || bpf_probe_read_user(&tid, sizeof(tid), (void *)(v + c->pthread_tid)))
            return 0;
        return tid;
    }
    return (u32)v;
}

/* The PyThreadState of thread `tid`: cached, confirmed by one read; else the interpreter's
 * thread list is searched (ARGUS_PY_THREADS at most). 0: none (a native thread). */
static __always_inline u64 argus_py_tstate(struct argus_py_proc *c, u32 tid, u64 now)
{
    u64 *hit = py_tstates.lookup(&tid);
    if (hit) {
        u64 v = *hit;
        if (v & 1) {
            if (now - (v & ~1ull) < ARGUS_PY_MISS_RETRY_NS)
                return 0;
        } else if (v && argus_py_tid_of(c, v) == tid) {
            return v;
        }
    }
    u64 interp, ts;
    if (argus_py_read(c->runtime + c->interp_head, &interp) || !interp ||
        argus_py_read(interp + c->threads_head, &ts)) {
        argus_drop(ARGUS_DROP_PY_WALK);
        return 0;
    }
#pragma clang loop unroll(disable)
    for (int i = 0; i < ARGUS_PY_THREADS; i++) {
        if (!ts)
            break;
        if (argus_py_tid_of(c, ts) == tid) {
            py_tstates.update(&tid, &ts);
            return ts;
        }
        if (argus_py_read(ts + c->ts_next, &ts)) {
            argus_drop(ARGUS_DROP_PY_WALK);
            return 0;
        }
    }
    u64 miss = now | 1;
    py_tstates.update(&tid, &miss);
    return 0;
}

/* The sampled thread's Python frames into py_stacks<buf>; the key of that entry (0: none). */
static __always_inline u64 argus_py_walk(u32 tgid, u32 tid, u32 buf)
{
    struct argus_py_proc *c = py_procs.lookup(&tgid);
    if (!c)
        return 0;
    u64 ts = argus_py_tstate(c, tid, bpf_ktime_get_ns());
    if (!ts) {
        argus_py_stat(ARGUS_PY_STAT_NO_THREAD);
        return 0;
    }
    int zero = 0;
    struct argus_py_stack *st = py_scratch.lookup(&zero);
    if (!st)
        return 0;
    u64 f;
    if (argus_py_read(ts + c->ts_frame, &f))
        goto fault;
    if ((c->flags & ARGUS_PY_CFRAME) && f && argus_py_read(f + c->cframe_frame, &f))
        goto fault;
    /* The frame count lives in the map value, not in a register: the verifier then sees
     * the same state at the loop head whichever branch an iteration took (no path blow-up). */
    st->depth = 0;
    st->truncated = 0;
    /* 3.12+ put one shim frame (owned by the C stack) below each C-level eval call: the loop
     * may see up to one shim per kept frame. */
#pragma clang loop unroll(disable)
    for (int i = 0; i < 2 * ARGUS_PY_DEPTH; i++) {
        if (!f)
            break;
        u32 n = st->depth;
        if (c->flags & ARGUS_PY_OWNER) {
            u8 owner = 0;
            if (bpf_probe_read_user(&owner, 1, (void *)(f + c->frame_owner)))
                goto fault;
            if (owner == ARGUS_PY_OWNED_BY_CSTACK) {
                if (n > 0) {
                    u32 at = n - 1;
                    asm volatile("" : "+r"(at));
                    st->code[at & (ARGUS_PY_DEPTH - 1)] |= ARGUS_PY_CODE_ENTRY;
                }
                if (argus_py_read(f + c->frame_prev, &f))
                    goto fault;
                continue;
            }
        }
        if (n >= ARGUS_PY_DEPTH) {
            st->truncated = 1;
            break;
        }
        u64 code;
        if (argus_py_read(f + c->frame_code, &code))
            goto fault;
        if (c->flags & ARGUS_PY_ALL_ENTRY) {
            code |= ARGUS_PY_CODE_ENTRY;
        } else if (c->flags & ARGUS_PY_IS_ENTRY) {
            u8 entry = 0;
            if (bpf_probe_read_user(&entry, 1, (void *)(f + c->frame_entry)))
                goto fault;
            if (entry)
                code |= ARGUS_PY_CODE_ENTRY;
        }
        u32 at = n;
        asm volatile("" : "+r"(at)); /* keep the mask: clang drops it, the verifier needs it */
        st->code[at & (ARGUS_PY_DEPTH - 1)] = code;
        st->depth = n + 1;
        if (argus_py_read(f + c->frame_prev, &f))
            goto fault;
    }
    u32 depth = st->depth;
    if (!depth) {
        argus_py_stat(ARGUS_PY_STAT_NO_FRAME);
        return 0;
    }
    if (st->truncated)
        argus_py_stat(ARGUS_PY_STAT_TRUNCATED);
    u64 h = 14695981039346656037ull; /* FNV-1a over the code words */
#pragma clang loop unroll(disable)
    for (int i = 0; i < ARGUS_PY_DEPTH; i++) {
        if (i >= depth)
            break;
        u32 at = i;
        asm volatile("" : "+r"(at));
        h = (h ^ st->code[at & (ARGUS_PY_DEPTH - 1)]) * 1099511628211ull;
    }
    h |= 1; /* never 0 (0: no Python stack) */
    int err = buf ? py_stacks1.update(&h, st) : py_stacks0.update(&h, st);
    if (err) {
        argus_drop(ARGUS_DROP_PY_MAP_FULL);
        return 0;
    }
    argus_py_stat(ARGUS_PY_STAT_WALKED);
    return h;
fault:
    argus_drop(ARGUS_DROP_PY_WALK);
    return 0;
}

#define ARGUS_EEXIST 17

/* The sampled context's user (or kernel) frames into stacks<buf>: their key, 0 when the walk
 * failed (an empty stack counts as failed, as bpf_get_stackid has it) or the map was full. */
static __always_inline u64 argus_native_stack(void *ctx, u32 buf, int user)
{
    int zero = 0;
    struct argus_native_stack *st = native_scratch.lookup(&zero);
    if (!st)
        return 0;
    long len = bpf_get_stack(ctx, st->ip, sizeof(st->ip), user ? BPF_F_USER_STACK : 0);
    if (len <= 0) {
        argus_drop(user ? ARGUS_DROP_STACK_USER : ARGUS_DROP_STACK_KERNEL);
        return 0;
    }
    st->len = len;
    u32 n = len / sizeof(u64);
    u64 h = 14695981039346656037ull; /* FNV-1a over the frames */
#pragma clang loop unroll(disable)
    for (int i = 0; i < ARGUS_NATIVE_DEPTH; i++) {
        if (i >= n)
            break;
        h = (h ^ st->ip[i]) * 1099511628211ull;
    }
    h |= 1; /* never 0 (0: no stack) */
    int err = buf ? stacks1.insert(&h, st) : stacks0.insert(&h, st);
    if (err && err != -ARGUS_EEXIST) { /* -EEXIST: this stack is there already */
        argus_drop(ARGUS_DROP_STACK_MAP_FULL);
        return 0;
    }
    return h;
}

/* The perf_event program's context, struct bpf_perf_event_data of
 * uapi/linux/bpf_perf_event.h (x86-64: its bpf_user_pt_regs_t is struct pt_regs), spelled
 * out here: that header pulls in the kernel's asm/ptrace.h and with it 0.9 s of clang's
 * time, half of what compiling argus's whole program set took. */
struct argus_perf_event_data {
    struct pt_regs regs;
    u64 sample_period;
    u64 addr;
};

int argus_cpu_sample(struct argus_perf_event_data *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 *w = watched.lookup(&tgid);
    if (!w || !(*w & ARGUS_W_TRACE))
        return 0;
    struct argus_stack_key key = {};
    key.tgid = tgid;
    key.tid = (u32)id;
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    int zero = 0;
    u32 *buf = stack_buf.lookup(&zero);
    u64 one = 0, *v;
    int in_kernel = (ctx->regs.cs & 3) != 3;  /* x86: ring 0 */
    u32 half = buf ? *buf : 0;
    key.py_stack_id = argus_py_walk(tgid, key.tid, half);
    key.user_stack_id = argus_native_stack(ctx, half, 1);
    key.kernel_stack_id = in_kernel ? argus_native_stack(ctx, half, 0) : 0;
    v = half ? stack_counts1.lookup_or_try_init(&key, &one)
             : stack_counts0.lookup_or_try_init(&key, &one);
    if (v)
        __sync_fetch_and_add(v, 1);
    else
        argus_drop(ARGUS_DROP_STACK_MAP_FULL);
    return 0;
}
