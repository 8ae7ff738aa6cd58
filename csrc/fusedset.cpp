// fusedset._C: importing it runs the TORCH_LIBRARY registrations of every op in csrc/ops.
// The Python module itself is empty; the ops are reached through torch.ops.fusedset.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
