/*
 * omega-hello: a guest-side probe proving that images/guest/*.c tools are
 * compiled into the tiny image and run. Prints one line:
 *   omega-hello kernel=<release> pid=<pid> pagesize=<bytes>
 * Single-threaded; exit status 0 ok, 1 when uname(2) fails.
 */
#include <stdio.h>
#include <sys/utsname.h>
#include <unistd.h>

int main(void)
{
	struct utsname u;

	if (uname(&u) != 0) {
		perror("omega-hello: uname");
		return 1;
	}
	printf("omega-hello kernel=%s pid=%ld pagesize=%ld\n", u.release,
	       (long)getpid(), sysconf(_SC_PAGESIZE));
	return 0;
}
