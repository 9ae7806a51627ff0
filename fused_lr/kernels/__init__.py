"""Pure compute: the Numba and Triton kernels. They import the kernel layout and the schedule
maths, nothing of the optimizer."""
