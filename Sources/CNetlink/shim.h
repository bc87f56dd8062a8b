// The kernel's netlink and NBD uapi headers, for the kernel frontend.
#include <sys/socket.h>
#include <linux/netlink.h>
#include <linux/genetlink.h>
#include <linux/nbd.h>
#include <linux/nbd-netlink.h>
