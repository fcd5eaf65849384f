/* core/version.c: the version of the loaded library. */
#include "core/internal.h"
#include "threadloom/threadloom.h"

const char* tl_version_string(void) { return TL_VERSION_STRING; }
