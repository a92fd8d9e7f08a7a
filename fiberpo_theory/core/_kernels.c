/* Token-level passes of the fused FiberPO gate (fiberpo_theory/core/fused.py), one loop each.
 *
 * Each loop performs the same IEEE operations, in the same token order, as the
 * chain of torch ops it stands in for (built with -ffp-contract=off and no
 * fast-math), so both paths give the same bits; torch keeps the exp.  The
 * formulas live in Python (gates.py, objectives.py, fused.py) and stay the
 * reference: besides the token passes, two M-sized loops (fiber_chain*) run
 * FiberPO's per-trajectory chain op for op as the torch ops do, because at
 * the sizes of a micro-batch some sixty of those ops cost more than the
 * token passes themselves.
 *
 *   channel_sums   pos[t] += max(x, 0), neg[t] += min(x, 0)            (the sums of Eq. 9)
 *   gate_tokens    key = 2t + [x < 0], r = x - S[key], c = clip(r, eps),
 *                  inside = (c == r), out = A[key] + c                 (the exponent of Eq. 16)
 *   reduce_tokens  a = g * G; dA[key] += a; a *= inside; dS[key] += a; grad = a
 *   add_channel    grad += per_channel[key]
 *   sorted_runs    index = number of id changes so far; the starts of the runs
 *   carried_runs   the id a coarser column holds on each run, or "does not nest"
 *   *_runs         the gate's passes walked by trajectory lengths (contiguous layouts), and gather_runs
 *   weigh_runs     the objective's pass (Eq. 2, weights per trajectory): q = adv * G in place of G, and per
 *                  run and sign w * sum q and -(w * sum q [inside]) (dJ/dA, dJ/dS); total += w * sum q.
 *                  Its sums, which no torch op mirrors, are taken in LANES partial sums (see WEIGH_TOKEN)
 *   objective_grad_runs  grad = scale * (w * q [inside] + per_channel[run, sign])
 *   tally_runs     the training metrics' pass (diagnostics.py): per run the tokens with x < 0, with |u| >= eps,
 *                  with |u| > eps (u = r as gate_runs takes it) and with |v| > eps, and gate_runs' exponent;
 *                  tally_flags_runs: the same counts and Sigma G read off gate_runs' flags and G (counting_gate)
 *   label_counts   the training metrics' regime labels (channel, global, local) counted over the trajectories;
 *                  summarize_counts: those labels and the metrics' sums from a pass's per-trajectory counts
 *   mask_positions the row-major positions (int32) and row lengths of a (B, L) 0/1 mask, in one pass;
 *                  gather_blocks / scatter_blocks / gather_blocks_difference: rows of one block <-> flat tokens
 *   fiber_chain    channel sums -> means (Eq. 9), log w by g_agg with k = T (Eq. 8, 10), its slopes (γ of
 *                  Eq. 20), the tables S and A (Eq. 14-16); fiber_chain_grad: the backward of that chain
 *   domain_chain   the same for FiberPO-Domain on one process: group and domain means, log w of Eq. 31-33 with
 *                  the three levels' slopes; domain_chain_grad: its backward
 *
 * The sums run in registers along each run of one trajectory and meet memory
 * only where the trajectory changes.  Every accumulator sees every token of its
 * run, adding +0 for the tokens of the other sign: a sum that starts at +0 is
 * never -0, so adding +0 leaves it exactly as skipping the token would.
 */
#include <stdint.h>
#include <string.h>

/* clip(v, ±eps) as torch.clamp takes it (a -0 inside stays -0), and |v| */
#define CLIP(v, eps) ((v) < -(eps) ? -(eps) : ((v) > (eps) ? (eps) : (v)))
#define ABS(v) ((v) < 0 ? -(v) : (v))

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

/* a to the sum of its sign's entry (o0 for l = +1, o1 for l = -1) and b likewise to d0 / d1, the other
 * entry adding +0: the per-run, per-sign sums of the backward passes and of the objective's pass */
#define SIGN_SUMS(T, U, negative, a, b, o0, o1, d0, d1)                                              \
    do {                                                                                             \
        const int negative_ = (negative);                                                            \
        o0 = o0 + SELECT(T, U, 1 - negative_, a);                                                    \
        o1 = o1 + SELECT(T, U, negative_, a);                                                        \
        d0 = d0 + SELECT(T, U, 1 - negative_, b);                                                    \
        d1 = d1 + SELECT(T, U, negative_, b);                                                        \
    } while (0)

/* One token of a backward pass: a = ∂L/∂G·G goes to dA of its sign's entry, a·1u (as torch's a * inside:
 * ±0 off the clip's open interval) to dS and to the gradient; o0/o1, d0/d1 are the run's l = +1 / l = -1 sums */
#define ACCUMULATE(T, U, i, negative, inside, o0, o1, d0, d1)                                        \
    do {                                                                                             \
        const T a_ = grad[i] * gated[i];                                                             \
        const T b_ = a_ * (T)(inside);                                                               \
        SIGN_SUMS(T, U, negative, a_, b_, o0, o1, d0, d1);                                           \
        grad_x[i] = b_;                                                                              \
    } while (0)

/* One token of the objective's pass: q = adv * G in place, its sums into lane j of the run's per-sign
 * partial sums l0/l1 (dJ/dA) and e0/e1 (dJ/dS).  The run's sums are LANES partial sums, added up in lane
 * order at its end: one running sum costs an add's latency per token, lanes let the loop vectorise.  The
 * order is fixed by each token's place in its run, so the bits do not depend on chunking or layout. */
#define LANES 16
#define WEIGH_TOKEN(T, U, i, j)                                                                      \
    do {                                                                                             \
        const T v_ = adv[i] * q[i];                                                                  \
        SIGN_SUMS(T, U, flags[i] >> 1, v_, SELECT(T, U, flags[i] & 1, v_), l0[j], l1[j], e0[j], e1[j]); \
        q[i] = v_;                                                                                   \
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
            const T c = CLIP(r, eps);                                                                \
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
                const T c = CLIP(res, eps);                                                          \
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
    void weigh_runs_##SUF(int64_t runs, const int64_t *restrict count, const T *restrict weights,     \
                          const T *restrict adv, const uint8_t *restrict flags, T *restrict q,       \
                          T *restrict grad_offset, T *restrict grad_same, T *restrict total) {       \
        T sum = *total;                                                                              \
        for (int64_t r = 0; r < runs; ++r) {                                                         \
            const int64_t length = count[r]; /* a local: flags (uint8_t) could alias it */           \
            T l0[LANES] = {0}, l1[LANES] = {0}, e0[LANES] = {0}, e1[LANES] = {0};                    \
            int64_t i = 0;                                                                           \
            for (; i + LANES <= length; i += LANES)                                                  \
                for (int j = 0; j < LANES; ++j) WEIGH_TOKEN(T, U, i + j, j);                         \
            for (int j = 0; i < length; ++i, ++j) WEIGH_TOKEN(T, U, i, j);                           \
            T o0 = 0, o1 = 0, d0 = 0, d1 = 0;                                                        \
            for (int j = 0; j < LANES; ++j) o0 = o0 + l0[j], o1 = o1 + l1[j], d0 = d0 + e0[j], d1 = d1 + e1[j]; \
            const T weight = weights[r];                                                             \
            grad_offset[2 * r] = weight * o0, grad_offset[2 * r + 1] = weight * o1;                  \
            grad_same[2 * r] = -(weight * d0), grad_same[2 * r + 1] = -(weight * d1);                \
            sum = sum + weight * (o0 + o1);                                                          \
            adv += length, flags += length, q += length;                                             \
        }                                                                                            \
        *total = sum;                                                                                \
    }                                                                                                \
                                                                                                     \
    void objective_grad_runs_##SUF(int64_t runs, const int64_t *restrict count,                      \
                                   const T *restrict weights, const T *restrict q,                   \
                                   const uint8_t *restrict flags, const T *restrict per_channel,     \
                                   T scale, T *restrict grad_x) {                                    \
        for (int64_t r = 0; r < runs; ++r) {                                                         \
            const int64_t length = count[r]; /* a local: flags (uint8_t) could alias it */           \
            const T w = scale * weights[r];                                                          \
            const T c0 = scale * per_channel[2 * r], c1 = scale * per_channel[2 * r + 1];            \
            for (int64_t i = 0; i < length; ++i) {                                                   \
                const T a = SELECT(T, U, flags[i] & 1, w * q[i]);                                    \
                grad_x[i] = a + (flags[i] >> 1 ? c1 : c0);                                           \
            }                                                                                        \
            q += length, flags += length, grad_x += length;                                          \
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
    }                                                                                                \
                                                                                                     \
    void tally_runs_##SUF(int64_t runs, const int64_t *restrict count, const T *restrict x,          \
                          const T *restrict same, const T *restrict offset, T eps, T *restrict out,  \
                          int64_t *restrict tallies) {                                               \
        for (int64_t r = 0; r < runs; ++r) {                                                         \
            const int64_t length = count[r];                                                         \
            const T s0 = same[2 * r], s1 = same[2 * r + 1];                                          \
            const T a0 = offset[2 * r], a1 = offset[2 * r + 1];                                      \
            /* counters as wide as T's lanes (a run is far below 2^32 tokens) and only quiet compares    \
             * (== and the clip's selects): then the loop vectorises.  For finite x, |u| > eps iff the    \
             * clip moved u, and |u| >= eps iff it did or u = ±eps */                                     \
            U below = 0, reach = 0, past = 0;                                                        \
            for (int64_t i = 0; i < length; ++i) {                                                   \
                const T v = x[i];                                                                    \
                const int negative = v < 0;                                                          \
                const T res = v - (negative ? s1 : s0);                                              \
                const T c = CLIP(res, eps);                                                          \
                const U outside = (U)(c != res), edge = (U)(res == eps) + (U)(res == -eps);          \
                below += (U)negative, past += outside, reach += outside + edge;                      \
                out[i] = (negative ? a1 : a0) + c;                                                   \
            }                                                                                        \
            /* a token's |v| is the other channel's |log s|: |S| of the opposite sign's entry */      \
            const int64_t past_v = (length - (int64_t)below) * (ABS(s1) > eps) + (int64_t)below * (ABS(s0) > eps); \
            tallies[4 * r] = below, tallies[4 * r + 1] = reach, tallies[4 * r + 2] = past;           \
            tallies[4 * r + 3] = past_v;                                                             \
            x += length, out += length;                                                              \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    /* tally_runs' counts read off what the gate's run loop wrote (flags, G) instead of redoing it: |u| > eps \
     * is a flag; |u| = eps, the one case the flags leave open, recomputes u as gate_runs does.  The counts   \
     * are integer sums (the loop vectorises as it is); Sigma G, a run's sum in LANES partial sums in T added \
     * up in lane order at its end, adds to *gated_sum in double. */                                        \
    void tally_flags_runs_##SUF(int64_t runs, const int64_t *restrict count, const T *restrict x,    \
                                const T *restrict same, const uint8_t *restrict flags,               \
                                const T *restrict gated, T eps, int64_t *restrict tallies,           \
                                double *restrict gated_sum) {                                        \
        double total = *gated_sum;                                                                   \
        for (int64_t r = 0; r < runs; ++r) {                                                         \
            const int64_t length = count[r]; /* a local: flags (uint8_t) could alias it */           \
            const T s0 = same[2 * r], s1 = same[2 * r + 1];                                          \
            U below = 0, past = 0, edge = 0;                                                         \
            for (int64_t i = 0; i < length; ++i) {                                                   \
                const U negative = (U)(flags[i] >> 1);                                               \
                const T res = x[i] - (negative ? s1 : s0);                                           \
                below += negative, past += (U)1 - (U)(flags[i] & 1);                                 \
                edge += (U)(res == eps) + (U)(res == -eps);                                          \
            }                                                                                        \
            T lanes[LANES] = {0};                                                                    \
            int64_t i = 0;                                                                           \
            for (; i + LANES <= length; i += LANES)                                                  \
                for (int j = 0; j < LANES; ++j) lanes[j] = lanes[j] + gated[i + j];                  \
            for (int j = 0; i < length; ++i, ++j) lanes[j] = lanes[j] + gated[i];                    \
            double sum = 0;                                                                          \
            for (int j = 0; j < LANES; ++j) sum = sum + (double)lanes[j];                            \
            total = total + sum;                                                                     \
            const int64_t past_v = (length - (int64_t)below) * (ABS(s1) > eps) + (int64_t)below * (ABS(s0) > eps); \
            tallies[4 * r] = below, tallies[4 * r + 1] = past + edge, tallies[4 * r + 2] = past;     \
            tallies[4 * r + 3] = past_v;                                                             \
            x += length, flags += length, gated += length;                                           \
        }                                                                                            \
        *gated_sum = total;                                                                          \
    }

/* FiberPO's per-trajectory chain with k = T (fused.py: _means_of_sums, _FiberPOLogBase, _sign_tables and
 * _channel_grad), one trajectory at a time, each step the IEEE operation of the torch op it mirrors and in
 * the same order (x * 1 and x * -1 where torch multiplies by a sign, so that zeros keep torch's signs).
 * g_agg (Eq. 10): x if |x| <= C, sign(x)(k+1)C - kx if |x| < (1 + 1/k)C, else 0; its slope 1, -k, 0. */
#define CHAIN_KERNELS(T, SUF)                                                                        \
    static inline void g_agg_both_##SUF(T x, T c, T k, T *value, T *slope) {                        \
        const T ax = ABS(x);                                                                         \
        const T zero_at = ((T)1 + (T)1 / k) * c;                                                     \
        const T sign = x > 0 ? (T)1 : (x < 0 ? (T)-1 : (T)0);                                        \
        const T rollback = sign * (k + (T)1) * c - k * x;                                            \
        const int passing = ax <= c, live = ax < zero_at;                                            \
        *value = passing ? x : (live ? rollback : (T)0);                                             \
        *slope = passing ? (T)1 : (live ? -k : (T)0);                                                \
    }                                                                                                \
                                                                                                     \
    void fiber_chain_##SUF(int64_t m, const int64_t *restrict count, const T *restrict positive,     \
                           const T *restrict nonpositive, T c_pos, T c_neg, T eps,                   \
                           T *restrict channels, T *restrict same, T *restrict offset,               \
                           T *restrict slopes, T *restrict log_base_out) {                           \
        for (int64_t t = 0; t < m; ++t) {                                                            \
            const T length = (T)count[t];                                                            \
            const T p = positive[t] / length, q = ((T)0 - nonpositive[t]) / length;                  \
            T g0, g1, s0, s1;                                                                        \
            g_agg_both_##SUF(p, c_pos, length, &g0, &s0);                                            \
            g_agg_both_##SUF(q, c_neg, length, &g1, &s1);                                            \
            const T log_base = g0 - g1;                                                              \
            const T o0 = -q, o1 = p; /* l·v of l = +1 and of l = -1 */                               \
            channels[2 * t] = p, channels[2 * t + 1] = q;                                            \
            slopes[2 * t] = s0, slopes[2 * t + 1] = -s1;                                             \
            same[2 * t] = p, same[2 * t + 1] = -q;                                                   \
            offset[2 * t] = log_base - CLIP(o0, eps), offset[2 * t + 1] = log_base - CLIP(o1, eps);  \
            if (log_base_out) log_base_out[t] = log_base;                                            \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    void fiber_chain_grad_##SUF(int64_t m, const int64_t *restrict count, const T *restrict channels, \
                                const T *restrict slopes, const T *restrict grad_offset,             \
                                const T *restrict grad_same, T eps, T *restrict per_channel) {       \
        for (int64_t t = 0; t < m; ++t) {                                                            \
            const T length = (T)count[t];                                                            \
            const T a0 = grad_offset[2 * t], a1 = grad_offset[2 * t + 1];                            \
            const T s0 = grad_same[2 * t], s1 = grad_same[2 * t + 1];                                \
            const T c0 = channels[2 * t], c1 = channels[2 * t + 1];                                  \
            const T in0 = (T)(ABS(c0) <= eps), in1 = (T)(ABS(c1) <= eps);                            \
            const T base = a0 + a1;                                                                  \
            const T crossed0 = a1 * in0 * (T)1, crossed1 = a0 * in1 * (T)-1;                         \
            const T g0 = s0 * (T)1 + base * slopes[2 * t] - crossed0;                                \
            const T g1 = s1 * (T)-1 + base * slopes[2 * t + 1] - crossed1;                           \
            per_channel[2 * t] = g0 / length, per_channel[2 * t + 1] = -(g1 / length);               \
        }                                                                                            \
    }

/* FiberPO-Domain's per-trajectory chain on one process (objectives.py: _means_of_sums, _domain_terms,
 * _weighted_g_agg and _DomainLogBase.with_vjp, fused.py: _sign_tables), each step the IEEE operation of the torch
 * op it mirrors, in its order: the channel means; the group sums of the channels in trajectory order and the
 * domain sums of the group sums in group order (index_add into +0), then their means; per channel l, g_agg and
 * its slope at the domain mean (k = T_D), the group mean's deviation from it (k = T_g) and the channel's
 * deviation from the group mean (k = T_τ); log w = (+0 + G⁺·1) + G⁻·-1 (a sum over the two channels starts at
 * +0); the tables S and A.  levels: traj_group, traj_domain (m each), group_domain, group_count, group_tokens
 * (one per group), domain_count, domain_tokens (one per domain); work: 2 (groups + domains) values; gamma: the
 * three levels' slopes, (m, 2) each.  domain_chain_grad: the backward of that chain (_channel_grad with
 * _DomainLogBase._vjp, then chain_grad's division by T_τ), one trajectory pass, the group and domain means of
 * the vjp's shares, and a second pass. */
#define DOMAIN_KERNELS(T, SUF)                                                                       \
    /* sums[2i], sums[2i + 1] divided by count[i] in place: the means of the group and domain levels */  \
    static inline void per_count_##SUF(int64_t n, const int64_t *restrict count, T *restrict sums) {   \
        for (int64_t i = 0; i < n; ++i) {                                                            \
            const T c = (T)count[i];                                                                 \
            sums[2 * i] = sums[2 * i] / c, sums[2 * i + 1] = sums[2 * i + 1] / c;                    \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    void domain_chain_##SUF(int64_t m, int64_t groups, int64_t domains, const int64_t *restrict count,  \
                            const int64_t *restrict levels, const T *restrict positive,               \
                            const T *restrict nonpositive, T c_pos, T c_neg, T eps, T *restrict work, \
                            T *restrict channels, T *restrict same, T *restrict offset,               \
                            T *restrict gamma, T *restrict log_base_out) {                            \
        const int64_t *traj_group = levels, *traj_domain = levels + m, *group_domain = levels + 2 * m; \
        const int64_t *group_count = group_domain + groups, *group_tokens = group_count + groups;    \
        const int64_t *domain_count = group_tokens + groups, *domain_tokens = domain_count + domains; \
        T *group_mean = work, *domain_mean = work + 2 * groups;                                      \
        for (int64_t i = 0; i < 2 * (groups + domains); ++i) work[i] = (T)0;                          \
        for (int64_t t = 0; t < m; ++t) {                                                            \
            const T length = (T)count[t];                                                            \
            const T p = positive[t] / length, q = ((T)0 - nonpositive[t]) / length;                  \
            const int64_t g = traj_group[t];                                                         \
            channels[2 * t] = p, channels[2 * t + 1] = q;                                            \
            group_mean[2 * g] = group_mean[2 * g] + p, group_mean[2 * g + 1] = group_mean[2 * g + 1] + q; \
        }                                                                                            \
        for (int64_t g = 0; g < groups; ++g) {                                                       \
            const int64_t d = group_domain[g];                                                       \
            domain_mean[2 * d] = domain_mean[2 * d] + group_mean[2 * g];                             \
            domain_mean[2 * d + 1] = domain_mean[2 * d + 1] + group_mean[2 * g + 1];                 \
        }                                                                                            \
        per_count_##SUF(groups, group_count, group_mean), per_count_##SUF(domains, domain_count, domain_mean); \
        for (int64_t t = 0; t < m; ++t) {                                                            \
            const int64_t g = traj_group[t], d = traj_domain[t];                                     \
            const T k_domain = (T)domain_tokens[d], k_group = (T)group_tokens[g], k_traj = (T)count[t]; \
            T gated[2];                                                                              \
            for (int l = 0; l < 2; ++l) {                                                            \
                const T c = l ? c_neg : c_pos, dm = domain_mean[2 * d + l], gm = group_mean[2 * g + l]; \
                T v0, v1, v2;                                                                        \
                g_agg_both_##SUF(dm, c, k_domain, &v0, &gamma[2 * t + l]);                            \
                g_agg_both_##SUF(gm - dm, c, k_group, &v1, &gamma[2 * (m + t) + l]);                  \
                g_agg_both_##SUF(channels[2 * t + l] - gm, c, k_traj, &v2, &gamma[2 * (2 * m + t) + l]); \
                gated[l] = v0 + v1 + v2;                                                             \
            }                                                                                        \
            const T log_base = ((T)0 + gated[0] * (T)1) + gated[1] * (T)-1;                          \
            const T p = channels[2 * t], q = channels[2 * t + 1];                                    \
            same[2 * t] = p, same[2 * t + 1] = -q;                                                   \
            offset[2 * t] = log_base - CLIP(-q, eps), offset[2 * t + 1] = log_base - CLIP(p, eps);   \
            if (log_base_out) log_base_out[t] = log_base;                                            \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    void domain_chain_grad_##SUF(int64_t m, int64_t groups, int64_t domains,                         \
                                 const int64_t *restrict count, const int64_t *restrict levels,      \
                                 const T *restrict channels, const T *restrict gamma,                \
                                 const T *restrict grad_offset, const T *restrict grad_same, T eps,  \
                                 T *restrict work, T *restrict per_channel) {                        \
        const int64_t *traj_group = levels, *traj_domain = levels + m, *group_domain = levels + 2 * m; \
        const int64_t *group_count = group_domain + groups, *domain_count = group_count + 2 * groups; \
        T *group_mean = work, *domain_mean = work + 2 * groups;                                      \
        for (int64_t i = 0; i < 2 * (groups + domains); ++i) work[i] = (T)0;                          \
        for (int64_t t = 0; t < m; ++t) {                                                            \
            const int64_t g = traj_group[t], d = traj_domain[t];                                     \
            const T base = grad_offset[2 * t] + grad_offset[2 * t + 1];                              \
            for (int l = 0; l < 2; ++l) {                                                            \
                const T v = base * (l ? (T)-1 : (T)1);                                               \
                const T g1 = gamma[2 * t + l], g2 = gamma[2 * (m + t) + l], g3 = gamma[2 * (2 * m + t) + l]; \
                group_mean[2 * g + l] = group_mean[2 * g + l] + v * (g2 - g3);                       \
                domain_mean[2 * d + l] = domain_mean[2 * d + l] + v * (g1 - g2);                     \
            }                                                                                        \
        }                                                                                            \
        per_count_##SUF(groups, group_count, group_mean), per_count_##SUF(domains, domain_count, domain_mean); \
        for (int64_t t = 0; t < m; ++t) {                                                            \
            const int64_t g = traj_group[t], d = traj_domain[t];                                     \
            const T length = (T)count[t];                                                            \
            const T base = grad_offset[2 * t] + grad_offset[2 * t + 1];                              \
            T result[2];                                                                             \
            for (int l = 0; l < 2; ++l) {                                                            \
                const T sign = l ? (T)-1 : (T)1;                                                     \
                const T v = base * sign;                                                             \
                const T vjp = v * gamma[2 * (2 * m + t) + l] + group_mean[2 * g + l] + domain_mean[2 * d + l]; \
                const T inside = (T)(ABS(channels[2 * t + l]) <= eps);                               \
                const T crossed = grad_offset[2 * t + 1 - l] * inside * sign;                        \
                result[l] = grad_same[2 * t + l] * sign + vjp - crossed;                             \
            }                                                                                        \
            per_channel[2 * t] = result[0] / length, per_channel[2 * t + 1] = -(result[1] / length); \
        }                                                                                            \
    }

/* The label counts of the training metrics (diagnostics.py: g_agg_regime on both channels, global_regime,
 * _local_label, and the bincount of the four label sets over the trajectories) in one pass.  Per channel the
 * regime is P (0) where |x| <= C, R (1) where |x| < (1 + 1/k)C, else Z (2), compared in T as torch compares a
 * T tensor with a Python number (C and, for a given k, (1 + 1/k)C, rounded to T); k <= 0 means k = T_τ, whose
 * (1 + 1/k)C torch takes in T.  counts: 3 + 3 + 5 + 3 bins (channel +, channel -, global, local). */
#define LABEL_KERNELS(T, SUF)                                                                        \
    static inline void add_labels_##SUF(T p, T n, T len, T over, T cp, T cn, T fixed_pos, T fixed_neg,  \
                                        double k, int64_t *restrict counts) {                        \
        const T zero_pos = k > 0 ? fixed_pos : ((T)1 + (T)1 / len) * cp;                             \
        const T zero_neg = k > 0 ? fixed_neg : ((T)1 + (T)1 / len) * cn;                             \
        const T ap = ABS(p), an = ABS(n);                                                            \
        const int rp = ap <= cp ? 0 : (ap < zero_pos ? 1 : 2);                                       \
        const int rn = an <= cn ? 0 : (an < zero_neg ? 1 : 2);                                       \
        const int passing = (rp == 0) + (rn == 0), rolling = (rp == 1) + (rn == 1);                  \
        const int zeroed = (rp == 2) + (rn == 2);                                                    \
        const int global = passing == 2 ? 0 : passing == 1 && rolling == 1 ? 1                       \
                         : passing == 1 && zeroed == 1 ? 2 : zeroed == 2 ? 4 : 3;                    \
        const int local = over == len ? 2 : (over == 0 ? 0 : 1);                                     \
        counts[rp] += 1, counts[3 + rn] += 1, counts[6 + global] += 1, counts[11 + local] += 1;      \
    }                                                                                                \
                                                                                                     \
    void label_counts_##SUF(int64_t m, const T *restrict pos, int64_t pos_stride, const T *restrict neg, \
                            int64_t neg_stride, const T *restrict length, const T *restrict reaching,  \
                            double c_pos, double c_neg, double k, int64_t *restrict counts) {         \
        const T cp = (T)c_pos, cn = (T)c_neg;                                                        \
        const T fixed_pos = (T)((1.0 + 1.0 / k) * c_pos), fixed_neg = (T)((1.0 + 1.0 / k) * c_neg);  \
        for (int i = 0; i < 14; ++i) counts[i] = 0;                                                  \
        for (int64_t t = 0; t < m; ++t)                                                              \
            add_labels_##SUF(pos[t * pos_stride], neg[t * neg_stride], length[t], reaching[t], cp, cn,  \
                             fixed_pos, fixed_neg, k, counts);                                       \
    }                                                                                                \
                                                                                                     \
    /* the whole metrics summary of a pass's per-trajectory counts (tallies: x < 0, |u| >= eps, |u| > eps,   \
     * |v| > eps per trajectory; count: T_τ), as diagnostics.metrics_of_tally takes it from a GateTally:     \
     * out[0..13] label_counts with length T_τ and reaching |u| >= eps (both as T), out[14..15] Σ log s⁺,   \
     * Σ log s⁻, out[16..17] the tokens past the clip in u and in v, out[18] Σ |log w| T_τ (double, in    \
     * trajectory order) */                                                                          \
    void summarize_counts_##SUF(int64_t m, const T *restrict pos, int64_t pos_stride, const T *restrict neg, \
                                int64_t neg_stride, const T *restrict log_base,                      \
                                const int64_t *restrict count, const int64_t *restrict tallies,      \
                                double c_pos, double c_neg, double k, double *restrict out) {        \
        const T cp = (T)c_pos, cn = (T)c_neg;                                                        \
        const T fixed_pos = (T)((1.0 + 1.0 / k) * c_pos), fixed_neg = (T)((1.0 + 1.0 / k) * c_neg);  \
        int64_t counts[14] = {0}, past_u = 0, past_v = 0;                                            \
        double sum_pos = 0, sum_neg = 0, abs_log_base = 0;                                           \
        for (int64_t t = 0; t < m; ++t) {                                                            \
            const T p = pos[t * pos_stride], n = neg[t * neg_stride];                                \
            add_labels_##SUF(p, n, (T)count[t], (T)tallies[4 * t + 1], cp, cn, fixed_pos, fixed_neg, k, \
                             counts);                                                                \
            sum_pos += (double)p, sum_neg += (double)n;                                              \
            past_u += tallies[4 * t + 2], past_v += tallies[4 * t + 3];                              \
            abs_log_base += ABS((double)log_base[t]) * (double)count[t];                             \
        }                                                                                            \
        for (int i = 0; i < 14; ++i) out[i] = (double)counts[i];                                     \
        out[14] = sum_pos, out[15] = sum_neg, out[16] = (double)past_u, out[17] = (double)past_v;    \
        out[18] = abs_log_base;                                                                      \
    }

CHAIN_KERNELS(float, f32)
CHAIN_KERNELS(double, f64)
LABEL_KERNELS(float, f32)
LABEL_KERNELS(double, f64)
DOMAIN_KERNELS(float, f32)
DOMAIN_KERNELS(double, f64)

FIBER_KERNELS(float, uint32_t, f32)
FIBER_KERNELS(double, uint64_t, f64)
RUN_KERNELS(float, uint32_t, f32)
RUN_KERNELS(double, uint64_t, f64)

/* FiberPO's objective (fused_objective.py) in as few calls as its exp allows, on one workspace of 17m + 1
 * values: sums (positive, non-positive: m each), channels, S, A, slopes, dJ/dA, dJ/dS, per-channel gradient
 * (2m each), log w (m), J.  fiber_objective_chain: the channel sums and fiber_chain, J = +0; fiber_objective_grad:
 * fiber_chain_grad on dJ/dA, dJ/dS, then objective_grad_runs. */
#define OBJECTIVE_KERNELS(T, SUF)                                                                    \
    void fiber_objective_chain_##SUF(int64_t m, const int64_t *restrict count, const T *restrict x,  \
                                     T c_pos, T c_neg, T eps, T *restrict ws) {                      \
        for (int64_t i = 0; i < 2 * m; ++i) ws[i] = (T)0;                                            \
        channel_sums_runs_##SUF(m, count, x, ws, ws + m);                                            \
        fiber_chain_##SUF(m, count, ws, ws + m, c_pos, c_neg, eps, ws + 2 * m, ws + 4 * m,           \
                          ws + 6 * m, ws + 8 * m, ws + 16 * m);                                      \
        ws[17 * m] = (T)0;                                                                           \
    }                                                                                                \
                                                                                                     \
    void fiber_objective_grad_##SUF(int64_t m, const int64_t *restrict count, T *restrict ws, T eps, \
                                    const T *restrict weights, const T *restrict q,                  \
                                    const uint8_t *restrict flags, T scale, T *restrict grad_x) {    \
        fiber_chain_grad_##SUF(m, count, ws + 2 * m, ws + 8 * m, ws + 10 * m, ws + 12 * m, eps,      \
                               ws + 14 * m);                                                         \
        objective_grad_runs_##SUF(m, count, weights, q, flags, ws + 14 * m, scale, grad_x);          \
    }

OBJECTIVE_KERNELS(float, f32)
OBJECTIVE_KERNELS(double, f64)

/* Runs of a sorted id column: index[i] = number of id changes in ids[0..i]; for the first `capacity` runs
 * starts[r] = its first element, counts[r] = its length, values[r] = its id (index, starts, counts and
 * values may each be NULL).  Returns the number of runs (more than `capacity`: call again with room for
 * them all), or -1 as soon as a run's id is below the previous run's (the ids are not sorted). */
#define RUN_KERNEL(I, SUF)                                                                           \
    int64_t sorted_runs_##SUF(int64_t n, const I *restrict ids, int32_t *restrict index,             \
                              int64_t *restrict starts, int64_t *restrict counts,                    \
                              int64_t *restrict values, int64_t capacity) {                          \
        if (n <= 0) return 0;                                                                        \
        int64_t runs = 1, begin = 0;                                                                 \
        if (starts && capacity > 0) starts[0] = 0;                                                   \
        if (index) index[0] = 0;                                                                     \
        for (int64_t i = 1; i < n; ++i) {                                                            \
            if (ids[i] != ids[i - 1]) {                                                              \
                if (ids[i] < ids[i - 1]) return -1;                                                  \
                if (runs <= capacity) {                                                              \
                    if (counts) counts[runs - 1] = i - begin;                                        \
                    if (values) values[runs - 1] = (int64_t)ids[i - 1];                              \
                }                                                                                    \
                if (starts && runs < capacity) starts[runs] = i;                                     \
                begin = i;                                                                           \
                ++runs;                                                                              \
            }                                                                                        \
            if (index) index[i] = (int32_t)(runs - 1);                                               \
        }                                                                                            \
        if (runs <= capacity) {                                                                      \
            if (counts) counts[runs - 1] = n - begin;                                                \
            if (values) values[runs - 1] = (int64_t)ids[n - 1];                                      \
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

/* A (B, L) 0/1 byte mask (torch.bool) to the row-major positions of its ones (int32: B·L below 2^31), the
 * ones per row and where each row's first one is (0 for an empty row), one read pass; *blocks is 1 when the
 * ones of every row are one unbroken block (a right- or left-padded batch).  Returns the number of ones, or
 * -1 when it would exceed `capacity`. */
int64_t mask_positions(int64_t rows, int64_t cols, const uint8_t *restrict mask, int32_t *restrict positions,
                       int64_t *restrict lengths, int64_t *restrict starts, int64_t *restrict blocks,
                       int64_t capacity) {
    int64_t n = 0;
    blocks[0] = 1, blocks[1] = -1; /* every row one block; the first row without a token */
    for (int64_t b = 0; b < rows; ++b) {
        const uint8_t *row = mask + b * cols;
        const int64_t before = n;
        for (int64_t j = 0; j < cols; ++j) {
            if (n < capacity) positions[n] = (int32_t)(b * cols + j); /* overwritten unless row[j] is set */
            n += row[j] != 0;
        }
        if (n > capacity) return -1;
        lengths[b] = n - before;
        if (n == before && blocks[1] < 0) blocks[1] = b;
        starts[b] = n > before ? positions[before] - b * cols : 0;
        if (n > before && positions[n - 1] - positions[before] != n - before - 1) blocks[0] = 0;
    }
    return n;
}

/* Row blocks of a (B, L) batch <-> its flat tokens, for masks whose rows are one block each (mask_positions):
 * gather copies each row's block (bytes: any dtype), as index_select by the positions does; scatter writes
 * the (B, L) gradient, +0 + g inside the blocks and +0 outside, as index_add into zeros does. */
void gather_blocks(int64_t rows, int64_t cols, int64_t size, const char *restrict values,
                   const int64_t *restrict starts, const int64_t *restrict lengths, char *restrict out) {
    for (int64_t b = 0; b < rows; ++b) {
        const int64_t length = lengths[b];
        memcpy(out, values + (b * cols + starts[b]) * size, (size_t)(length * size));
        out += length * size;
    }
}

#define SCATTER_KERNEL(T, SUF)                                                                       \
    void scatter_blocks_##SUF(int64_t rows, int64_t cols, const T *restrict flat,                    \
                              const int64_t *restrict starts, const int64_t *restrict lengths,       \
                              T *restrict out) {                                                     \
        for (int64_t b = 0; b < rows; ++b) {                                                         \
            T *row = out + b * cols;                                                                 \
            const int64_t lo = starts[b], hi = starts[b] + lengths[b];                               \
            for (int64_t j = 0; j < lo; ++j) row[j] = (T)0;                                          \
            for (int64_t j = lo; j < hi; ++j) row[j] = (T)0 + flat[j - lo];                          \
            for (int64_t j = hi; j < cols; ++j) row[j] = (T)0;                                       \
            flat += hi - lo;                                                                         \
        }                                                                                            \
    }

/* a - b on the row blocks, as torch's a - b and then the gather: log pi - log pi_old on the response tokens
 * without the difference of the padding */
#define DIFFERENCE_KERNEL(T, SUF)                                                                    \
    void gather_blocks_difference_##SUF(int64_t rows, int64_t cols, const T *restrict a, const T *restrict b, \
                                        const int64_t *restrict starts, const int64_t *restrict lengths, \
                                        T *restrict out) {                                           \
        for (int64_t r = 0; r < rows; ++r) {                                                         \
            const int64_t at = r * cols + starts[r], length = lengths[r];                            \
            for (int64_t j = 0; j < length; ++j) out[j] = a[at + j] - b[at + j];                     \
            out += length;                                                                           \
        }                                                                                            \
    }

SCATTER_KERNEL(float, f32)
SCATTER_KERNEL(double, f64)
DIFFERENCE_KERNEL(float, f32)
DIFFERENCE_KERNEL(double, f64)
