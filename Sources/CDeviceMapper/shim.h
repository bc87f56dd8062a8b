// libdevmapper (Debian's libdevmapper-dev): the kernel's device-mapper, for
// the linear device a volume's host mounts, which a migration suspends.
#include <libdevmapper.h>
