// Linux headers and GNU constants that Glibc's Swift module does not cover.
#define _GNU_SOURCE 1
#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <linux/falloc.h>

#ifdef O_DIRECT
static const int keel_o_direct = O_DIRECT;
#elif defined(__x86_64__)
static const int keel_o_direct = 040000;
#else
static const int keel_o_direct = 0200000;
#endif
static const int keel_seek_data = 3;  // SEEK_DATA
static const int keel_seek_hole = 4;  // SEEK_HOLE

// Daemons must not inherit the descriptors of whoever ran `keel volume`.
// Declared by <spawn.h> only under _GNU_SOURCE (glibc 2.34), and <spawn.h>
// cannot be included here: with _GNU_SOURCE its <sys/select.h> clashes with
// the Glibc module's. `actions` is a posix_spawn_file_actions_t.
extern int posix_spawn_file_actions_addclosefrom_np(void *actions, int from);
static inline int keel_spawn_close_from(void *actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np(actions, from);
}

// FIFREEZE and FITHAW (fsfreeze(8)): ioctl is variadic, which Swift cannot call.
#include <sys/ioctl.h>
#include <linux/fs.h>
static inline int keel_freeze_filesystem(int fd) { return ioctl(fd, FIFREEZE, 0); }
static inline int keel_thaw_filesystem(int fd) { return ioctl(fd, FITHAW, 0); }

// syncfs(2): declared by <unistd.h> only under _GNU_SOURCE, which the Glibc module lacks.
extern int syncfs(int fd);
static inline int keel_syncfs(int fd) { return syncfs(fd); }
