// The monotone rational-quadratic spline of pushforward/transforms/splines.py as one compiled
// pass per direction (forward map and its gradient), for the CPU. The same formulas, with
// the operations in the same order, as the pure-PyTorch path there, which stays the
// reference (and the path on other devices); see that module for the formulas and their
// reference (Durkan et al., 2019, arXiv:1906.04304).
//
// One deliberate difference: the inverse's quadratic coefficients and discriminant are
// computed with their products exact (fused multiply-adds), at least as accurate as the
// reference (whose compiled additions of products may or may not be fused).
//
// Layout: parameter-major and contiguous, row r of entry i at [r * n + i]. The entries are
// processed in blocks of BLOCK; every innermost loop runs over the entries of a block, so the
// compiler vectorises it (the bin is selected by comparisons and blends, never by branches).
// No address depends on the data, so any values, NaN and infinities included, stay in bounds.
//
// The exponentials of the bin logits, the softplus of the derivative logits and the final
// logarithms stay in PyTorch (vectorised library calls); this file does everything between
// them. The backward recomputes the per-entry quantities instead of saving them.

#include <algorithm>
#include <cmath>

namespace {

constexpr long BLOCK = 64;

template <typename T>
struct Constants {
    T bound, width, unit, min_w, min_h, free_w, free_h, min_d, tiny, low, high;
    explicit Constants(const T* c)
        : bound(c[0]), width(c[1]), unit(c[2]), min_w(c[3]), min_h(c[4]), free_w(c[5]),
          free_h(c[6]), min_d(c[7]), tiny(c[8]), low(c[9]), high(c[10]) {}
};

// The selected bin of every entry of a block, and its quantities (unit coordinates).
template <typename T>
struct Bin {
    T xi[BLOCK], tw[BLOCK], th[BLOCK], sw[BLOCK], sh[BLOCK];
    T cbw[BLOCK], cbh[BLOCK], ebw[BLOCK], ebh[BLOCK], index[BLOCK];
    T x0[BLOCK], y0[BLOCK], w[BLOCK], h[BLOCK], d0[BLOCK], d1[BLOCK];
};

// Per-entry quantities of the rational-quadratic map in the selected bin.
template <typename T>
struct Entry {
    T s[BLOCK], c2[BLOCK], t[BLOCK], omt[BLOCK], t1[BLOCK], tt[BLOCK], den[BLOCK],
        numer[BLOCK], shape_a[BLOCK];
};

// Totals, bin search, gathers and knot derivatives for entries i0 .. i0 + m - 1.
template <typename T>
inline void locate(long n, long bins, long i0, long m, const T* __restrict e,
                   const T* __restrict sp, const T* __restrict x, int inverse,
                   const Constants<T>& c, Bin<T>& b) {
    T cw[BLOCK], ch[BLOCK];
    const T* ew0 = e + i0;
    const T* eh0 = e + bins * n + i0;
#pragma omp simd
    for (long j = 0; j < m; ++j) {
        cw[j] = T(0);
        ch[j] = T(0);
        b.cbw[j] = T(0);
        b.cbh[j] = T(0);
        b.ebw[j] = ew0[j];
        b.ebh[j] = eh0[j];
        b.index[j] = T(0);
        T v = std::min(std::max(x[i0 + j], -c.bound), c.bound);
        b.xi[j] = (v + c.bound) * c.unit;
    }
    // the knots: cumulative sums in order, as the reference's loop; the scale needs the
    // totals, so the knots are compared after a first pass for the totals
    for (long k = 0; k < bins; ++k) {
        const T* ew = ew0 + k * n;
        const T* eh = eh0 + k * n;
#pragma omp simd
        for (long j = 0; j < m; ++j) {
            b.tw[j] = k ? b.tw[j] + ew[j] : ew[j];
            b.th[j] = k ? b.th[j] + eh[j] : eh[j];
        }
    }
#pragma omp simd
    for (long j = 0; j < m; ++j) {
        b.sw[j] = c.free_w / b.tw[j];
        b.sh[j] = c.free_h / b.th[j];
    }
    const T mins = inverse ? c.min_h : c.min_w;
    for (long k = 1; k < bins; ++k) {
        const T* ewp = ew0 + (k - 1) * n;
        const T* ehp = eh0 + (k - 1) * n;
        const T* ew = ew0 + k * n;
        const T* eh = eh0 + k * n;
        const T step = mins * T(k);
        const T kk = T(k);
#pragma omp simd
        for (long j = 0; j < m; ++j) {
            cw[j] = cw[j] + ewp[j];
            ch[j] = ch[j] + ehp[j];
            T knot = inverse ? step + ch[j] * b.sh[j] : step + cw[j] * b.sw[j];
            bool le = knot <= b.xi[j];
            b.cbw[j] = le ? cw[j] : b.cbw[j];
            b.cbh[j] = le ? ch[j] : b.cbh[j];
            b.ebw[j] = le ? ew[j] : b.ebw[j];
            b.ebh[j] = le ? eh[j] : b.ebh[j];
            b.index[j] = le ? kk : b.index[j];
        }
    }
#pragma omp simd
    for (long j = 0; j < m; ++j) {
        b.x0[j] = c.min_w * b.index[j] + b.cbw[j] * b.sw[j];
        b.y0[j] = c.min_h * b.index[j] + b.cbh[j] * b.sh[j];
        b.w[j] = c.min_w + b.ebw[j] * b.sw[j];
        b.h[j] = c.min_h + b.ebh[j] * b.sh[j];
        b.d0[j] = T(1);
        b.d1[j] = T(1);
    }
    // bin k uses the interior derivatives k - 1 and k (those at the boundary knots are 1)
    for (long k = 0; k + 1 < bins; ++k) {
        const T* row = sp + k * n + i0;
        const T below = T(k + 1), at = T(k);
#pragma omp simd
        for (long j = 0; j < m; ++j) {
            T v = row[j] + c.min_d;
            b.d0[j] = b.index[j] == below ? v : b.d0[j];
            b.d1[j] = b.index[j] == at ? v : b.d1[j];
        }
    }
}

// The rational-quadratic map of the selected bin (see _rq_forward in splines.py).
template <typename T>
inline void evaluate(long m, const Bin<T>& b, int inverse, const Constants<T>& c, Entry<T>& q) {
#pragma omp simd
    for (long j = 0; j < m; ++j) {
        T w = b.w[j], h = b.h[j], d0 = b.d0[j], d1 = b.d1[j], xi = b.xi[j];
        T s = h / w;
        T dd = d0 + d1;
        T c2 = dd + T(-2) * s;
        T t;
        if (inverse) {
            T norm = T(1) / (dd + s);
            T dy = (xi - b.y0[j]) * norm;
            T hn = h * norm;
            // a = dy c2 + hn (s - d0), b = hn d0 - dy c2 and the discriminant b^2 + 4 a sd
            // cancel where the root is near 1 next to a steep knot: every product in them is
            // taken exactly (fused multiply-adds; Kahan's method), so that only sums round
            const T qq = dy * c2;
            const T qe = std::fma(dy, c2, -qq);
            const T a = std::fma(hn, s - d0, qq) + qe;
            const T bb = std::fma(hn, d0, -qq) - qe;
            T sd = s * dy;
            const T p = bb * bb, q4 = (T(4) * a) * sd;
            const T disc = (p + q4) + (std::fma(bb, bb, -p) + std::fma(T(4) * a, sd, -q4));
            T root = std::sqrt(std::max(disc, T(0)));
            bool positive = bb >= T(0);
            T den = std::max(positive ? bb + root : a + a, c.tiny);
            t = (positive ? sd + sd : root - bb) / den;
        } else {
            t = (xi - b.x0[j]) / w;
        }
        t = std::min(std::max(t, T(0)), T(1));
        T omt = T(1) - t;
        T t1 = t * omt;
        T tt = t * t;
        q.s[j] = s;
        q.c2[j] = c2;
        q.t[j] = t;
        q.omt[j] = omt;
        q.t1[j] = t1;
        q.tt[j] = tt;
        q.den[j] = s + c2 * t1;
        q.numer[j] = (d1 * tt + (T(2) * s) * t1) + d0 * (omt * omt);
        q.shape_a[j] = s * tt + d0 * t1;
    }
}

// Returns the number of entries whose normaliser (the sum of the exponentiated logits of the
// widths or of the heights) lies outside (low, high), NaN included: where it is not 0 the
// caller shifts every row by its own maximum and runs the pass again.
template <typename T>
long forward(long n, long bins, const T* __restrict e, const T* __restrict sp,
             const T* __restrict x, T* __restrict y, T* __restrict logs, int inverse,
             const T* constants) {
    const Constants<T> c(constants);
    Bin<T> b;
    Entry<T> q;
    long unsafe = 0;
    for (long i0 = 0; i0 < n; i0 += BLOCK) {
        const long m = std::min(BLOCK, n - i0);
        locate(n, bins, i0, m, e, sp, x, inverse, c, b);
        evaluate(m, b, inverse, c, q);
#pragma omp simd reduction(+ : unsafe)
        for (long j = 0; j < m; ++j) {
            const long i = i0 + j;
            T ratio = q.s[j] / q.den[j];
            T out = inverse ? b.x0[j] + q.t[j] * b.w[j]
                            : b.y0[j] + (b.h[j] * q.shape_a[j]) / q.den[j];
            bool inside = std::abs(x[i]) < c.bound;
            y[i] = inside ? out * c.width - c.bound : x[i];
            // log(numer * ratio) + log(ratio) in the caller; 1 outside (log-derivative 0)
            logs[i] = inside ? q.numer[j] * ratio : T(1);
            logs[n + i] = inside ? ratio : T(1);
            const bool safe = c.low < b.tw[j] && b.tw[j] < c.high && c.low < b.th[j] &&
                              b.th[j] < c.high;
            unsafe += safe ? 0 : 1;
        }
    }
    return unsafe;
}

// The gradient with respect to the parameter rows (the exponentiated bin logits' own logits
// and the derivatives' softplus values; the caller multiplies the latter by the sigmoid) and
// to x (see _rq_backward and _Spline.backward in splines.py).
template <typename T>
void backward(long n, long bins, const T* __restrict e, const T* __restrict sp,
              const T* __restrict x, const T* __restrict grad_y, const T* __restrict grad_lad,
              T* __restrict grad, T* __restrict grad_x, int inverse, const T* constants) {
    const Constants<T> c(constants);
    Bin<T> b;
    Entry<T> q;
    T aw[BLOCK], ah[BLOCK], bw[BLOCK], bh[BLOCK], gd0[BLOCK], gd1[BLOCK];
    for (long i0 = 0; i0 < n; i0 += BLOCK) {
        const long m = std::min(BLOCK, n - i0);
        locate(n, bins, i0, m, e, sp, x, inverse, c, b);
        evaluate(m, b, inverse, c, q);
#pragma omp simd
        for (long j = 0; j < m; ++j) {
            const long i = i0 + j;
            const T w = b.w[j], h = b.h[j], d0 = b.d0[j], d1 = b.d1[j];
            const T s = q.s[j], c2 = q.c2[j], t = q.t[j], omt = q.omt[j], t1 = q.t1[j],
                    tt = q.tt[j], den = q.den[j], numer = q.numer[j];
            const bool inside = std::abs(x[i]) < c.bound;
            const T go = inside ? grad_y[i] * c.width : T(0);
            const T gl = inside ? (inverse ? -grad_lad[i] : grad_lad[i]) : T(0);
            const T rd = T(1) / den;
            const T rn = T(1) / numer;
            const T hr = h * rd;
            const T ya = q.shape_a[j] * rd;
            const T v1 = T(1) + T(-2) * t1;
            const T y_s = hr * (tt + (T(-1) * ya) * v1);
            const T hrt1 = hr * t1;
            const T y_d0 = hrt1 - hrt1 * ya;
            const T y_d1 = -hrt1 * ya;
            const T y_t = ((hr * rd) * s) * numer;
            const T l_s = ((T(1) / s) * T(2) + T(2) * (rn * t1)) - T(2) * (v1 * rd);
            const T trd = t1 * rd;
            const T l_d0 = (omt * omt) * rn - T(2) * trd;
            const T l_d1 = tt * rn - T(2) * trd;
            const T u1 = T(1) + T(-2) * t;
            const T l_t = ((d1 * t + s * u1 - d0 * omt) * rn - (c2 * u1) * rd) * T(2);
            T g_xi, p;
            if (inverse) {
                g_xi = (gl * l_t + go * w) / y_t;
                p = -g_xi;
            } else {
                p = go;
                g_xi = (go * y_t + gl * l_t) / w;
            }
            const T g_s = p * y_s + gl * l_s;
            gd0[j] = p * y_d0 + gl * l_d0;
            gd1[j] = p * y_d1 + gl * l_d1;
            const T g_sw = (g_s * s) / w;
            T a0, a1, b0;
            if (inverse) {
                a0 = go;
                a1 = p;
                b0 = -g_sw + go * t;
            } else {
                a0 = -g_xi;
                a1 = go;
                b0 = -g_sw + (T(-1) * g_xi) * t;
            }
            const T b1 = g_s / w + p * ya;
            aw[j] = a0 * b.sw[j];
            ah[j] = a1 * b.sh[j];
            bw[j] = b0 * b.sw[j];
            bh[j] = b1 * b.sh[j];
            grad_x[i] = inside ? g_xi * c.unit : grad_y[i];
        }
        T centre_w[BLOCK], centre_h[BLOCK];
#pragma omp simd
        for (long j = 0; j < m; ++j) {
            centre_w[j] = (aw[j] * b.cbw[j] + bw[j] * b.ebw[j]) / b.tw[j];
            centre_h[j] = (ah[j] * b.cbh[j] + bh[j] * b.ebh[j]) / b.th[j];
        }
        // left = m k + c L / Z, size = m + c e_b / Z with L = sum_{j<k} e_j, Z = sum_j e_j:
        // d/dtheta_j = e_j (a [j < k] + b [j = k] - (a L + b e_b) / Z)
        for (long k = 0; k < bins; ++k) {
            const T kk = T(k);
            const T* ew = e + k * n + i0;
            const T* eh = e + (bins + k) * n + i0;
            T* gw = grad + k * n + i0;
            T* gh = grad + (bins + k) * n + i0;
#pragma omp simd
            for (long j = 0; j < m; ++j) {
                const T index = b.index[j];
                const T vw = ((kk < index ? aw[j] : T(0)) - centre_w[j]) * ew[j];
                const T vh = ((kk < index ? ah[j] : T(0)) - centre_h[j]) * eh[j];
                gw[j] = kk == index ? vw + bw[j] * b.ebw[j] : vw;
                gh[j] = kk == index ? vh + bh[j] * b.ebh[j] : vh;
            }
        }
        for (long k = 0; k + 1 < bins; ++k) {
            const T below = T(k + 1), at = T(k);
            T* gd = grad + (2 * bins + k) * n + i0;
#pragma omp simd
            for (long j = 0; j < m; ++j) {
                const T index = b.index[j];
                gd[j] = (index == below ? gd0[j] : T(0)) + (index == at ? gd1[j] : T(0));
            }
        }
    }
}

}  // namespace

extern "C" {

long rqspline_forward_f32(long n, long bins, const float* e, const float* sp, const float* x,
                          float* y, float* logs, int inverse, const float* constants) {
    return forward<float>(n, bins, e, sp, x, y, logs, inverse, constants);
}

long rqspline_forward_f64(long n, long bins, const double* e, const double* sp,
                          const double* x, double* y, double* logs, int inverse,
                          const double* constants) {
    return forward<double>(n, bins, e, sp, x, y, logs, inverse, constants);
}
void rqspline_backward_f32(long n, long bins, const float* e, const float* sp, const float* x,
                           const float* grad_y, const float* grad_lad, float* grad,
                           float* grad_x, int inverse, const float* constants) {
    backward<float>(n, bins, e, sp, x, grad_y, grad_lad, grad, grad_x, inverse, constants);
}

void rqspline_backward_f64(long n, long bins, const double* e, const double* sp,
                           const double* x, const double* grad_y, const double* grad_lad,
                           double* grad, double* grad_x, int inverse, const double* constants) {
    backward<double>(n, bins, e, sp, x, grad_y, grad_lad, grad, grad_x, inverse, constants);
}

}  // extern "C"
