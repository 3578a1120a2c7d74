/* cpu_stacks.bpf.c: on-CPU stack sampling of the traced processes (compiled after argus.bpf.c).
 *
 * Attaches to: a perf_event software cpu-clock event on every CPU at -F HZ (no hardware PMU
 *   is needed; the VMs argus runs in often have none).
 * Maps (double-buffered: stack_buf[0] names the live half; user space flips it, waits for
 *   in-flight samples, then drains and clears the other half, so stack ids are never deleted
 *   under a writer):
 *   stacks0/1        stack id -> frames (BPF_STACK_TRACE)
 *   stack_counts0/1  argus_stack_key (tgid, tid, user/kernel stack ids, comm) -> samples
 * Failed user/kernel walks and full maps are counted in drops. Cost: one hash lookup for an
 * untraced sample; two stack walks and one hash update for a traced one.
 */
#ifndef ARGUS_STACK_SLOTS
#define ARGUS_STACK_SLOTS 16384
#endif
#ifndef ARGUS_STACK_KEYS
#define ARGUS_STACK_KEYS 16384
#endif

BPF_ARRAY(stack_buf, u32, 1);
BPF_STACK_TRACE(stacks0, ARGUS_STACK_SLOTS);
BPF_STACK_TRACE(stacks1, ARGUS_STACK_SLOTS);
BPF_HASH(stack_counts0, struct argus_stack_key, u64, ARGUS_STACK_KEYS);
BPF_HASH(stack_counts1, struct argus_stack_key, u64, ARGUS_STACK_KEYS);

#define ARGUS_EFAULT 14

static __always_inline void argus_stack_err(int id, int user)
{
    if (id == -ARGUS_EFAULT)
        argus_drop(user ? ARGUS_DROP_STACK_USER : ARGUS_DROP_STACK_KERNEL);
    else if (id < 0)
        argus_drop(ARGUS_DROP_STACK_MAP_FULL); /* -EEXIST (hash collision) or -ENOMEM (full) */
}

int argus_cpu_sample(struct bpf_perf_event_data *ctx)
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
    if (buf && *buf) {
        key.user_stack_id = stacks1.get_stackid(&ctx->regs, BPF_F_USER_STACK);
        key.kernel_stack_id = in_kernel ? stacks1.get_stackid(&ctx->regs, 0) : -1;
        v = stack_counts1.lookup_or_try_init(&key, &one);
    } else {
        key.user_stack_id = stacks0.get_stackid(&ctx->regs, BPF_F_USER_STACK);
        key.kernel_stack_id = in_kernel ? stacks0.get_stackid(&ctx->regs, 0) : -1;
        v = stack_counts0.lookup_or_try_init(&key, &one);
    }
    if (key.user_stack_id < 0)
        argus_stack_err(key.user_stack_id, 1);
    if (in_kernel && key.kernel_stack_id < 0)
        argus_stack_err(key.kernel_stack_id, 0);
    if (v)
        __sync_fetch_and_add(v, 1);
    else
        argus_drop(ARGUS_DROP_STACK_MAP_FULL);
    return 0;
}
