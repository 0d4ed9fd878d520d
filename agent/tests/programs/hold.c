// nw-hold: holds memory on request, for the self-healing tests. Each line on stdin is a count
// of MiB to allocate and touch (page by page, so the cgroup is charged as it goes); "ok <total>"
// is printed once they are held. Holds everything until stdin closes or it is killed.
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int main(void) {
    char line[64];
    long total = 0;
    long page = sysconf(_SC_PAGESIZE);
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        long mib = atol(line);
        if (mib <= 0) {
            continue;
        }
        size_t len = (size_t)mib << 20;
        char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        for (size_t off = 0; off < len; off += (size_t)page) {
            p[off] = 1;
        }
        total += mib;
        printf("ok %ld\n", total);
    }
    return 0;
}
