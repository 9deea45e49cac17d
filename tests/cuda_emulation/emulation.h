// Just enough of CUDA's execution model to run the project's kernels on a CPU, for tests on
// machines without a GPU: each block's threads are real threads meeting at a barrier for
// __syncthreads(); blocks run one after another, so a block's __shared__ arrays can be static.
#pragma once
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>

struct EmuDim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim, gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(n)
#define CUDART_INF_F INFINITY

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// Runs `kernel` over a grid of blocks of `block.x` threads (1-D blocks, 2-D grids).
template <class Kernel>
void emu_launch(EmuDim3 grid, EmuDim3 block, Kernel kernel) {
    gridDim = grid;
    blockDim = block;
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::barrier<> bar(block.x);
            emu_block_barrier = &bar;
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < block.x; ++t) {
                threads.emplace_back([&, t] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {bx, by, 0};
                    kernel();
                });
            }
            for (auto& th : threads) th.join();
        }
    }
}
