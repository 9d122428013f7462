/* Fused fold steps of the merge engine (merging/fused.py compiles and loads this file).
 *
 * Each function takes one chunk of one fine-tuned checkpoint as stored (theta, bf16 or fp32), the
 * base's chunk in fp32 and the fold's fp32 state, and does in one pass what the torch path does in
 * three to six: tau = fp32(theta) - base, then the rule's step. Every operation is the torch path's,
 * in the same order and rounding (compiled with -ffp-contract=off: no fused multiply-add), so the
 * results are the same bits; tests/merging/test_merging_fused.py holds them to it. */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16; /* bf16 is the top half of a float32 */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* torch's lerp for a weight of exactly 0 or 1 (MagMax's take-the-later-or-keep) */
static inline float magmax_pick(float best, float tau) {
    float w = fabsf(tau) >= fabsf(best) ? 1.0f : 0.0f;
    float d = tau - best;
    return w < 0.5f ? best + w * d : tau - d * (1.0f - w);
}

#define STEPS(SUFFIX, TYPE, WIDEN)                                                              \
    void first_##SUFFIX(float *state, const TYPE *theta, const float *base, long n) {          \
        for (long i = 0; i < n; i++) state[i] = WIDEN(theta[i]) - base[i];                     \
    }                                                                                          \
    void sum_##SUFFIX(float *state, const TYPE *theta, const float *base, long n) {            \
        for (long i = 0; i < n; i++) state[i] = state[i] + (WIDEN(theta[i]) - base[i]);        \
    }                                                                                          \
    void magmax_##SUFFIX(float *state, const TYPE *theta, const float *base, long n) {         \
        for (long i = 0; i < n; i++) state[i] = magmax_pick(state[i], WIDEN(theta[i]) - base[i]); \
    }

#define AS_IS(x) (x)
STEPS(bf16, uint16_t, from_bf16)
STEPS(f32, float, AS_IS)
