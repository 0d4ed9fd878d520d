/* mutex: N threads hammer one pthread mutex guarding a tiny shared table.
 * usage: mutex [-t threads] [-w warm-up seconds] [-d seconds]   prints ops=<n>, counted
 * after the warm-up */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t table[1024];
static atomic_int phase; /* 0: warming up, 1: counting, 2: stopping */
static atomic_ulong total;

static void *worker(void *arg) {
    uint64_t x = (uintptr_t)arg * 0x9E3779B97F4A7C15ull + 1, ops = 0;
    int p;
    while ((p = atomic_load_explicit(&phase, memory_order_relaxed)) != 2) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        pthread_mutex_lock(&mu);
        table[x % 1024] += x;       /* short critical section */
        pthread_mutex_unlock(&mu);
        ops += (uint64_t)p; /* counted only in phase 1 */
    }
    atomic_fetch_add(&total, ops);
    return NULL;
}

int main(int argc, char **argv) {
    int threads = 8, secs = 3, warm = 0, c;
    while ((c = getopt(argc, argv, "t:d:w:")) != -1) {
        if (c == 't') threads = atoi(optarg);
        else if (c == 'd') secs = atoi(optarg);
        else if (c == 'w') warm = atoi(optarg);
        else {
            fprintf(stderr, "usage: %s [-t threads] [-w warm-up seconds] [-d seconds]\n", argv[0]);
            return 2;
        }
    }
    atomic_store(&phase, warm > 0 ? 0 : 1);
    pthread_t *tids = calloc(threads, sizeof *tids);
    for (int i = 0; i < threads; i++)
        pthread_create(&tids[i], NULL, worker, (void *)(uintptr_t)(i + 1));
    if (warm > 0) {
        sleep(warm);
        atomic_store(&phase, 1);
    }
    sleep(secs);
    atomic_store(&phase, 2);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    printf("ops=%lu\n", (unsigned long)atomic_load(&total));
    return 0;
}
