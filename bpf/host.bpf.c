/* host.bpf.c: host context of the traced processes' node (channel "host"; compiled after
 * argus.bpf.c): what else on the node explains a slow or a stuck rank.
 *
 * Attaches to (tracepoints only; field offsets come from tracefs format files as -D flags,
 * because the kernel headers bcc compiles with need not match the running kernel):
 *   sched:sched_switch     argus_host_switch: CPU contention and off-CPU stacks
 *   sched:sched_wakeup     argus_host_wakeup: run-queue latency of woken traced threads
 *   tcp:tcp_retransmit_skb argus_host_tcp_retrans
 *   oom:mark_victim        argus_host_oom
 *   block:block_rq_issue / block:block_rq_complete   argus_host_blk_issue / _complete
 * Each is optional: the loader skips a tracepoint the kernel lacks and says so.
 *
 * Maps:
 *   host_counts  argus_host_key (kind, tgid, detail, comm) -> argus_host_val (count,
 *                total_ns), cumulative; user space takes deltas per interval. Runnable
 *                waits are also summed per 10 ms slot of their start (kind CPU_WAIT,
 *                detail = the slot), keys that user space deletes once read
 *   preempted    tid -> argus_preempt: a traced thread switched out while runnable (when,
 *                and what ran instead), or woken onto a busy CPU (when, and what ran on
 *                it); deleted when it runs again, the wait aggregated under that comm
 *   cpu_curr     cpu -> what runs on it now (tid, comm, since when), updated at every
 *                switch; a traced thread's on-CPU time (switched in -> out) is summed per
 *                process under kind ON_CPU (the demand its runnable waits are judged by)
 *   traced_tids  LRU tid -> tgid of traced threads seen switching out (a wakeup names only
 *                the thread; this says whether it is traced)
 *   host_pending [0] = entries in `preempted`; while 0, a switch to an untraced thread skips
 *                the `preempted` lookup
 *   offcpu       tid -> argus_offcpu: the LATEST blocking switch of each traced thread (since
 *                when, user + kernel stack, and the words at the user sp; a block at the
 *                recent site keeps that site's stacks, see argus_offcpu_record)
 *   offcpu_sites LRU (site, tgid, tid) -> argus_offcpu: the stacks of each thread's recent
 *                blocking sites
 *   offcpu_tmp   per-CPU scratch for building an argus_offcpu (too big for the BPF stack)
 *   blk_start    (dev, sector) -> issue time of an in-flight block request
 * Full maps are counted in drops[ARGUS_DROP_HOST_MAP_FULL].
 *
 * Cost. sched_switch runs on every context switch of the node: for a switch between
 * untraced threads it is one hash lookup (watched, by the outgoing tgid) and one array
 * lookup (host_pending); only while a traced thread is preempted does a switch also look up
 * the incoming tid in `preempted`. Every switch also looks the incoming tid up in
 * traced_tids and writes its CPU's cpu_curr slot (28 bytes); the clock is read only when
 * the outgoing or the incoming thread is traced (its on-CPU time ends or begins: a thread's
 * slices count from its first switch-out, when traced_tids learns it). A traced thread switched out adds a hash update (its on-CPU
 * time), and when still runnable one more; one switched out blocked reads its user registers and
 * looks up its last off-CPU entry: blocked at the same site, it only updates the time; at
 * a recent site of the thread it copies that site's stacks (offcpu_sites); elsewhere (or
 * 1 s after the site's last walk) it adds a user and a kernel stack walk and a
 * 696-byte hash update (the off-CPU stack), like one CPU sample. sched_wakeup runs on every wakeup of the node: one LRU lookup; a
 * traced thread woken onto a busy CPU adds an array lookup, a clock read and a hash insert. TCP retransmits and OOM kills are
 * rare; a block request costs two hash operations at issue and three at completion.
 */
#ifndef ARGUS_HOST_KEYS
#define ARGUS_HOST_KEYS 16384
#endif
/* runnable waits are also summed per time slot of this length (ARGUS_HOST_CPU_WAIT) */
#ifndef ARGUS_WAIT_BUCKET_NS
#define ARGUS_WAIT_BUCKET_NS 10000000ULL
#endif
#ifndef ARGUS_HOST_THREADS
#define ARGUS_HOST_THREADS 16384
#endif
#ifndef ARGUS_BLK_INFLIGHT
#define ARGUS_BLK_INFLIGHT 8192
#endif

/* Offsets (format files of the running kernel; defaults: 6.x x86-64). */
#ifndef ARGUS_TP_SS_PREV_STATE_OFF
#define ARGUS_TP_SS_PREV_STATE_OFF 32
#endif
#ifndef ARGUS_TP_SS_PREV_STATE_SIZE
#define ARGUS_TP_SS_PREV_STATE_SIZE 8
#endif
#ifndef ARGUS_TP_SS_NEXT_COMM_OFF
#define ARGUS_TP_SS_NEXT_COMM_OFF 40
#endif
#ifndef ARGUS_TP_SS_NEXT_PID_OFF
#define ARGUS_TP_SS_NEXT_PID_OFF 56
#endif
/* prev_state of a task switched out while runnable: 0 (TASK_RUNNING), possibly with the
 * preemption marker TASK_REPORT_MAX (0x100 since 4.14) set; the real states are below it. */
#ifndef ARGUS_TP_SS_STATE_MASK
#define ARGUS_TP_SS_STATE_MASK 0xff
#endif
#ifndef ARGUS_TP_WK_PID_OFF
#define ARGUS_TP_WK_PID_OFF 24
#endif
#ifndef ARGUS_TP_WK_CPU_OFF
#define ARGUS_TP_WK_CPU_OFF 32
#endif
#ifndef ARGUS_MAX_CPUS
#define ARGUS_MAX_CPUS 1024
#endif
#ifndef ARGUS_TP_TCP_DPORT_OFF
#define ARGUS_TP_TCP_DPORT_OFF 30
#endif
#ifndef ARGUS_TP_TCP_FAMILY_OFF
#define ARGUS_TP_TCP_FAMILY_OFF 32
#endif
#ifndef ARGUS_TP_TCP_DADDR_OFF
#define ARGUS_TP_TCP_DADDR_OFF 38
#endif
#ifndef ARGUS_TP_OOM_PID_OFF
#define ARGUS_TP_OOM_PID_OFF 8
#endif
#ifndef ARGUS_TP_OOM_COMM_OFF
#define ARGUS_TP_OOM_COMM_OFF 12  /* __data_loc: u32 (len << 16 | offset) */
#endif
#ifndef ARGUS_TP_BLK_DEV_OFF
#define ARGUS_TP_BLK_DEV_OFF 8
#endif
#ifndef ARGUS_TP_BLK_SECTOR_OFF
#define ARGUS_TP_BLK_SECTOR_OFF 16
#endif
#ifndef ARGUS_TP_BLKC_DEV_OFF
#define ARGUS_TP_BLKC_DEV_OFF 8
#endif
#ifndef ARGUS_TP_BLKC_SECTOR_OFF
#define ARGUS_TP_BLKC_SECTOR_OFF 16
#endif

struct argus_blk_key {
    u32 dev;
    u32 pad;
    u64 sector;
};

BPF_HASH(host_counts, struct argus_host_key, struct argus_host_val, ARGUS_HOST_KEYS);
BPF_HASH(preempted, u32, struct argus_preempt, ARGUS_HOST_THREADS);
BPF_ARRAY(host_pending, u64, 1);
BPF_TABLE("lru_hash", u32, u32, traced_tids, ARGUS_HOST_THREADS);
/* what runs on each CPU now (comm, tid 0 = idle): a woken thread waits behind it */
struct argus_cpu_curr {
    u32 tid;
    char comm[ARGUS_COMM_LEN];
    u64 since_ns;  /* when it was switched in (its on-CPU time, when it is traced) */
};
BPF_ARRAY(cpu_curr, struct argus_cpu_curr, ARGUS_MAX_CPUS);
BPF_HASH(offcpu, u32, struct argus_offcpu, ARGUS_HOST_THREADS);
BPF_PERCPU_ARRAY(offcpu_tmp, struct argus_offcpu, 1);
BPF_HASH(blk_start, struct argus_blk_key, u64, ARGUS_BLK_INFLIGHT);

static __always_inline void argus_host_add(struct argus_host_key *key, u64 ns)
{
    struct argus_host_val zero = {}, *v;
    v = host_counts.lookup_or_try_init(key, &zero);
    if (!v) {
        argus_drop(ARGUS_DROP_HOST_MAP_FULL);
        return;
    }
    __sync_fetch_and_add(&v->count, 1);
    if (ns)
        __sync_fetch_and_add(&v->total_ns, ns);
}

static __always_inline void argus_host_pending_add(s64 d)
{
    int zero = 0;
    u64 *n = host_pending.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, d);
}

/* A thread that blocks again where it blocked before (the same user ip, user sp and
 * syscall: a wait loop, or a worker going back and forth between two waits) has the same
 * stacks: they are taken from its last entry or from `offcpu_sites` (its recent sites'
 * stacks) and only the time is new; the walks (a few us for a deep libtorch stack: most of
 * the host channel's cost on a real job) are skipped. A site's stacks are walked again at
 * least every ARGUS_OFFCPU_REWALK_NS. */
#ifndef ARGUS_OFFCPU_REWALK_NS
#define ARGUS_OFFCPU_REWALK_NS 1000000000ULL
#endif
#ifndef ARGUS_OFFCPU_SITES
#define ARGUS_OFFCPU_SITES 4096
#endif
struct argus_offcpu_site {
    u64 site;
    u32 tgid;
    u32 tid;
};
BPF_TABLE("lru_hash", struct argus_offcpu_site, struct argus_offcpu, offcpu_sites,
          ARGUS_OFFCPU_SITES);

static __always_inline int argus_offcpu_fresh(struct argus_offcpu *e, u64 site, u64 now)
{
    return e->site == site && e->user_len >= 0 && now >= e->stack_ns
        && now - e->stack_ns < ARGUS_OFFCPU_REWALK_NS;
}

static __always_inline void argus_offcpu_record(void *ctx, u32 tgid, u32 tid, u64 now)
{
    u64 site = 0, sp = 0;
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    if (regs) {
        u64 ip = 0, nr = 0;
        bpf_probe_read_kernel(&sp, sizeof(sp), &regs->sp);
        bpf_probe_read_kernel(&ip, sizeof(ip), &regs->ip);
        bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
        if (sp && ip)
            site = (ip * 0x9E3779B97F4A7C15ULL) ^ sp ^ (nr << 52);
    }
    struct argus_offcpu *old = offcpu.lookup(&tid);
    if (site && old && argus_offcpu_fresh(old, site, now)) {
        old->ts_ns = now;
        return;
    }
    int zero = 0;
    struct argus_offcpu *s = offcpu_tmp.lookup(&zero);
    if (!s)
        return;
    struct argus_offcpu_site where = {.site = site, .tgid = tgid, .tid = tid};
    struct argus_offcpu *seen = site ? offcpu_sites.lookup(&where) : 0;
    if (seen && argus_offcpu_fresh(seen, site, now)) {
        __builtin_memcpy(s, seen, sizeof(*s));
        s->ts_ns = now;
        if (offcpu.update(&tid, s))
            argus_drop(ARGUS_DROP_HOST_MAP_FULL);
        return;
    }
    s->ts_ns = now;
    s->stack_ns = now;
    s->site = site;
    s->tgid = tgid;
    bpf_get_current_comm(&s->comm, sizeof(s->comm));
    s->user_len = bpf_get_stack(ctx, s->user, sizeof(s->user), BPF_F_USER_STACK);
    if (s->user_len < 0)
        argus_drop(ARGUS_DROP_STACK_USER);
    s->kernel_len = bpf_get_stack(ctx, s->kernel, sizeof(s->kernel), 0);
    if (s->kernel_len < 0)
        argus_drop(ARGUS_DROP_STACK_KERNEL);
    s->scan_len = -1;
#ifndef ARGUS_NO_SP_SCAN
    if (sp) {
        long err = bpf_probe_read_user(s->scan, sizeof(s->scan), (void *)sp);
        s->scan_len = err ? (s32)err : (s32)sizeof(s->scan);
    }
#endif
    if (offcpu.update(&tid, s))
        argus_drop(ARGUS_DROP_HOST_MAP_FULL);
    if (site)
        offcpu_sites.update(&where, s);  /* LRU: the oldest sites make room */
}

int argus_host_switch(void *ctx)
{
    u64 id = bpf_get_current_pid_tgid();  /* still the outgoing task (prev) */
    u32 tgid = id >> 32, tid = (u32)id;
    u32 next = *(s32 *)((char *)ctx + ARGUS_TP_SS_NEXT_PID_OFF);
    u32 *w = watched.lookup(&tgid);
    int traced = w && (*w & ARGUS_W_TRACE) && tid;
    /* the clock only where a traced thread's time on the CPU begins or ends (the next
     * thread: one that has switched out traced before, looked up only when prev is not
     * traced); untraced switches do not read it */
    int timed = traced || (next && traced_tids.lookup(&next));
    u64 now = timed ? bpf_ktime_get_ns() : 0;
    u64 ran = 0;  /* how long prev ran, since it was switched in */
    u32 cpu = bpf_get_smp_processor_id();
    struct argus_cpu_curr *cur = cpu_curr.lookup(&cpu);
    if (cur) {
        if (traced && cur->tid == tid && cur->since_ns && now > cur->since_ns)
            ran = now - cur->since_ns;
        cur->tid = next;
        bpf_probe_read_kernel(&cur->comm, sizeof(cur->comm), (char *)ctx + ARGUS_TP_SS_NEXT_COMM_OFF);
        cur->since_ns = now;  /* 0: not timed (next is not traced) */
    }
    if (traced) {
        u32 *known = traced_tids.lookup(&tid);  /* an LRU update costs more than a lookup */
        if (!known || *known != tgid)
            traced_tids.update(&tid, &tgid);
        if (ran) {
            struct argus_host_key run = {};
            run.kind = ARGUS_HOST_ON_CPU;
            run.tgid = tgid;
            argus_host_add(&run, ran);
        }
#if ARGUS_TP_SS_PREV_STATE_SIZE == 8
        s64 state = *(s64 *)((char *)ctx + ARGUS_TP_SS_PREV_STATE_OFF);
#else
        s64 state = *(s32 *)((char *)ctx + ARGUS_TP_SS_PREV_STATE_OFF);
#endif
        if ((state & ARGUS_TP_SS_STATE_MASK) == 0) {
            struct argus_preempt p = {};
            p.ts_ns = now;
            p.tgid = tgid;
            bpf_probe_read_kernel(&p.comm, sizeof(p.comm), (char *)ctx + ARGUS_TP_SS_NEXT_COMM_OFF);
            if (preempted.insert(&tid, &p) == 0)
                argus_host_pending_add(1);
            else if (preempted.update(&tid, &p))
                argus_drop(ARGUS_DROP_HOST_MAP_FULL);
        } else {
            argus_offcpu_record(ctx, tgid, tid, now);
        }
    }
    int zero = 0;
    u64 *pending = host_pending.lookup(&zero);
    if (!pending || *pending == 0)
        return 0;
    struct argus_preempt *p = preempted.lookup(&next);
    if (!p)
        return 0;
    if (!now)
        now = bpf_ktime_get_ns();
    struct argus_host_key key = {};
    key.kind = ARGUS_HOST_CPU;
    key.tgid = p->tgid;
    u64 waited = now > p->ts_ns ? now - p->ts_ns : 0;
    __builtin_memcpy(key.comm, p->comm, sizeof(key.comm));
    u64 since = p->ts_ns;
    if (preempted.delete(&next) == 0)
        argus_host_pending_add(-1);
    argus_host_add(&key, waited);
    /* the same wait in the time slot it began in: a slow step is checked against the waits
     * inside it (keys deleted by user space once read: bounded by the slots of a drain) */
    key.kind = ARGUS_HOST_CPU_WAIT;
    key.detail = since - since % ARGUS_WAIT_BUCKET_NS;
    argus_host_add(&key, waited);
    return 0;
}

int argus_host_wakeup(void *ctx)
{
    u32 tid = *(s32 *)((char *)ctx + ARGUS_TP_WK_PID_OFF);
    u32 *tgid = traced_tids.lookup(&tid);
    if (!tgid)
        return 0;
    u32 *w = watched.lookup(tgid);
    if (!w || !(*w & ARGUS_W_TRACE))
        return 0;
    /* the competitor: what runs on the CPU the thread is queued on; an idle CPU (or one
     * running the thread's own process) runs it at once: nothing to count */
    u32 cpu = *(s32 *)((char *)ctx + ARGUS_TP_WK_CPU_OFF);
    struct argus_cpu_curr *cur = cpu_curr.lookup(&cpu);
    if (!cur || cur->tid == 0 || cur->tid == tid)
        return 0;
    struct argus_preempt p = {};
    p.ts_ns = bpf_ktime_get_ns();
    p.tgid = *tgid;
    p.woken = 1;
    bpf_probe_read_kernel(&p.comm, sizeof(p.comm), cur->comm);
    /* insert only: a thread already waiting (preempted, or woken twice) keeps its start */
    if (preempted.insert(&tid, &p) == 0)
        argus_host_pending_add(1);
    return 0;
}

int argus_host_tcp_retrans(void *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *w = watched.lookup(&tgid);
    struct argus_host_key key = {};
    key.kind = ARGUS_HOST_TCP;
    key.tgid = (w && (*w & ARGUS_W_TRACE)) ? tgid : 0;
    u16 dport = *(u16 *)((char *)ctx + ARGUS_TP_TCP_DPORT_OFF);
    u16 family = *(u16 *)((char *)ctx + ARGUS_TP_TCP_FAMILY_OFF);
    u32 daddr = 0;
    if (family == 2 /* AF_INET */)
        bpf_probe_read_kernel(&daddr, sizeof(daddr), (char *)ctx + ARGUS_TP_TCP_DADDR_OFF);
    key.detail = ((u64)dport << 32) | daddr;
    if (key.tgid)
        bpf_get_current_comm(&key.comm, sizeof(key.comm));
    argus_host_add(&key, 0);
    return 0;
}

int argus_host_oom(void *ctx)
{
    struct argus_host_key key = {};
    key.kind = ARGUS_HOST_OOM;
    key.tgid = *(s32 *)((char *)ctx + ARGUS_TP_OOM_PID_OFF);
    key.detail = bpf_ktime_get_ns();
    u32 loc = *(u32 *)((char *)ctx + ARGUS_TP_OOM_COMM_OFF);
    bpf_probe_read_kernel_str(&key.comm, sizeof(key.comm), (char *)ctx + (loc & 0xffff));
    argus_host_add(&key, 0);
    return 0;
}

int argus_host_blk_issue(void *ctx)
{
    struct argus_blk_key k = {};
    k.dev = *(u32 *)((char *)ctx + ARGUS_TP_BLK_DEV_OFF);
    k.sector = *(u64 *)((char *)ctx + ARGUS_TP_BLK_SECTOR_OFF);
    u64 now = bpf_ktime_get_ns();
    if (blk_start.update(&k, &now))
        argus_drop(ARGUS_DROP_HOST_MAP_FULL);
    return 0;
}

int argus_host_blk_complete(void *ctx)
{
    struct argus_blk_key k = {};
    k.dev = *(u32 *)((char *)ctx + ARGUS_TP_BLKC_DEV_OFF);
    k.sector = *(u64 *)((char *)ctx + ARGUS_TP_BLKC_SECTOR_OFF);
    u64 *t0 = blk_start.lookup(&k);
    if (!t0)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 lat = now > *t0 ? now - *t0 : 0;
    blk_start.delete(&k);
    struct argus_host_key key = {};
    key.kind = ARGUS_HOST_BLOCK;
    key.detail = k.dev;
    argus_host_add(&key, lat);
    return 0;
}
