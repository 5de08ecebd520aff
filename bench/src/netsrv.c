/*
 * gatevm-bench's network test server: the same static program serves the network case in every
 * guest (see bench/src/netproto.rs for the protocol and the client).
 *
 * As /init of a bare initramfs (pid 1) it first loads the modules listed in /modules/load.list
 * (virtio-mmio, virtio-net, ...; the initramfs is gatevm's own layout), gives eth0 the address
 * 10.0.2.15/24 that QEMU's user networking expects, and powers the VM off when told to quit or on
 * any error. Anywhere else it only serves.
 *
 * Protocol, one TCP connection at a time, port argv[1] (default 5001):
 *   server -> "GVB1" (hello: the server is up, not just a forwarder)
 *   client -> 'S' + u64 big-endian N + N bytes; server -> u64 big-endian bytes received
 *   client -> 'E', then bytes; the server echoes whatever it reads until end of file
 *   client -> 'Q'; server -> 'q' and exits (powers off as init)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

#define MODULE_INIT_COMPRESSED_FILE 4

static int is_init;
static char buf[1 << 18];

static void finish(int code) {
    fflush(stdout);
    if (is_init) {
        sync();
        reboot(RB_POWER_OFF);
    }
    exit(code);
}

static void die(const char *what) {
    printf("gatevm-bench-srv: %s: %s\n", what, strerror(errno));
    finish(1);
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static void load_modules(void) {
    FILE *f = fopen("/modules/load.list", "r");
    if (!f) {
        printf("gatevm-bench-srv: no /modules/load.list: %s\n", strerror(errno));
        return;
    }
    char line[256];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0] || line[0] == '#' || strchr(line, '/')) continue;
        char path[300];
        snprintf(path, sizeof path, "/modules/%s", line);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            printf("gatevm-bench-srv: cannot open %s: %s\n", path, strerror(errno));
            continue;
        }
        int flags = ends_with(line, ".xz") || ends_with(line, ".zst") || ends_with(line, ".gz")
                        ? MODULE_INIT_COMPRESSED_FILE
                        : 0;
        if (syscall(SYS_finit_module, fd, "", flags) != 0 && errno != EEXIST)
            printf("gatevm-bench-srv: loading %s: %s\n", line, strerror(errno));
        close(fd);
    }
    fclose(f);
}

static void set_addr(int s, unsigned long req, const char *ifname, const char *addr) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1) die("bad address");
    if (ioctl(s, req, &ifr) != 0) die(req == SIOCSIFADDR ? "SIOCSIFADDR" : "SIOCSIFNETMASK");
}

static void link_up(int s, const char *ifname) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) != 0) die("SIOCGIFFLAGS");
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) != 0) die("SIOCSIFFLAGS");
}

static void network_up(void) {
    for (int i = 0; if_nametoindex("eth0") == 0; i++) {
        if (i == 200) {
            errno = ENODEV;
            die("no eth0 after loading the modules");
        }
        usleep(50000);
    }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) die("socket");
    link_up(s, "lo");
    set_addr(s, SIOCSIFADDR, "eth0", "10.0.2.15");
    set_addr(s, SIOCSIFNETMASK, "eth0", "255.255.255.0");
    link_up(s, "eth0");
    close(s);
    printf("gatevm-bench-srv: eth0 10.0.2.15/24 up\n");
}

static int read_full(int fd, void *p, size_t n) {
    char *b = p;
    while (n > 0) {
        ssize_t r = read(fd, b, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        b += r;
        n -= (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *p, size_t n) {
    const char *b = p;
    while (n > 0) {
        ssize_t r = send(fd, b, n, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        b += r;
        n -= (size_t)r;
    }
    return 0;
}

/* Serves one connection; returns 1 when told to quit. */
static int serve(int c) {
    int one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* A client that goes silent does not hold the server forever. */
    struct timeval tv = {120, 0};
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (write_full(c, "GVB1", 4) != 0) return 0;
    unsigned char cmd;
    if (read_full(c, &cmd, 1) != 0) return 0;
    if (cmd == 'S') {
        unsigned char h[8];
        if (read_full(c, h, 8) != 0) return 0;
        uint64_t want = 0, got = 0;
        for (int i = 0; i < 8; i++) want = want << 8 | h[i];
        while (got < want) {
            size_t n = want - got < sizeof buf ? (size_t)(want - got) : sizeof buf;
            ssize_t r = read(c, buf, n);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            got += (uint64_t)r;
        }
        for (int i = 0; i < 8; i++) h[i] = (unsigned char)(got >> (56 - 8 * i));
        write_full(c, h, 8);
    } else if (cmd == 'E') {
        for (;;) {
            ssize_t r = read(c, buf, sizeof buf);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0 || write_full(c, buf, (size_t)r) != 0) break;
        }
    } else if (cmd == 'Q') {
        write_full(c, "q", 1);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    is_init = getpid() == 1;
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGPIPE, SIG_IGN);
    int port = argc > 1 ? atoi(argv[1]) : 5001;
    if (port <= 0 || port > 65535) {
        errno = EINVAL;
        die("bad port");
    }
    if (is_init) {
        load_modules();
        network_up();
    }
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (l < 0) die("socket");
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(l, (struct sockaddr *)&a, sizeof a) != 0) die("bind");
    if (listen(l, 16) != 0) die("listen");
    printf("gatevm-bench-srv: listening on port %d\n", port);
    for (;;) {
        int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            die("accept");
        }
        int quit = serve(c);
        close(c);
        if (quit) break;
    }
    printf("gatevm-bench-srv: done\n");
    finish(0);
    return 0;
}
