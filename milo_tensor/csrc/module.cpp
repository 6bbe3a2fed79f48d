// Python module init for the ahead-of-time build (`milo_tensor._C`, setup.py). Importing the
// module loads the shared library, whose static initializers register the CUDA implementations
// of the milo:: ops with the dispatcher (TORCH_LIBRARY_IMPL in int3_linear.cu).
#include <Python.h>

static struct PyModuleDef milo_c_module = {PyModuleDef_HEAD_INIT, "_C", "milo_tensor CUDA kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&milo_c_module); }
