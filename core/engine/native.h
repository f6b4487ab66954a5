// What fedcore's native sources (mlp_step.cpp, gaussian.cpp) share.
#pragma once

// A loop-heavy function compiled for a few instruction sets and picked at load time, so the
// build flags stay portable. Nothing may throw inside one: its clones cannot pass an
// exception on (arguments are checked before the call).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FEDCORE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FEDCORE_CLONES
#endif
