"""The CPU side shared by Loom's C++ kernels: `platform` (what this CPU is and can do, heap trimming) and `build`
(compiling the kernels' .cpp files for it)."""
