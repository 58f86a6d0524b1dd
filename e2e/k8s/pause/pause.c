/* The pod sandbox's "pause" process for the test node: it holds the pod's
 * namespaces, reaps orphans (it is PID 1 of the pod) and exits on SIGINT or
 * SIGTERM. Built statically with musl-gcc by the test harness and packed into
 * an OCI image with images/ocibuild, because no image can be pulled here. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { _exit(128 + sig); }

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    puts("ckpt-pause 1");
    return 0;
  }
  if (getpid() != 1) {
    fputs("ckpt-pause: warning: not PID 1, orphans will not be reaped here\n", stderr);
  }
  struct sigaction term = {.sa_handler = stop};
  struct sigaction chld = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  if (sigaction(SIGINT, &term, NULL) < 0 || sigaction(SIGTERM, &term, NULL) < 0 ||
      sigaction(SIGCHLD, &chld, NULL) < 0) {
    perror("ckpt-pause: sigaction");
    return 1;
  }
  for (;;) {
    pause();
  }
}
