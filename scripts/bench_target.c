/* bench_target.c: the process `make bench` probes to measure the cost of one probe hit.
 *
 * Two functions with the two prologues that matter on x86-64: `bench_push` starts with
 * `push %rbp` (the kernel emulates it: cheap uprobe), `bench_endbr` starts with `endbr64`
 * (the kernel must single-step it: expensive) followed by `push %rbp`. The program waits for
 * a line on stdin, calls one of them N times, prints the mean ns per call, and repeats, so
 * one process serves every configuration the benchmark attaches in turn.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Hand-written so the prologues are exactly what is measured. */
__asm__(
    ".text\n"
    ".globl bench_push\n"
    ".type bench_push, @function\n"
    "bench_push:\n"
    "  push %rbp\n"
    "  mov %rsp, %rbp\n"
    "  lea (%rdi,%rsi), %rax\n"
    "  add %rdx, %rax\n"
    "  pop %rbp\n"
    "  ret\n"
    ".size bench_push, .-bench_push\n");
int bench_push(long a, long b, long c);

__asm__(
    ".text\n"
    ".globl bench_endbr\n"
    ".type bench_endbr, @function\n"
    "bench_endbr:\n"
    "  endbr64\n"
    "  push %rbp\n"
    "  mov %rsp, %rbp\n"
    "  lea (%rdi,%rsi), %rax\n"
    "  add %rdx, %rax\n"
    "  pop %rbp\n"
    "  ret\n"
    ".size bench_endbr, .-bench_endbr\n");
int bench_endbr(long a, long b, long c);

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(void)
{
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    /* Each request: "push N" or "endbr N". */
    while (fgets(line, sizeof(line), stdin)) {
        char which[16];
        long n;
        if (sscanf(line, "%15s %ld", which, &n) != 2)
            break;
        int (*fn)(long, long, long) = strcmp(which, "endbr") == 0 ? bench_endbr : bench_push;
        volatile int sink = 0;
        double t0 = now_ns();
        for (long i = 0; i < n; i++)
            sink += fn(i, 1, 2);
        double t1 = now_ns();
        printf("%.1f\n", (t1 - t0) / n);
    }
    return 0;
}
