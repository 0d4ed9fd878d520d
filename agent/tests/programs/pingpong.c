/* nw-pingpong: one thread waits on a futex word N times; another wakes it after ~1 ms each
 * time. The waiter times each of its own FUTEX_WAIT calls that was woken (CLOCK_MONOTONIC
 * around the syscall) and prints "woken=<n> sum_ns=<total>": the test's independent measure.
 * usage: nw-pingpong [-n rounds] */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static atomic_int word;      /* 0: wait; 1: go */
static atomic_int round_done; /* the waiter finished a round */
static int rounds = 200;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void *waker(void *arg) {
    (void)arg;
    for (int i = 0; i < rounds; i++) {
        while (!atomic_load(&round_done)) usleep(50);
        atomic_store(&round_done, 0);
        usleep(1000);
        atomic_store(&word, 1);
        syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int c;
    while ((c = getopt(argc, argv, "n:")) != -1) {
        if (c == 'n') rounds = atoi(optarg);
        else { fprintf(stderr, "usage: %s [-n rounds]\n", argv[0]); return 2; }
    }
    pthread_t t;
    pthread_create(&t, NULL, waker, NULL);
    uint64_t woken = 0, sum = 0;
    for (int i = 0; i < rounds; i++) {
        atomic_store(&word, 0);
        atomic_store(&round_done, 1);
        while (atomic_load(&word) == 0) {
            uint64_t start = now_ns();
            long r = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
            uint64_t end = now_ns();
            if (r == 0) { woken++; sum += end - start; }
        }
    }
    pthread_join(t, NULL);
    printf("woken=%llu sum_ns=%llu\n", (unsigned long long)woken, (unsigned long long)sum);
    return 0;
}
