/* Token-level passes of the fused FiberPO gate (fiberpo_theory/core/fused.py), one loop each.
 *
 * Each loop performs the same IEEE operations, in the same token order, as the
 * chain of torch ops it stands in for (built with -ffp-contract=off and no
 * fast-math), so both paths give the same bits; torch keeps the exp and every
 * M-sized formula (Eq. 8, 10, 15, 16, 20 live once, in Python).
 *
 *   channel_sums   pos[t] += max(x, 0), neg[t] += min(x, 0)            (the sums of Eq. 9)
 *   gate_tokens    key = 2t + [x < 0], r = x - S[key], c = clip(r, eps),
 *                  inside = (c == r), out = A[key] + c                 (the exponent of Eq. 16)
 *   reduce_tokens  a = g * G; dA[key] += a; a *= inside; dS[key] += a; grad = a
 *   add_channel    grad += per_channel[key]
 *   sorted_runs    index = number of id changes so far; the starts of the runs
 *   carried_runs   the id a coarser column holds on each run, or "does not nest"
 *   *_runs         the gate's passes walked by trajectory lengths (contiguous layouts), and gather_runs
 *
 * The sums run in registers along each run of one trajectory and meet memory
 * only where the trajectory changes.  Every accumulator sees every token of its
 * run, adding +0 for the tokens of the other sign: a sum that starts at +0 is
 * never -0, so adding +0 leaves it exactly as skipping the token would.
 */
#include <stdint.h>
#include <string.h>

/* v where keep is 1, +0 where it is 0, by a bit mask: no branch to mispredict on the token signs, and no
 * v * 0 (which would be NaN for an infinite v) */
#define SELECT(T, U, keep, v)                                                                        \
    __extension__({                                                                                  \
        U bits_;                                                                                     \
        T out_;                                                                                      \
        const T value_ = (v);                                                                        \
        memcpy(&bits_, &value_, sizeof bits_);                                                       \
        bits_ &= (U)0 - (U)(keep);                                                                   \
        memcpy(&out_, &bits_, sizeof out_);                                                          \
        out_;                                                                                        \
    })

/* One token of a backward pass: a = ∂L/∂G·G goes to dA of its sign's entry, a·1u (as torch's a * inside:
 * ±0 off the clip's open interval) to dS and to the gradient; o0/o1, d0/d1 are the run's l = +1 / l = -1 sums */
#define ACCUMULATE(T, U, i, negative, inside, o0, o1, d0, d1)                                        \
    do {                                                                                             \
        const int negative_ = (negative);                                                            \
        const T a_ = grad[i] * gated[i];                                                             \
        const T b_ = a_ * (T)(inside);                                                               \
        o0 = o0 + SELECT(T, U, 1 - negative_, a_);                                                   \
        o1 = o1 + SELECT(T, U, negative_, a_);                                                       \
        d0 = d0 + SELECT(T, U, 1 - negative_, b_);                                                   \
        d1 = d1 + SELECT(T, U, negative_, b_);                                                       \
        grad_x[i] = b_;                                                                              \
    } while (0)

#define FIBER_KERNELS(T, U, SUF)                                                                     \
    void channel_sums_##SUF(int64_t n, const T *restrict x, const int32_t *restrict seg,             \
                            T *restrict pos, T *restrict neg) {                                      \
        if (n <= 0) return;                                                                          \
        int32_t run = seg[0];                                                                        \
        T p = pos[run], q = neg[run];                                                                \
        for (int64_t i = 0; i < n; ++i) {                                                            \
            const int32_t s = seg[i];                                                                \
            if (s != run) {                                                                          \
                pos[run] = p, neg[run] = q;                                                          \
                run = s, p = pos[s], q = neg[s];                                                     \
            }                                                                                        \
            const T v = x[i];                                                                        \
            p = p + (v > 0 ? v : (T)0);                                                              \
            q = q + (v < 0 ? v : (T)0);                                                              \
        }                                                                                            \
        pos[run] = p, neg[run] = q;                                                                  \
    }                                                                                                \
                                                                                                     \
    void gate_tokens_##SUF(int64_t n, const T *restrict x, const int32_t *restrict seg,              \
                           const T *restrict same, const T *restrict offset, T eps, T *restrict out, \
                           uint8_t *restrict inside, int32_t *restrict key) {                        \
        for (int64_t i = 0; i < n; ++i) {                                                            \
            const T v = x[i];                                                                        \
            const int32_t k = 2 * seg[i] + (v < 0);                                                  \
            const T r = v - same[k];                                                                 \
            const T c = r < -eps ? -eps : (r > eps ? eps : r);                                       \
            key[i] = k;                                                                              \
            inside[i] = (uint8_t)(c == r);                                                           \
            out[i] = offset[k] + c;                                                                  \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    void reduce_tokens_##SUF(int64_t n, const T *restrict grad, const T *restrict gated,             \
                             const int32_t *restrict key, const uint8_t *restrict inside,            \
                             T *restrict grad_offset, T *restrict grad_inside, T *restrict grad_x) { \
        if (n <= 0) return;                                                                          \
        int32_t run = key[0] >> 1;                                                                   \
        T o0 = grad_offset[2 * run], o1 = grad_offset[2 * run + 1];                                  \
        T i0 = grad_inside[2 * run], i1 = grad_inside[2 * run + 1];                                  \
        for (int64_t i = 0; i < n; ++i) {                                                            \
            const int32_t k = key[i];                                                                \
            if (k >> 1 != run) {                                                                     \
                grad_offset[2 * run] = o0, grad_offset[2 * run + 1] = o1;                            \
                grad_inside[2 * run] = i0, grad_inside[2 * run + 1] = i1;                            \
                run = k >> 1;                                                                        \
                o0 = grad_offset[2 * run], o1 = grad_offset[2 * run + 1];                            \
                i0 = grad_inside[2 * run], i1 = grad_inside[2 * run + 1];                            \
            }                                                                                        \
            ACCUMULATE(T, U, i, k & 1, inside[i], o0, o1, i0, i1);                                   \
        }                                                                                            \
        grad_offset[2 * run] = o0, grad_offset[2 * run + 1] = o1;                                    \
        grad_inside[2 * run] = i0, grad_inside[2 * run + 1] = i1;                                    \
    }                                                                                                \
                                                                                                     \
    void add_channel_##SUF(int64_t n, const int32_t *restrict key, const T *restrict per_channel,    \
                           T *restrict grad_x) {                                                     \
        for (int64_t i = 0; i < n; ++i) grad_x[i] = grad_x[i] + per_channel[key[i]];                 \
    }

/* The same passes for contiguous trajectories, walked run by run from their lengths: no per-token
 * trajectory index is read, and the (trajectory, sign) key shrinks to one flag byte per token,
 * flags = inside | negative << 1.  Per run the entries 2r (l = +1) and 2r + 1 (l = -1) are registers. */
#define RUN_KERNELS(T, U, SUF)                                                                       \
    void channel_sums_runs_##SUF(int64_t runs, const int64_t *restrict count, const T *restrict x,   \
                                 T *restrict pos, T *restrict neg) {                                 \
        for (int64_t r = 0; r < runs; ++r) {                                                         \
            const int64_t length = count[r]; /* a local: flags (uint8_t) could alias it */           \
            T p = pos[r], q = neg[r];                                                                \
            for (int64_t i = 0; i < length; ++i) {                                                   \
                const T v = x[i];                                                                    \
                p = p + (v > 0 ? v : (T)0);                                                          \
                q = q + (v < 0 ? v : (T)0);                                                          \
            }                                                                                        \
            pos[r] = p, neg[r] = q;                                                                  \
            x += length;                                                                             \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    void gate_runs_##SUF(int64_t runs, const int64_t *restrict count, const T *restrict x,           \
                         const T *restrict same, const T *restrict offset, T eps, T *restrict out,   \
                         uint8_t *restrict flags) {                                                  \
        for (int64_t r = 0; r < runs; ++r) {                                                         \
            const int64_t length = count[r]; /* a local: flags (uint8_t) could alias it */           \
            const T s0 = same[2 * r], s1 = same[2 * r + 1];                                          \
            const T a0 = offset[2 * r], a1 = offset[2 * r + 1];                                      \
            for (int64_t i = 0; i < length; ++i) {                                                   \
                const T v = x[i];                                                                    \
                const int negative = v < 0;                                                          \
                const T res = v - (negative ? s1 : s0);                                              \
                const T c = res < -eps ? -eps : (res > eps ? eps : res);                             \
                flags[i] = (uint8_t)((c == res) | negative << 1);                                    \
                out[i] = (negative ? a1 : a0) + c;                                                   \
            }                                                                                        \
            x += length, out += length, flags += length;                                             \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    void reduce_runs_##SUF(int64_t runs, const int64_t *restrict count, const T *restrict grad,      \
                           const T *restrict gated, const uint8_t *restrict flags,                   \
                           T *restrict grad_offset, T *restrict grad_inside, T *restrict grad_x) {   \
        for (int64_t r = 0; r < runs; ++r) {                                                         \
            const int64_t length = count[r]; /* a local: flags (uint8_t) could alias it */           \
            T o0 = grad_offset[2 * r], o1 = grad_offset[2 * r + 1];                                  \
            T d0 = grad_inside[2 * r], d1 = grad_inside[2 * r + 1];                                  \
            for (int64_t i = 0; i < length; ++i) {                                                   \
                ACCUMULATE(T, U, i, flags[i] >> 1, flags[i] & 1, o0, o1, d0, d1);                    \
            }                                                                                        \
            grad_offset[2 * r] = o0, grad_offset[2 * r + 1] = o1;                                    \
            grad_inside[2 * r] = d0, grad_inside[2 * r + 1] = d1;                                    \
            grad += length, gated += length, flags += length, grad_x += length;                      \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    void add_channel_runs_##SUF(int64_t runs, const int64_t *restrict count,                         \
                                const uint8_t *restrict flags, const T *restrict per_channel,        \
                                T *restrict grad_x) {                                                \
        for (int64_t r = 0; r < runs; ++r) {                                                         \
            const int64_t length = count[r]; /* a local: flags (uint8_t) could alias it */           \
            const T c0 = per_channel[2 * r], c1 = per_channel[2 * r + 1];                            \
            for (int64_t i = 0; i < length; ++i) grad_x[i] = grad_x[i] + (flags[i] >> 1 ? c1 : c0);  \
            flags += length, grad_x += length;                                                       \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    void gather_runs_##SUF(int64_t runs, const int64_t *restrict count, const T *restrict values,    \
                           T *restrict out) {                                                        \
        for (int64_t r = 0; r < runs; ++r) {                                                         \
            const int64_t length = count[r]; /* a local: flags (uint8_t) could alias it */           \
            const T v = values[r];                                                                   \
            for (int64_t i = 0; i < length; ++i) out[i] = v;                                         \
            out += length;                                                                           \
        }                                                                                            \
    }

FIBER_KERNELS(float, uint32_t, f32)
FIBER_KERNELS(double, uint64_t, f64)
RUN_KERNELS(float, uint32_t, f32)
RUN_KERNELS(double, uint64_t, f64)

/* Runs of a sorted id column: index[i] = number of id changes in ids[0..i], starts[r] = first element of run r
 * for the first `capacity` runs (index may be NULL: the runs alone).  Returns the number of runs (more than `capacity`: call again with room for
 * them all), or -1 as soon as a run's id is below the previous run's (the ids are not sorted). */
#define RUN_KERNEL(I, SUF)                                                                           \
    int64_t sorted_runs_##SUF(int64_t n, const I *restrict ids, int32_t *restrict index,             \
                              int64_t *restrict starts, int64_t capacity) {                          \
        if (n <= 0) return 0;                                                                        \
        int64_t runs = 1;                                                                            \
        if (capacity > 0) starts[0] = 0;                                                             \
        if (index) index[0] = 0;                                                                     \
        for (int64_t i = 1; i < n; ++i) {                                                            \
            if (ids[i] != ids[i - 1]) {                                                              \
                if (ids[i] < ids[i - 1]) return -1;                                                  \
                if (runs < capacity) starts[runs] = i;                                               \
                ++runs;                                                                              \
            }                                                                                        \
            if (index) index[i] = (int32_t)(runs - 1);                                               \
        }                                                                                            \
        return runs;                                                                                 \
    }

RUN_KERNEL(int64_t, i64)
RUN_KERNEL(int32_t, i32)

/* A coarser id column carried by contiguous child runs: out[r] = column[starts[r]] when the column is
 * constant on every run (returns 1), else 0 (the column does not nest in the runs).  One read pass; the
 * comparisons of a run are or-ed together, so the inner loop has no early exit and vectorises. */
#define CARRY_KERNEL(I, SUF)                                                                         \
    int carried_runs_##SUF(int64_t runs, const int64_t *restrict starts, int64_t n,                  \
                           const I *restrict column, int64_t *restrict out) {                        \
        for (int64_t r = 0; r < runs; ++r) {                                                         \
            const int64_t lo = starts[r], hi = r + 1 < runs ? starts[r + 1] : n;                     \
            const I first = column[lo];                                                              \
            int differs = 0;                                                                         \
            for (int64_t i = lo + 1; i < hi; ++i) differs |= column[i] != first;                     \
            if (differs) return 0;                                                                   \
            out[r] = (int64_t)first;                                                                 \
        }                                                                                            \
        return 1;                                                                                    \
    }

CARRY_KERNEL(int64_t, i64)
CARRY_KERNEL(int32_t, i32)
