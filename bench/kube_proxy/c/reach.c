// Poll IP:PORT with non-blocking connects (5 ms each) until one succeeds or TIMEOUT seconds
// pass; prints the CLOCK_MONOTONIC time of the first success in ns (0 on timeout).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &sa.sin_addr);
    long long end = now_ns() + (long long)(atof(argv[3]) * 1e9);
    struct linger lg = {1, 0};
    printf("started\n");
    fflush(stdout);
    while (now_ns() < end) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        int rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
        if (rc == 0) { printf("%lld\n", now_ns()); return 0; }
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        if (poll(&p, 1, 5) == 1) {
            int e = 0; socklen_t l = sizeof(e);
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &l);
            if (e == 0) { long long t = now_ns(); close(fd); printf("%lld\n", t); return 0; }
        }
        close(fd);
        usleep(200);
    }
    printf("0\n");
    return 1;
}
