// Traffic helpers for bench/datapath, compiled with gcc at bench time.
//   netbench server PORT                  accept; echo what arrives; close on EOF/RST
//   netbench pingpong IP PORT N           N one-byte round trips on one connection;
//                                         prints {"p50_us":..,"p99_us":..,"mean_us":..}
//   netbench connect IP PORT SECONDS      connect + RST-close in a loop; prints {"connects":..,
//                                         "seconds":..,"failed":..}
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FDS 4096

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in addr_of(const char *ip, int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, ip, &a.sin_addr);
    return a;
}

static int server(int port) {
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(ls, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(ls, 4096) < 0) {
        perror("listen");
        return 1;
    }
    static struct pollfd fds[MAX_FDS];
    int n = 1;
    fds[0] = (struct pollfd){.fd = ls, .events = POLLIN};
    printf("ready\n");
    fflush(stdout);
    char buf[65536];
    for (;;) {
        if (poll(fds, n, -1) < 0 && errno != EINTR)
            return 1;
        if (fds[0].revents & POLLIN) {
            int c = accept(ls, NULL, NULL);
            if (c >= 0 && n < MAX_FDS) {
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                fds[n++] = (struct pollfd){.fd = c, .events = POLLIN};
            } else if (c >= 0) {
                close(c);
            }
        }
        for (int i = 1; i < n; i++) {
            if (!fds[i].revents)
                continue;
            ssize_t r = read(fds[i].fd, buf, sizeof(buf));
            if (r <= 0 || write(fds[i].fd, buf, r) != r) {
                close(fds[i].fd);
                fds[i--] = fds[--n];
            }
        }
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int pingpong(const char *ip, int port, int count) {
    struct sockaddr_in a = addr_of(ip, port);
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
        perror("connect");
        return 1;
    }
    double *lat = calloc(count, sizeof(double)), sum = 0;
    char c = 'x';
    for (int i = 0; i < count; i++) {
        double t0 = now_s();
        if (write(s, &c, 1) != 1 || read(s, &c, 1) != 1) {
            perror("pingpong");
            return 1;
        }
        lat[i] = (now_s() - t0) * 1e6;
        sum += lat[i];
    }
    qsort(lat, count, sizeof(double), cmp_double);
    printf("{\"p50_us\": %.3f, \"p99_us\": %.3f, \"mean_us\": %.3f, \"count\": %d}\n",
           lat[count / 2], lat[(int)(count * 0.99)], sum / count, count);
    close(s);
    return 0;
}

static int connect_loop(const char *ip, int port, double seconds) {
    struct sockaddr_in a = addr_of(ip, port);
    struct linger lg = {.l_onoff = 1, .l_linger = 0};  // close = RST: no TIME_WAIT pile-up
    long ok = 0, failed = 0;
    double start = now_s(), end = start + seconds, t = start;
    while (t < end) {
        for (int i = 0; i < 64; i++) {
            int s = socket(AF_INET, SOCK_STREAM, 0);
            setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
            if (connect(s, (struct sockaddr *)&a, sizeof(a)) == 0)
                ok++;
            else
                failed++;
            close(s);
        }
        t = now_s();
    }
    printf("{\"connects\": %ld, \"failed\": %ld, \"seconds\": %.6f}\n", ok, failed, t - start);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "server"))
        return server(atoi(argv[2]));
    if (argc == 5 && !strcmp(argv[1], "pingpong"))
        return pingpong(argv[2], atoi(argv[3]), atoi(argv[4]));
    if (argc == 5 && !strcmp(argv[1], "connect"))
        return connect_loop(argv[2], atoi(argv[3]), atof(argv[4]));
    fprintf(stderr, "usage: netbench server PORT | pingpong IP PORT N | connect IP PORT S\n");
    return 2;
}
