/* A python3 that runs through the shared libpython, the way Triton's Python backend stub embeds Python: it
 * loads libpython (PYEMBED_LIBPYTHON, default libpython3.12.so.1.0, found through LD_LIBRARY_PATH) and calls
 * Py_BytesMain with its own arguments. For launch_rate.py's comparison.
 *
 *   cc -O2 -o embedded_python embedded_python.c -ldl
 *   PYTHONHOME=<sys.base_prefix> PYTHONPATH=<site-packages> LD_LIBRARY_PATH=<LIBDIR> ./embedded_python launch_rate.py
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    const char *library = getenv("PYEMBED_LIBPYTHON") ? getenv("PYEMBED_LIBPYTHON") : "libpython3.12.so.1.0";
    void *handle = dlopen(library, RTLD_NOW | RTLD_GLOBAL);
    if (handle == NULL) {
        fprintf(stderr, "embedded_python: %s\n", dlerror());
        return 2;
    }
    int (*bytes_main)(int, char **) = (int (*)(int, char **))dlsym(handle, "Py_BytesMain");
    if (bytes_main == NULL) {
        fprintf(stderr, "embedded_python: %s\n", dlerror());
        return 2;
    }
    return bytes_main(argc, argv);
}
