// Accept and close, forever, on 0.0.0.0:PORT (one per port given). Prints "ready".
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[i]))};
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(fd, 4096)) return 1;
        if (fork() == 0) {
            for (;;) { int c = accept(fd, 0, 0); if (c >= 0) close(c); }
        }
    }
    printf("ready\n");
    fflush(stdout);
    while (wait(0) > 0) {}
    return 0;
}
