// fusedset._C: importing it runs the TORCH_LIBRARY registrations of every op in csrc/ops.
// The ops are reached through torch.ops.fusedset; the module itself holds one helper.
#include <ATen/Parallel.h>
#include <Python.h>

namespace {

// A thread takes torch's default thread count at its first at::parallel_for, marked by a
// thread_local flag of which every shared object that inlines at::parallel_for has its own
// copy. So the first fusedset kernel in a thread resets the count a torch.set_num_threads in
// that thread chose. Calling this first settles it, so a set_num_threads after it holds.
PyObject* init_thread_count(PyObject*, PyObject*) {
  at::internal::lazy_init_num_threads();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"init_thread_count", init_thread_count, METH_NOARGS,
     "Settles this thread's intra-op thread count in fusedset's kernels (see _dispatch)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
