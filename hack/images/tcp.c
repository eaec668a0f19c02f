/*
 * Workload for tcpEstablished: one process holding an established TCP connection to itself and
 * keeping it busy. It listens on 127.0.0.1 (the container's own loopback), connects to itself and
 * accepts; then, every 0.2 s, the client end sends the next number, the server end reads it and
 * echoes it back, and the client end reads the echo. The last echoed number goes to /tmp/count and
 * to stdout, like the counter image's. The count lives in memory, so after a restore it continues
 * where it stopped, and only over the same connection: any error on it (reset, EOF, a wrong echo)
 * ends the process with a message and exit code 1; it never reconnects. Prints "ready" once
 * connected. Plain socket/bind/listen/connect/accept/read/write, no socket options beyond
 * SO_REUSEADDR. Built with `gcc -static`.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PORT 7000

static void on_signal(int sig) {
    (void)sig;
    _exit(0);
}

static void die(const char *what) {
    fprintf(stderr, "tcp: %s: %s\n", what, errno ? strerror(errno) : "unexpected data");
    exit(1);
}

/* Exactly n bytes, or die: a short read is EOF, i.e. the connection is gone. */
static void read_full(int fd, void *buf, size_t n, const char *what) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = read(fd, (char *)buf + done, n - done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            if (r == 0) errno = 0;
            die(what);
        }
        done += (size_t)r;
    }
}

static void write_full(int fd, const void *buf, size_t n, const char *what) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = write(fd, (const char *)buf + done, n - done);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) die(what);
        done += (size_t)r;
    }
}

static void write_count(unsigned long n) {
    char line[32];
    int len = snprintf(line, sizeof line, "%lu\n", n);
    int fd = open("/tmp/count", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) die("open /tmp/count");
    write_full(fd, line, (size_t)len, "write /tmp/count");
    close(fd);
    write_full(STDOUT_FILENO, line, (size_t)len, "write stdout");
}

int main(void) {
    /* As PID 1 of its container the process would otherwise ignore SIGTERM and `podman stop` waits. */
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(PORT);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0) die("socket");
    int one = 1;
    if (setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) die("setsockopt");
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind 127.0.0.1");
    if (listen(listener, 1) < 0) die("listen");

    /* connect() to a listening socket completes from the backlog before accept() is called. */
    int client = socket(AF_INET, SOCK_STREAM, 0);
    if (client < 0) die("socket");
    if (connect(client, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    int server = accept(listener, NULL, NULL);
    if (server < 0) die("accept");
    close(listener);

    printf("connected 127.0.0.1:%d\nready\n", PORT);
    fflush(stdout);

    const struct timespec pause = {0, 200 * 1000 * 1000};
    for (unsigned long n = 1;; n++) {
        unsigned long sent = n, got = 0, echo = 0;
        write_full(client, &sent, sizeof sent, "client write");
        read_full(server, &got, sizeof got, "server read");
        write_full(server, &got, sizeof got, "server write");
        read_full(client, &echo, sizeof echo, "client read");
        if (echo != sent) {
            errno = 0;
            die("echo differs from what was sent");
        }
        write_count(echo);
        while (nanosleep(&pause, NULL) < 0 && errno == EINTR) {
        }
    }
}
