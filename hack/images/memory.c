/*
 * Workload for checkpoint size and speed tests: holds N MiB (argv[1], default 64) of memory,
 * the first half incompressible pseudo-random bytes, the second half repeating text, so that
 * compression ratios and times are those of a realistic heap rather than of zero pages (which
 * CRIU skips and every compressor squeezes to nothing). Prints "ready" once every page is
 * written, then sleeps until SIGTERM or SIGINT. Built with `gcc -static`.
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void on_signal(int sig) {
    (void)sig;
    _exit(0);
}

int main(int argc, char **argv) {
    unsigned long mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
    size_t size = (size_t)mib << 20;
    size_t half = size / 2;
    unsigned char *buf = malloc(size ? size : 1);
    if (buf == NULL) {
        perror("malloc");
        return 1;
    }

    /* xorshift64: fast, and its output does not compress. */
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    size_t i = 0;
    for (; i + sizeof x <= half; i += sizeof x) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(buf + i, &x, sizeof x);
    }

    static const char text[] = "checkpointer memory workload: the quick brown fox jumps over the lazy dog. ";
    for (; i < size; i++) buf[i] = (unsigned char)text[i % (sizeof text - 1)];

    /* As PID 1 of its container the process would otherwise ignore SIGTERM and `podman stop` waits. */
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    printf("allocated %lu MiB\nready\n", mib);
    fflush(stdout);
    for (;;) pause();
}
