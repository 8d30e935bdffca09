// Block-sparse flash attention for CPU: forward and backward walking a BlockLayout in place.
//
// Why a native kernel: expressed with PyTorch ops, every query-block row needs its kv blocks
// gathered, one fused call per group of rows, and dK/dV scattered back; at 10 % density that
// overhead is a third of the step. Here each task reads q/k/v where they lie (row stride given,
// so HF's permuted views need no copy), runs of consecutive kv blocks (SPION's band) become one
// GEMM, and nothing is gathered or scattered.
//
// Plain C++ with no PyTorch headers (it builds in seconds): GEMMs go to the BLAS that PyTorch
// itself uses (sgemm_/dgemm_ pointers handed in by the loader), parallelism is OpenMP, which
// resolves to PyTorch's own libgomp (same soname, already loaded), so BLAS calls made inside
// our parallel region run single-threaded exactly as inside ATen's kernels.
//
// Conventions are those of spion::block_sparse_attention (block_sparse_op.py): causal is
// top-left aligned (key j visible to query i iff j <= i); key_padding_mask bytes, 1 = real
// token; rows that see no key output 0 with lse = -inf. Attention dropout keeps probability
// (b, h, i, j) iff a counter hash of (seed, (b*H + h)*Lq + i, j) clears p (see dropout_keep;
// native_cpu.dropout_keep_mask computes the same mask with tensor ops), so the backward redraws
// the forward's mask from the seed alone. Row-major matrices throughout; the
// column-major BLAS computes C^T = B^T A^T.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*,
                          const float*, const float*, const int*, const float*, const int*,
                          const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*,
                          const double*, const double*, const int*, const double*, const int*,
                          const double*, double*, const int*);

sgemm_fn g_sgemm = nullptr;
dgemm_fn g_dgemm = nullptr;

void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
               const float* b, int ldb, float beta, float* c, int ldc) {
  g_sgemm(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
               const double* b, int ldb, double beta, double* c, int ldc) {
  g_dgemm(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// out[nr x nc] = alpha * X[nr x d] Y[nc x d]^T          (S = Q K^T, dP = dO V^T)
template <typename T>
void rows_dot_rows(int nr, int nc, int d, T alpha, const T* x, int ldx, const T* y, int ldy,
                   T* out) {
  blas_gemm('T', 'N', nc, nr, d, alpha, y, ldy, x, ldx, T(0), out, nc);
}

// out[nr x d] += alpha * P[nr x nc] Y[nc x d]           (O += P V, dQ += dS K)
template <typename T>
void accumulate_p_y(int nr, int nc, int d, T alpha, const T* p, const T* y, int ldy, T* out,
                    int ldo) {
  blas_gemm('N', 'N', d, nr, nc, alpha, y, ldy, p, nc, T(1), out, ldo);
}

// out[nc x d] += alpha * P[nr x nc]^T X[nr x d]         (dV += P^T dO, dK += dS^T Q)
template <typename T>
void accumulate_pt_x(int nr, int nc, int d, T alpha, const T* p, const T* x, int ldx, T* out,
                     int ldo) {
  blas_gemm('N', 'T', d, nc, nr, alpha, x, ldx, p, nc, T(1), out, ldo);
}

// exp for the softmax: Cephes' expf polynomial, written so that GCC vectorises the loops that
// call it (libm's expf does not vectorise without -ffast-math, which would break -inf). Exact
// 0 below -87.3 (masked logits are -inf); relative error ~2 ulp elsewhere.
inline float softmax_exp(float x) {
  const float lo = -87.3f, hi = 88.3f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (xc * 1.44269504088896341f + round_magic) - round_magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float y = p * __builtin_bit_cast(float, bits);
  return x < lo ? 0.0f : y;
}

inline double softmax_exp(double x) { return std::exp(x); }

// murmur3's 32-bit finaliser: a cheap bijective mixer that vectorises (32-bit multiplies).
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Per query row (global row id (b*H + h)*Lq + i), hashed once; keys then cost one fmix32 each.
inline uint32_t dropout_row_hash(uint64_t seed, uint64_t row) {
  const uint32_t lo = fmix32(static_cast<uint32_t>(row) ^ static_cast<uint32_t>(seed));
  return fmix32(lo ^ static_cast<uint32_t>(row >> 32) ^ static_cast<uint32_t>(seed >> 32));
}

inline bool dropout_keep(uint32_t row_hash, uint32_t key, uint32_t threshold) {
  return fmix32(row_hash ^ (key * 0x9e3779b9u)) >= threshold;
}

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// A [B, heads, L, D] tensor seen through its strides (the last one is 1).
template <typename T>
struct Rows {
  T* base;
  int64_t sb, sh, sl;
  T* at(int64_t b, int64_t h, int64_t i) const { return base + b * sb + h * sh + i * sl; }
  int ld() const { return static_cast<int>(sl); }
};

struct Problem {
  int64_t batch, heads, kv_heads, lq, lk, dim;
  int64_t layout_batch, layout_heads, nqb, max_kv;
  int64_t block;
  double scale;
  const int32_t* kv_num;  // [B', H', nQB] (B' = 1: shared by the batch)
  const int32_t* kv_idx;  // [B', H', nQB, maxK], ascending
  bool causal;
  const uint8_t* key_mask;  // [B, Lk] or null
  int64_t max_run;          // most keys in one GEMM
  int threads;
  bool dropout;
  uint32_t drop_threshold;  // keep iff hash >= threshold = floor(p * 2^32)
  double keep_scale;        // 1 / (1 - p)
  uint64_t seed;

  int64_t group() const { return heads / kv_heads; }
  // The layout row (batch, head) reads: B' and H' of 1 broadcast.
  int64_t layout_row(int64_t b, int64_t h) const {
    return (layout_batch == 1 ? 0 : b) * layout_heads + (layout_heads == 1 ? 0 : h);
  }
  uint64_t row_id(int64_t b, int64_t h, int64_t i) const {
    return static_cast<uint64_t>((b * heads + h) * lq + i);
  }
  int64_t rows_in(int64_t qb) const { return std::min(block, lq - qb * block); }
};

// Runs of consecutive kv blocks of one query-block row, cut to what a row can see: one GEMM
// each. Under causal masking blocks wholly right of the last query are skipped and a run's
// keys stop at that query.
struct Run {
  int64_t first_key, keys;
};

inline int collect_runs(const Problem& pb, int64_t hl, int64_t qb, std::vector<Run>& runs) {
  const int32_t n = pb.kv_num[hl * pb.nqb + qb];
  const int32_t* idx = pb.kv_idx + (hl * pb.nqb + qb) * pb.max_kv;
  const int64_t last_query = qb * pb.block + pb.rows_in(qb) - 1;
  runs.clear();
  int32_t i = 0;
  while (i < n) {
    int32_t j = i + 1;
    while (j < n && idx[j] == idx[j - 1] + 1 && (j - i + 1) * pb.block <= pb.max_run) ++j;
    int64_t k0 = static_cast<int64_t>(idx[i]) * pb.block;
    int64_t k1 = std::min<int64_t>(static_cast<int64_t>(idx[j - 1] + 1) * pb.block, pb.lk);
    if (pb.causal) k1 = std::min(k1, last_query + 1);
    if (k1 > k0) runs.push_back({k0, k1 - k0});
    i = j;
  }
  return static_cast<int>(runs.size());
}

// Set invisible logits of scores[nr x nc] (query rows from q0, keys from k0) to -inf.
template <typename T>
void mask_scores(const Problem& pb, int64_t b, int64_t q0, int nr, const Run& run, T* s) {
  const int nc = static_cast<int>(run.keys);
  if (pb.key_mask != nullptr) {
    const uint8_t* keep = pb.key_mask + b * pb.lk + run.first_key;
    for (int r = 0; r < nr; ++r) {
      T* row = s + static_cast<int64_t>(r) * nc;
#pragma omp simd
      for (int c = 0; c < nc; ++c) row[c] = keep[c] ? row[c] : neg_inf<T>();
    }
  }
  if (pb.causal && run.first_key + run.keys - 1 > q0) {
    for (int r = 0; r < nr; ++r) {
      const int64_t visible = q0 + r - run.first_key + 1;  // keys [0, visible) are seen
      T* row = s + static_cast<int64_t>(r) * nc;
      for (int64_t c = std::max<int64_t>(visible, 0); c < nc; ++c) row[c] = neg_inf<T>();
    }
  }
}

template <typename T>
struct Scratch {
  std::vector<T> a, b, m, l;
  std::vector<Run> runs;
  void reserve(const Problem& pb) {
    const size_t tile = static_cast<size_t>(pb.block) * static_cast<size_t>(pb.max_run);
    if (a.size() < tile) a.resize(tile), b.resize(tile);
    if (m.size() < static_cast<size_t>(pb.block)) m.resize(pb.block), l.resize(pb.block);
  }
};

template <typename T>
Scratch<T>& thread_scratch(const Problem& pb) {
  static thread_local Scratch<T> scratch;
  scratch.reserve(pb);
  return scratch;
}


// ---------------------------------------------------------------------------------- forward

// One query-block row of one head: online softmax over its runs, output written in place.
template <typename T>
void forward_row_block(const Problem& pb, const Rows<const T>& q, const Rows<const T>& k,
                       const Rows<const T>& v, const Rows<T>& out, float* lse, int64_t b,
                       int64_t h, int64_t qb) {
  Scratch<T>& ws = thread_scratch<T>(pb);
  const int64_t q0 = qb * pb.block, hk = h / pb.group();
  const int nr = static_cast<int>(pb.rows_in(qb)), d = static_cast<int>(pb.dim);
  T* m = ws.m.data();
  T* l = ws.l.data();
  T* o = out.at(b, h, q0);
  for (int r = 0; r < nr; ++r) {
    m[r] = neg_inf<T>();
    l[r] = T(0);
    std::memset(o + r * out.sl, 0, sizeof(T) * d);
  }
  const int n_runs = collect_runs(pb, pb.layout_row(b, h), qb, ws.runs);
  for (int ri = 0; ri < n_runs; ++ri) {
    const Run& run = ws.runs[ri];
    const int nc = static_cast<int>(run.keys);
    T* s = ws.a.data();
    rows_dot_rows<T>(nr, nc, d, static_cast<T>(pb.scale), q.at(b, h, q0), q.ld(),
                     k.at(b, hk, run.first_key), k.ld(), s);
    mask_scores<T>(pb, b, q0, nr, run, s);
    for (int r = 0; r < nr; ++r) {
      T* row = s + static_cast<int64_t>(r) * nc;
      T top = neg_inf<T>();
#pragma omp simd reduction(max : top)
      for (int c = 0; c < nc; ++c) top = row[c] > top ? row[c] : top;
      const T m_new = std::max(m[r], top);
      if (m_new == neg_inf<T>()) {  // nothing visible to this row yet
        std::memset(row, 0, sizeof(T) * nc);
        continue;
      }
      const T alpha = softmax_exp(m[r] - m_new);
      T sum = T(0);
      if (pb.dropout) {  // the normaliser counts every probability, the output only kept ones
        const uint32_t rh = dropout_row_hash(pb.seed, pb.row_id(b, h, q0 + r));
        const uint32_t key0 = static_cast<uint32_t>(run.first_key);
        const T kept = static_cast<T>(pb.keep_scale);
#pragma omp simd reduction(+ : sum)
        for (int c = 0; c < nc; ++c) {
          const T p = softmax_exp(row[c] - m_new);
          sum += p;
          row[c] = dropout_keep(rh, key0 + c, pb.drop_threshold) ? p * kept : T(0);
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int c = 0; c < nc; ++c) {
          const T p = softmax_exp(row[c] - m_new);
          row[c] = p;
          sum += p;
        }
      }
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
      if (alpha != T(1)) {
        T* orow = o + r * out.sl;
#pragma omp simd
        for (int c = 0; c < d; ++c) orow[c] *= alpha;
      }
    }
    accumulate_p_y<T>(nr, nc, d, T(1), s, v.at(b, hk, run.first_key), v.ld(), o, out.ld());
  }
  float* lse_rows = lse + (b * pb.heads + h) * pb.lq + q0;
  for (int r = 0; r < nr; ++r) {
    if (l[r] > T(0)) {
      const T inv = T(1) / l[r];
      T* orow = o + r * out.sl;
#pragma omp simd
      for (int c = 0; c < d; ++c) orow[c] *= inv;
      lse_rows[r] = static_cast<float>(m[r] + std::log(l[r]));
    } else {
      lse_rows[r] = neg_inf<float>();
    }
  }
}

template <typename T>
void forward(const Problem& pb, const Rows<const T>& q, const Rows<const T>& k,
             const Rows<const T>& v, const Rows<T>& out, float* lse) {
  const int64_t tasks = pb.batch * pb.heads * pb.nqb;
#pragma omp parallel for schedule(dynamic, 1) num_threads(pb.threads)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t qb = t % pb.nqb, bh = t / pb.nqb;
    forward_row_block<T>(pb, q, k, v, out, lse, bh / pb.heads, bh % pb.heads, qb);
  }
}

// --------------------------------------------------------------------------------- backward

// Gradients from one query-block row of one head: dQ rows written, dK/dV of its kv head
// accumulated (the caller owns that kv head, so there is no race). P is recomputed from the
// saved lse; with dropout mask Z (kept / (1 - p), else 0): dV += (P Z)^T dO and
// dS = P * ((dO V^T) Z - rowsum(dO * O)).
template <typename T>
void backward_row_block(const Problem& pb, const Rows<const T>& dout, const Rows<const T>& q,
                        const Rows<const T>& k, const Rows<const T>& v,
                        const Rows<const T>& out, const float* lse, const Rows<T>& dq,
                        const Rows<T>& dk, const Rows<T>& dv, int64_t b, int64_t h,
                        int64_t qb) {
  Scratch<T>& ws = thread_scratch<T>(pb);
  const int64_t q0 = qb * pb.block, hk = h / pb.group();
  const int nr = static_cast<int>(pb.rows_in(qb)), d = static_cast<int>(pb.dim);
  const T scale = static_cast<T>(pb.scale);
  T* delta = ws.m.data();
  T* row_lse = ws.l.data();
  const float* lse_rows = lse + (b * pb.heads + h) * pb.lq + q0;
  T* dq_rows = dq.at(b, h, q0);
  const T* do_rows = dout.at(b, h, q0);
  const T* q_rows = q.at(b, h, q0);
  for (int r = 0; r < nr; ++r) {
    const T* dor = do_rows + r * dout.sl;
    const T* orow = out.at(b, h, q0 + r);
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int c = 0; c < d; ++c) acc += dor[c] * orow[c];
    delta[r] = acc;
    // a row that saw nothing has lse = -inf; +inf makes its probabilities exp(s - inf) = 0
    row_lse[r] = std::isinf(lse_rows[r]) ? std::numeric_limits<T>::infinity()
                                         : static_cast<T>(lse_rows[r]);
    std::memset(dq_rows + r * dq.sl, 0, sizeof(T) * d);
  }
  const int n_runs = collect_runs(pb, pb.layout_row(b, h), qb, ws.runs);
  for (int ri = 0; ri < n_runs; ++ri) {
    const Run& run = ws.runs[ri];
    const int nc = static_cast<int>(run.keys);
    const T* k_run = k.at(b, hk, run.first_key);
    const T* v_run = v.at(b, hk, run.first_key);
    T* p = ws.a.data();
    T* ds = ws.b.data();
    rows_dot_rows<T>(nr, nc, d, scale, q_rows, q.ld(), k_run, k.ld(), p);
    mask_scores<T>(pb, b, q0, nr, run, p);
    for (int r = 0; r < nr; ++r) {
      T* row = p + static_cast<int64_t>(r) * nc;
      const T shift = row_lse[r];
#pragma omp simd
      for (int c = 0; c < nc; ++c) row[c] = softmax_exp(row[c] - shift);
    }
    rows_dot_rows<T>(nr, nc, d, T(1), do_rows, dout.ld(), v_run, v.ld(), ds);  // dP
    for (int r = 0; r < nr; ++r) {
      T* prow = p + static_cast<int64_t>(r) * nc;
      T* row = ds + static_cast<int64_t>(r) * nc;
      const T dr = delta[r];
      if (pb.dropout) {  // p becomes the dropped probabilities dV needs
        const uint32_t rh = dropout_row_hash(pb.seed, pb.row_id(b, h, q0 + r));
        const uint32_t key0 = static_cast<uint32_t>(run.first_key);
        const T kept = static_cast<T>(pb.keep_scale);
#pragma omp simd
        for (int c = 0; c < nc; ++c) {
          const T z = dropout_keep(rh, key0 + c, pb.drop_threshold) ? kept : T(0);
          row[c] = prow[c] * (row[c] * z - dr);
          prow[c] *= z;
        }
      } else {
#pragma omp simd
        for (int c = 0; c < nc; ++c) row[c] = prow[c] * (row[c] - dr);
      }
    }
    accumulate_pt_x<T>(nr, nc, d, T(1), p, do_rows, dout.ld(), dv.at(b, hk, run.first_key),
                       dv.ld());
    accumulate_pt_x<T>(nr, nc, d, scale, ds, q_rows, q.ld(), dk.at(b, hk, run.first_key),
                       dk.ld());
    accumulate_p_y<T>(nr, nc, d, scale, ds, k_run, k.ld(), dq_rows, dq.ld());
  }
}

// Work unit = (batch, kv head, chunk of query blocks). With enough kv heads for the threads
// there is one chunk and dK/dV are written in place; otherwise chunk c accumulates into its own
// slice of dk/dv ([chunks, B, Hkv, Lk, D]) and the caller sums the slices.
template <typename T>
void backward(const Problem& pb, const Rows<const T>& dout, const Rows<const T>& q,
              const Rows<const T>& k, const Rows<const T>& v, const Rows<const T>& out,
              const float* lse, const Rows<T>& dq, T* dk, T* dv, int64_t chunks) {
  const int64_t units = pb.batch * pb.kv_heads * chunks;
  const int64_t slice = pb.batch * pb.kv_heads * pb.lk * pb.dim;
  const int64_t g = pb.group();
#pragma omp parallel for schedule(dynamic, 1) num_threads(pb.threads)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t c = u % chunks, bh = u / chunks;
    const int64_t b = bh / pb.kv_heads, hk = bh % pb.kv_heads;
    const Rows<T> dk_c{dk + c * slice, pb.kv_heads * pb.lk * pb.dim, pb.lk * pb.dim, pb.dim};
    const Rows<T> dv_c{dv + c * slice, pb.kv_heads * pb.lk * pb.dim, pb.lk * pb.dim, pb.dim};
    const int64_t qb_end = (c + 1) * pb.nqb / chunks;
    for (int64_t qb = c * pb.nqb / chunks; qb < qb_end; ++qb)
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h)
        backward_row_block<T>(pb, dout, q, k, v, out, lse, dq, dk_c, dv_c, b, h, qb);
  }
}

template <typename T>
Rows<T> rows_of(void* base, const int64_t* strides) {
  return Rows<T>{static_cast<T*>(base), strides[0], strides[1], strides[2]};
}

template <typename T>
Rows<const T> const_rows_of(const void* base, const int64_t* strides) {
  return Rows<const T>{static_cast<const T*>(base), strides[0], strides[1], strides[2]};
}

}  // namespace

// ------------------------------------------------------------------------------ C interface
//
// shape: B, H, Hkv, Lq, Lk, D;  layout: B', H', nQB, maxK, block;  dtype 0 = float32,
// 1 = float64. Every [B, heads, L, D] operand comes with its (batch, head, row) strides.

extern "C" {

int spion_bsa_abi_version() { return 4; }

void spion_bsa_set_blas(void* sgemm, void* dgemm) {
  g_sgemm = reinterpret_cast<sgemm_fn>(sgemm);
  g_dgemm = reinterpret_cast<dgemm_fn>(dgemm);
}

static Problem make_problem(const int64_t* shape, const int64_t* layout, const int32_t* kv_num,
                            const int32_t* kv_idx, double scale, int causal,
                            const uint8_t* key_mask, double dropout_p, uint64_t seed,
                            int64_t max_run, int threads) {
  Problem pb{};
  pb.batch = shape[0], pb.heads = shape[1], pb.kv_heads = shape[2];
  pb.lq = shape[3], pb.lk = shape[4], pb.dim = shape[5];
  pb.layout_batch = layout[0], pb.layout_heads = layout[1], pb.nqb = layout[2];
  pb.max_kv = layout[3], pb.block = layout[4];
  pb.scale = scale;
  pb.kv_num = kv_num, pb.kv_idx = kv_idx;
  pb.causal = causal != 0;
  pb.key_mask = key_mask;
  pb.max_run = max_run < pb.block ? pb.block : max_run;
  pb.threads = threads < 1 ? 1 : threads;
  pb.dropout = dropout_p > 0.0;
  pb.drop_threshold =
      static_cast<uint32_t>(std::min(std::floor(dropout_p * 4294967296.0), 4294967295.0));
  pb.keep_scale = pb.dropout ? 1.0 / (1.0 - dropout_p) : 1.0;
  pb.seed = seed;
  return pb;
}

int spion_bsa_forward(int dtype, const int64_t* shape, const int64_t* layout,
                      const int32_t* kv_num, const int32_t* kv_idx, double scale, int causal,
                      const uint8_t* key_mask, double dropout_p, uint64_t seed,
                      int64_t max_run, int threads, const void* q,
                      const int64_t* q_strides, const void* k, const int64_t* k_strides,
                      const void* v, const int64_t* v_strides, void* out,
                      const int64_t* out_strides, float* lse) {
  const Problem pb = make_problem(shape, layout, kv_num, kv_idx, scale, causal, key_mask,
                                  dropout_p, seed, max_run, threads);
  if (dtype == 0 && g_sgemm != nullptr) {
    forward<float>(pb, const_rows_of<float>(q, q_strides), const_rows_of<float>(k, k_strides),
                   const_rows_of<float>(v, v_strides), rows_of<float>(out, out_strides), lse);
    return 0;
  }
  if (dtype == 1 && g_dgemm != nullptr) {
    forward<double>(pb, const_rows_of<double>(q, q_strides),
                    const_rows_of<double>(k, k_strides), const_rows_of<double>(v, v_strides),
                    rows_of<double>(out, out_strides), lse);
    return 0;
  }
  return 1;
}

int spion_bsa_backward(int dtype, const int64_t* shape, const int64_t* layout,
                       const int32_t* kv_num, const int32_t* kv_idx, double scale, int causal,
                       const uint8_t* key_mask, double dropout_p, uint64_t seed,
                       int64_t max_run, int threads, const void* dout, const int64_t* dout_strides, const void* q,
                       const int64_t* q_strides, const void* k, const int64_t* k_strides,
                       const void* v, const int64_t* v_strides, const void* out,
                       const int64_t* out_strides, const float* lse, void* dq,
                       const int64_t* dq_strides, void* dk, void* dv, int64_t chunks) {
  const Problem pb = make_problem(shape, layout, kv_num, kv_idx, scale, causal, key_mask,
                                  dropout_p, seed, max_run, threads);
  if (dtype == 0 && g_sgemm != nullptr) {
    backward<float>(pb, const_rows_of<float>(dout, dout_strides),
                    const_rows_of<float>(q, q_strides), const_rows_of<float>(k, k_strides),
                    const_rows_of<float>(v, v_strides), const_rows_of<float>(out, out_strides),
                    lse, rows_of<float>(dq, dq_strides), static_cast<float*>(dk),
                    static_cast<float*>(dv), chunks);
    return 0;
  }
  if (dtype == 1 && g_dgemm != nullptr) {
    backward<double>(pb, const_rows_of<double>(dout, dout_strides),
                     const_rows_of<double>(q, q_strides), const_rows_of<double>(k, k_strides),
                     const_rows_of<double>(v, v_strides),
                     const_rows_of<double>(out, out_strides), lse,
                     rows_of<double>(dq, dq_strides), static_cast<double*>(dk),
                     static_cast<double*>(dv), chunks);
    return 0;
  }
  return 1;
}

}  // extern "C"
