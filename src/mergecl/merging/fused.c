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

/* --- random mix: torch's seeded draws and the pick, in one pass per checkpoint ----------------- */

/* MT19937 as torch's CPU generator runs it: seeded by manual_seed (the reference initialisation of
 * a 32-bit seed), 32-bit outputs; torch.randint(high) takes output % high, one output per entry. */
#define MT_N 624
#define MT_M 397

static inline uint32_t mt_mix(uint32_t upper, uint32_t lower, uint32_t far) {
    uint32_t y = (upper & 0x80000000u) | (lower & 0x7fffffffu);
    return far ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
}

/* the next 624 outputs of the state (the reference twist, without a modulo per element) */
static void mt_block(uint32_t *state, uint32_t *out) {
    int i = 0;
    for (; i < MT_N - MT_M; i++) state[i] = mt_mix(state[i], state[i + 1], state[i + MT_M]);
    for (; i < MT_N - 1; i++) state[i] = mt_mix(state[i], state[i + 1], state[i + MT_M - MT_N]);
    state[MT_N - 1] = mt_mix(state[MT_N - 1], state[0], state[MT_M - 1]);
    for (i = 0; i < MT_N; i++) {
        uint32_t y = state[i];
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        out[i] = y ^ (y >> 18);
    }
}

/* pick[i] = torch.randint(high, (n,), generator=torch.Generator().manual_seed(seed))[i] for
 * 1 <= high <= 256: torch's CPU generator is MT19937 seeded by the reference initialisation of a
 * 32-bit seed, and randint takes one 32-bit output per entry, modulo high */
void randint_u8(uint8_t *pick, long n, uint32_t seed, uint32_t high) {
    uint32_t state[MT_N], out[MT_N];
    uint64_t inverse = UINT64_C(0xFFFFFFFFFFFFFFFF) / high + 1;
    state[0] = seed;
    for (int i = 1; i < MT_N; i++) state[i] = 1812433253u * (state[i - 1] ^ (state[i - 1] >> 30)) + (uint32_t)i;
    for (long done = 0; done < n; done += MT_N) {
        mt_block(state, out);
        long count = n - done < MT_N ? n - done : MT_N;
        if ((high & (high - 1)) == 0)
            for (long i = 0; i < count; i++) pick[done + i] = (uint8_t)(out[i] & (high - 1));
        else  /* out % high by a multiplication (Lemire's direct remainder, exact for 32-bit values) */
            for (long i = 0; i < count; i++)
                pick[done + i] = (uint8_t)(((__uint128_t)(inverse * out[i]) * high) >> 64);
    }
}

/* where pick == task: state = theta - base; returns whether any of theta's n entries, picked or
 * not, is not finite (written without branches, so that the loop is vectorised) */
#define PICK(SUFFIX, TYPE, WIDEN)                                                                    \
    long pick_##SUFFIX(float *state, const TYPE *theta, const float *base, const uint8_t *pick,      \
                       long n, long task) {                                                          \
        const uint8_t mine = (uint8_t)task;                                                          \
        int bad = 0;                                                                                 \
        for (long i = 0; i < n; i++) {                                                               \
            float x = WIDEN(theta[i]);                                                               \
            float here = x - base[i];                                                                \
            bad |= (x != x) | (fabsf(x) == INFINITY);                                                \
            state[i] = pick[i] == mine ? here : state[i];                                            \
        }                                                                                            \
        return bad;                                                                                  \
    }
PICK(bf16, uint16_t, from_bf16)
PICK(f32, float, AS_IS)
