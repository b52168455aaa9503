/* Fused CPU pack/unpack of saved activations: one pass over each row instead of four or five.
 *
 * Each function computes exactly what the built-in compressors' torch code computes, in the same
 * float32 operations (no fused multiply-add: built with -ffp-contract=off), so codes, scales and
 * unpacked values are bit-identical (tests/test_native_kernels.py). A row is one quantization
 * group: it is read from memory once for its range and again from cache for its codes. Rows may
 * be strided (a view whose last dimension is contiguous). Inputs are float32 or bfloat16 (bits
 * read directly; the torch code widens them to float32 first, which is exact). Packers return 0
 * on success; 1 when a row holds a value the fused path does not reproduce bit for bit (NaN, or
 * an infinity where the torch code would make NaN scales): the caller then runs the torch code
 * for the whole tensor.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float32 -> bfloat16, round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's rule) */
static inline uint16_t float_to_bf16(float f) {
    if (f != f) return 0x7FC0;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* How the rows lie: the leading dimensions of a tensor whose last dimension is contiguous (NULL or
 * nlead 0: a contiguous matrix), so strided views (attention's transposed operands) are read in
 * place instead of copied first. */
typedef struct {
    int64_t sizes[8];       /* leading dimensions, in the order they are walked (memory order) */
    int64_t strides[8];     /* their strides in the input, in elements */
    int64_t out_strides[8]; /* their strides in the output's rows (logical order) */
    int32_t nlead;
} Layout;

/* Walks the rows in memory order: the input offset (elements) and the output row of each, index
 * arithmetic once, then a carry per row. Rows are written in logical order wherever they are read. */
typedef struct {
    const Layout* layout;
    int64_t index[8];
    int64_t offset;
    int64_t out_row;
    int64_t width;
} RowWalk;

static inline void walk_start(RowWalk* walk, const Layout* layout, int64_t row, int64_t width) {
    walk->layout = (layout != NULL && layout->nlead > 0) ? layout : NULL;
    walk->width = width;
    if (walk->layout == NULL) { walk->offset = row * width; walk->out_row = row; return; }
    walk->offset = 0;
    walk->out_row = 0;
    for (int d = layout->nlead - 1; d >= 0; --d) {
        walk->index[d] = row % layout->sizes[d];
        walk->offset += walk->index[d] * layout->strides[d];
        walk->out_row += walk->index[d] * layout->out_strides[d];
        row /= layout->sizes[d];
    }
}

static inline void walk_next(RowWalk* walk) {
    const Layout* layout = walk->layout;
    if (layout == NULL) { walk->offset += walk->width; walk->out_row += 1; return; }
    for (int d = layout->nlead - 1; d >= 0; --d) {
        walk->offset += layout->strides[d];
        walk->out_row += layout->out_strides[d];
        if (++walk->index[d] < layout->sizes[d]) return;
        walk->offset -= walk->index[d] * layout->strides[d];
        walk->out_row -= walk->index[d] * layout->out_strides[d];
        walk->index[d] = 0;
    }
}

/* The row as float32: the input itself, or its bfloat16 widened into buf. */
static inline const float* load_row(const void* x, int bf16, int64_t offset, int64_t width, float* buf) {
    if (!bf16) return (const float*)x + offset;
    const uint16_t* src = (const uint16_t*)x + offset;
    for (int64_t i = 0; i < width; ++i) buf[i] = bf16_to_float(src[i]);
    return buf;
}

/* Smallest and largest value of a row, and whether it holds a NaN (NaN is never > or <, so the
 * min/max skip it; the flag catches it). Written with GCC/Clang vector types: the compilers do not
 * vectorize a NaN-exact min/max reduction on their own. */
typedef float vfloat __attribute__((vector_size(32)));
typedef int32_t vint __attribute__((vector_size(32)));
#define VL ((int64_t)(sizeof(vfloat) / sizeof(float)))

static inline int row_range(const float* row, int64_t width, float* low, float* high) {
    vfloat vmx, vmn;
    vint vnan = {0};
    for (int j = 0; j < VL; ++j) { vmx[j] = -INFINITY; vmn[j] = INFINITY; }
    int64_t i = 0;
    for (; i + VL <= width; i += VL) {
        vfloat v;
        memcpy(&v, row + i, sizeof v);
        vint gt = v > vmx, lt = v < vmn;
        vmx = (vfloat)(((vint)v & gt) | ((vint)vmx & ~gt));
        vmn = (vfloat)(((vint)v & lt) | ((vint)vmn & ~lt));
        vnan |= v != v;
    }
    float a = -INFINITY, b = INFINITY;
    int bad = 0;
    for (int j = 0; j < VL; ++j) {
        a = vmx[j] > a ? vmx[j] : a;
        b = vmn[j] < b ? vmn[j] : b;
        bad |= vnan[j] != 0;
    }
    for (; i < width; ++i) {
        float v = row[i];
        a = v > a ? v : a;
        b = v < b ? v : b;
        bad |= v != v;
    }
    *low = b;
    *high = a;
    return bad;
}

/* absmax_scale: max(amax, -amin) / qmax, and 1 where that is not > 0. Returns 1 on a value the
 * torch code turns into a NaN scale or NaN codes (NaN, +-inf).
 *
 * max(amax, -amin) of finite values is the largest |x|, and |x| as bits (sign cleared) orders like
 * |x| as an unsigned integer: one integer max over the row, which compilers vectorize with
 * independent lanes (a float min/max with NaN tracking chains each step on the last, about three
 * times slower). The same float comes out; only the sign of a zero bound could differ, and a zero
 * bound never becomes the scale (a zero maximum gives scale 1). NaN bits are above +inf's. */
static inline int absmax(const float* row, int64_t width, float qmax, float* scale) {
    if (width <= 0) return 1;
    const uint32_t* bits = (const uint32_t*)row;
    uint32_t top = 0;
    for (int64_t i = 0; i < width; ++i) {
        uint32_t u = bits[i] & 0x7FFFFFFFu;
        top = u > top ? u : top;
    }
    if (top >= 0x7F800000u) return 1; /* inf (== 0x7F800000) or NaN (above) */
    float high;
    memcpy(&high, &top, sizeof high);
    float s = high / qmax;
    *scale = s > 0 ? s : 1.0f;
    return 0;
}

/* Int8Scaled.pack: scale per row, codes = round(x * (1 / scale)) */
int sf_int8_pack(const void* x, int bf16, int64_t rows, int64_t width, int8_t* codes, float* scale, int64_t first_row, const Layout* layout) {
    float* buf = bf16 ? (float*)malloc(sizeof(float) * width) : NULL;
    int status = 0;
    RowWalk walk;
    walk_start(&walk, layout, first_row, width);
    for (int64_t r = 0; r < rows && !status; ++r, walk_next(&walk)) {
        const float* row = load_row(x, bf16, walk.offset, width, buf);
        float s;
        if ((status = absmax(row, width, 127.0f, &s))) break;
        scale[walk.out_row] = s;
        float inv = 1.0f / s;
        int8_t* out = codes + walk.out_row * width;
        for (int64_t i = 0; i < width; ++i) out[i] = (int8_t)(int32_t)rintf(row[i] * inv);
    }
    free(buf);
    return status;
}

/* Int8Scaled.unpack: code * scale, as float32 or bfloat16 */
int sf_int8_unpack(const int8_t* codes, const float* scale, int64_t rows, int64_t width, void* out, int bf16) {
    for (int64_t r = 0; r < rows; ++r) {
        const int8_t* row = codes + r * width;
        float s = scale[r];
        if (bf16) {
            uint16_t* o = (uint16_t*)out + r * width;
            for (int64_t i = 0; i < width; ++i) o[i] = float_to_bf16((float)row[i] * s);
        } else {
            float* o = (float*)out + r * width;
            for (int64_t i = 0; i < width; ++i) o[i] = (float)row[i] * s;
        }
    }
    return 0;
}

/* Int4Scaled.pack: scale per row, codes = clamp(round(x / scale), -7, 7) + 8, two per byte (the
 * even element in the low nibble). Rows of even width only (each row fills whole bytes). */
int sf_int4_pack(const void* x, int bf16, int64_t rows, int64_t width, uint8_t* nibbles, float* scale, int64_t first_row, const Layout* layout) {
    if (width % 2) return 1;
    float* buf = bf16 ? (float*)malloc(sizeof(float) * width) : NULL;
    uint8_t* codes = (uint8_t*)malloc(width);
    int status = 0;
    RowWalk walk;
    walk_start(&walk, layout, first_row, width);
    for (int64_t r = 0; r < rows; ++r, walk_next(&walk)) {
        const float* row = load_row(x, bf16, walk.offset, width, buf);
        float s;
        if ((status = absmax(row, width, 7.0f, &s))) break;
        scale[walk.out_row] = s;
        for (int64_t i = 0; i < width; ++i) {
            /* clamped as an integer (a vector integer min/max; a float clamp compiles to mask
             * juggling that must keep NaN's semantics): q is a whole number of at most about 11 in
             * magnitude (|x| <= 7 s, up to denormal rounding of s; NaN and inf are ruled out) */
            int32_t q = (int32_t)rintf(row[i] / s);
            q = q < -7 ? -7 : (q > 7 ? 7 : q);
            codes[i] = (uint8_t)(q + 8);
        }
        uint8_t* out = nibbles + walk.out_row * (width / 2);
        for (int64_t j = 0; j < width / 2; ++j) out[j] = (uint8_t)((codes[2 * j + 1] << 4) | codes[2 * j]);
    }
    free(codes);
    free(buf);
    return status;
}

/* Int4Scaled.unpack: (nibble - 8) * scale */
int sf_int4_unpack(const uint8_t* nibbles, const float* scale, int64_t rows, int64_t width, void* out, int bf16) {
    if (width % 2) return 1;
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* row = nibbles + r * (width / 2);
        float s = scale[r];
        if (bf16) {
            uint16_t* o = (uint16_t*)out + r * width;
            for (int64_t j = 0; j < width / 2; ++j) {
                o[2 * j] = float_to_bf16((float)((int32_t)(row[j] & 15) - 8) * s);
                o[2 * j + 1] = float_to_bf16((float)((int32_t)(row[j] >> 4) - 8) * s);
            }
        } else {
            float* o = (float*)out + r * width;
            for (int64_t j = 0; j < width / 2; ++j) {
                o[2 * j] = (float)((int32_t)(row[j] & 15) - 8) * s;
                o[2 * j + 1] = (float)((int32_t)(row[j] >> 4) - 8) * s;
            }
        }
    }
    return 0;
}

/* Int8Scaled(log_domain=True).pack: per row low = max(min, max - 200), step = max((max - low) / 255,
 * FLT_MIN), codes = clamp(round(max(x - low, 0) / step), 0, 255); step_low holds [step, low]. */
int sf_log_pack(const void* x, int bf16, int64_t rows, int64_t width, uint8_t* codes, float* step_low, int64_t first_row, const Layout* layout) {
    float* buf = bf16 ? (float*)malloc(sizeof(float) * width) : NULL;
    int status = 0;
    RowWalk walk;
    walk_start(&walk, layout, first_row, width);
    for (int64_t r = 0; r < rows; ++r, walk_next(&walk)) {
        const float* row = load_row(x, bf16, walk.offset, width, buf);
        float low, high;
        if (row_range(row, width, &low, &high) || isinf(high)) { status = 1; break; }
        float floor_ = high - 200.0f;
        low = low > floor_ ? low : floor_;
        float step = (high - low) / 255.0f;
        step = step > 1.17549435e-38f ? step : 1.17549435e-38f;
        step_low[2 * walk.out_row] = step;
        step_low[2 * walk.out_row + 1] = low;
        uint8_t* out = codes + walk.out_row * width;
        for (int64_t i = 0; i < width; ++i) {
            float d = row[i] - low;
            d = d < 0.0f ? 0.0f : d;
            float q = rintf(d / step);
            q = q > 255.0f ? 255.0f : q;
            out[i] = (uint8_t)(int32_t)q;
        }
    }
    free(buf);
    return status;
}

/* Int8Scaled(log_domain=True).unpack: code * step + low (two roundings, as torch's mul_ then add_) */
int sf_log_unpack(const uint8_t* codes, const float* step_low, int64_t rows, int64_t width, void* out, int bf16) {
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* row = codes + r * width;
        float step = step_low[2 * r], low = step_low[2 * r + 1];
        if (bf16) {
            uint16_t* o = (uint16_t*)out + r * width;
            for (int64_t i = 0; i < width; ++i) o[i] = float_to_bf16((float)row[i] * step + low);
        } else {
            float* o = (float*)out + r * width;
            for (int64_t i = 0; i < width; ++i) o[i] = (float)row[i] * step + low;
        }
    }
    return 0;
}
