/* nw-switchbench: two threads pinned to one CPU hand a futex word back and forth, each waking
 * the other and then sleeping until woken: every handoff is one thread going to sleep and one
 * context switch. After a warm-up, counts handoffs for a while and prints the mean ns per
 * handoff. usage: nw-switchbench [-w warm-up seconds] [-d seconds] */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static atomic_int turn;   /* whose turn: 0 or 1 */
static atomic_int stop;
static atomic_long handoffs;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void *play(void *arg) {
    int me = (int)(intptr_t)arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(0, &set);
    sched_setaffinity(0, sizeof set, &set);
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        if (atomic_load(&turn) != me) {
            syscall(SYS_futex, &turn, FUTEX_WAIT_PRIVATE, 1 - me, NULL, NULL, 0);
            continue;
        }
        atomic_fetch_add_explicit(&handoffs, 1, memory_order_relaxed);
        atomic_store(&turn, 1 - me);
        syscall(SYS_futex, &turn, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
    /* Let the other one out too. */
    atomic_store(&turn, 1 - me);
    syscall(SYS_futex, &turn, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    return NULL;
}

int main(int argc, char **argv) {
    int warm = 0, secs = 2, c;
    while ((c = getopt(argc, argv, "w:d:")) != -1) {
        if (c == 'w') warm = atoi(optarg);
        else if (c == 'd') secs = atoi(optarg);
        else { fprintf(stderr, "usage: %s [-w warm-up seconds] [-d seconds]\n", argv[0]); return 2; }
    }
    pthread_t t[2];
    for (intptr_t i = 0; i < 2; i++) pthread_create(&t[i], NULL, play, (void *)i);
    sleep(warm);
    long h0 = atomic_load(&handoffs);
    uint64_t t0 = now_ns();
    sleep(secs);
    long h1 = atomic_load(&handoffs);
    uint64_t t1 = now_ns();
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    printf("%.1f\n", (double)(t1 - t0) / (double)(h1 - h0));
    return 0;
}
