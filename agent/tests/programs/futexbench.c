/* nw-futexbench: the cheapest futex wait, N times: FUTEX_WAIT on a word that does not hold the
 * expected value returns EAGAIN at once, yet passes through both futex tracepoints. Prints the
 * mean ns per call. usage: nw-futexbench [-n calls] */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv) {
    long n = 2000000;
    int c;
    while ((c = getopt(argc, argv, "n:")) != -1) {
        if (c == 'n') n = atol(optarg);
        else { fprintf(stderr, "usage: %s [-n calls]\n", argv[0]); return 2; }
    }
    int word = 1;
    for (long i = 0; i < n / 10; i++) syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    uint64_t start = now_ns();
    for (long i = 0; i < n; i++) syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    printf("%.1f\n", (double)(now_ns() - start) / (double)n);
    return 0;
}
