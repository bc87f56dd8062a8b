// liburing 2.3 uses glibc types without including <features.h> first.
#include <features.h>
#include <liburing.h>
#include <linux/fs.h>

// Flag macros built from enums, which Swift cannot import as constants.
static const unsigned char keel_iosqe_buffer_select = IOSQE_BUFFER_SELECT;
static const unsigned char keel_iosqe_io_link = IOSQE_IO_LINK;
