// New TCP connections per second to IP:PORT for SECONDS: connect, then close with RST (so
// the client's ports never sit in TIME_WAIT). Prints "<connections> <errors> <seconds>".
// A connect that gets no answer gives up after 1 s (an error), so a broken path ends the
// sample on time instead of waiting out the SYN retries.
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &sa.sin_addr);
    double secs = atof(argv[3]), start = now(), end = start + secs;
    long ok = 0, err = 0;
    struct linger lg = {1, 0};
    struct timeval tmo = {.tv_sec = 1};
    while (now() < end) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) { err++; continue; }
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tmo, sizeof(tmo));
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) ok++; else err++;
        close(fd);
    }
    printf("%ld %ld %.3f\n", ok, err, now() - start);
    return 0;
}
