// The CUDA attention kernels (src/models/kernels/cuda/attention.cu, compiled as C++ over
// emulation.h) against attention computed directly in double precision: the output, the
// log-sum-exps and the three input gradients, on shapes with ragged tiles, every padded head
// size the models use and the causal mask. Launch geometry as in src/models/kernels/cuda/mod.rs.
// Prints one line per case and exits 1 if any error exceeds the tolerance.
#include "emulation.h"
#include "attention.cu"

#include <cstdio>
#include <random>

static const unsigned ROWS_FWD_HOST = 64;  // ROWS_FWD in cuda/mod.rs and attention.cu
static const unsigned ROWS_BWD = 64;       // ROWS_BWD in cuda/mod.rs

struct Case {
    int b, n, m, heads, d, causal;
};

template <int DP>
double run(const Case& cs) {
    const int b = cs.b, n = cs.n, m = cs.m, h = cs.heads, d = cs.d, c = h * d;
    const float scale = 1.0f / std::sqrt((float)d);
    std::mt19937 rng(1234 + n + 7 * m + d);
    std::normal_distribution<float> normal;
    auto randv = [&](size_t len) {
        std::vector<float> v(len);
        for (auto& x : v) x = normal(rng);
        return v;
    };
    auto q = randv((size_t)b * n * c), k = randv((size_t)b * m * c), v = randv((size_t)b * m * c);
    auto dout = randv((size_t)b * n * c);
    std::vector<float> out(q.size()), lse((size_t)b * h * n), dvec(lse.size());
    std::vector<float> dq(q.size()), dk(k.size()), dv(v.size());
    EmuDim3 gq{(unsigned)((n + ROWS_FWD_HOST - 1) / ROWS_FWD_HOST), (unsigned)(b * h), 1};
    emu_launch(gq, {ROWS_FWD_HOST, 1, 1}, [&] {
        attn_fwd_impl<float, DP>(q.data(), k.data(), v.data(), out.data(), lse.data(), n, m, c, h, d,
                                 scale, cs.causal);
    });
    EmuDim3 gb{(unsigned)((n + ROWS_BWD - 1) / ROWS_BWD), (unsigned)(b * h), 1};
    emu_launch(gb, {ROWS_BWD, 1, 1}, [&] {
        attn_bwd_dq_impl<float, DP>(q.data(), k.data(), v.data(), out.data(), dout.data(), lse.data(),
                                    dvec.data(), dq.data(), n, m, c, h, d, scale, cs.causal);
    });
    EmuDim3 gk{(unsigned)((m + ROWS_BWD - 1) / ROWS_BWD), (unsigned)(b * h), 1};
    emu_launch(gk, {ROWS_BWD, 1, 1}, [&] {
        attn_bwd_dkv_impl<float, DP>(q.data(), k.data(), v.data(), dout.data(), lse.data(), dvec.data(),
                                     dk.data(), dv.data(), n, m, c, h, d, scale, cs.causal);
    });

    // The reference, in double: P = softmax(scale q k^T) (masked), O = P v, and the gradients.
    double worst = 0;
    auto rel = [&](double got, double want, double mag) {
        double e = std::fabs(got - want) / std::max(mag, 1e-6);
        if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e;
    };
    std::vector<double> rq(q.size()), rk(k.size()), rv(v.size()), ro(q.size()), rl(lse.size());
    for (int bi = 0; bi < b; ++bi)
        for (int hi = 0; hi < h; ++hi) {
            auto at = [&](int row, int len, int e) { return ((size_t)bi * len + row) * c + (size_t)hi * d + e; };
            for (int i = 0; i < n; ++i) {
                int vis = cs.causal ? std::min(m, i + 1) : m;
                std::vector<double> p(vis);
                double mx = -INFINITY;
                for (int j = 0; j < vis; ++j) {
                    double s = 0;
                    for (int e = 0; e < d; ++e) s += (double)q[at(i, n, e)] * k[at(j, m, e)];
                    p[j] = s * scale;
                    mx = std::max(mx, p[j]);
                }
                double sum = 0;
                for (auto& x : p) sum += (x = std::exp(x - mx));
                for (auto& x : p) x /= sum;
                rl[((size_t)bi * h + hi) * n + i] = mx + std::log(sum);
                std::vector<double> dp(vis);
                double dd = 0;
                for (int e = 0; e < d; ++e) {
                    double o = 0;
                    for (int j = 0; j < vis; ++j) o += p[j] * v[at(j, m, e)];
                    ro[at(i, n, e)] = o;
                    dd += o * dout[at(i, n, e)];
                }
                for (int j = 0; j < vis; ++j) {
                    double x = 0;
                    for (int e = 0; e < d; ++e) x += (double)dout[at(i, n, e)] * v[at(j, m, e)];
                    double ds = p[j] * (x - dd) * scale;
                    for (int e = 0; e < d; ++e) {
                        rq[at(i, n, e)] += ds * k[at(j, m, e)];
                        rk[at(j, m, e)] += ds * q[at(i, n, e)];
                        rv[at(j, m, e)] += p[j] * dout[at(i, n, e)];
                    }
                }
            }
        }
    auto compare = [&](const std::vector<float>& got, const std::vector<double>& want) {
        double mag = 0;
        for (double x : want) mag = std::max(mag, std::fabs(x));
        for (size_t i = 0; i < got.size(); ++i) rel(got[i], want[i], mag);
    };
    compare(out, ro);
    compare(lse, rl);
    compare(dq, rq);
    compare(dk, rk);
    compare(dv, rv);
    return worst;
}

int main() {
    const Case cases[] = {
        {2, 333, 333, 2, 40, 0}, {2, 200, 77, 2, 40, 0}, {1, 77, 77, 3, 64, 1},
        {2, 150, 150, 2, 64, 0}, {1, 130, 77, 2, 80, 0}, {1, 70, 70, 2, 160, 0},
        {2, 65, 65, 4, 8, 1},    {1, 100, 100, 2, 96, 0}, {1, 90, 90, 1, 128, 1},
    };
    const double tolerance = 1e-4;
    int failed = 0;
    for (const Case& cs : cases) {
        double err = cs.d <= 32 ? run<32>(cs) : cs.d <= 48 ? run<48>(cs) : cs.d <= 64 ? run<64>(cs)
                   : cs.d <= 80 ? run<80>(cs) : cs.d <= 96 ? run<96>(cs) : cs.d <= 128 ? run<128>(cs)
                   : run<160>(cs);
        bool ok = err <= tolerance;
        failed += !ok;
        std::printf("%s b%d n%d m%d heads%d d%d%s: max relative error %.2e\n", ok ? "ok  " : "FAIL", cs.b,
                    cs.n, cs.m, cs.heads, cs.d, cs.causal ? " causal" : "", err);
    }
    return failed ? 1 : 0;
}
