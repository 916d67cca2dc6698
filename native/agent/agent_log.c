/* Messages from the agent go to QEMU's stderr, which libvirt keeps in the
 * domain log; each line is prefixed so it is easy to find there. */
#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

#include "agent.h"

static void agent_vlog(const char *fmt, va_list ap)
{
    char line[512];
    int n = vsnprintf(line, sizeof line, fmt, ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof line)
        n = sizeof line - 1;
    /* One write(2) per line so lines from threads do not interleave; stdio
     * buffering state in QEMU is not ours to touch. */
    char out[560];
    int m = snprintf(out, sizeof out, "omega-agent[%d]: %.*s\n", (int)getpid(), n, line);
    if (m > 0)
        (void)!write(STDERR_FILENO, out, (size_t)m < sizeof out ? (size_t)m : sizeof out - 1);
}

void agent_log(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    agent_vlog(fmt, ap);
    va_end(ap);
}

void agent_fatal(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    agent_vlog(fmt, ap);
    va_end(ap);
    _exit(1);
}
