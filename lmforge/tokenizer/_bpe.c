/* Compiled core of lmforge's byte-level BPE: pre-tokenizers, merge engine, batch threads, trainer.
 *
 * The readable reference is the pure-Python code in bpe.py / pretokenize.py / train.py; tests assert
 * this file gives identical results. Scanners implement these regexes exactly (see pretokenize.py):
 *   kind 1: GPT-2   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *   kind 2: GPT-4   (?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 *   kind 3: cl100k  kind 2 plus \s++$ (whitespace that runs to the end of the text is one piece)
 *   kind 4: o200k   case-aware letter runs, see scan_o200k
 * Text is scanned as UTF-8 bytes; an invalid byte is one character with no class (like punctuation),
 * which is what Python's surrogateescape gives the reference path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_unicode_classes.h"

enum { F_L = 1, F_N = 2, F_WS = 4, F_U = 8, F_LW = 16 };
static uint8_t *UCLASS; /* one byte of class bits per code point, built from UC_RANGES at import */

/* ------------------------------------------------------------------ UTF-8 + classes */

typedef struct {
    uint32_t cp; /* code point, or 0x110000 for an invalid byte */
    uint8_t f;   /* class bits */
    uint8_t len; /* bytes */
} Ch;

static inline Ch ch_at(const uint8_t *s, size_t n, size_t i) {
    Ch r;
    uint8_t c = s[i];
    if (c < 0x80) {
        r.cp = c; r.len = 1; r.f = UCLASS[c];
        return r;
    }
    r.cp = 0x110000; r.len = 1; r.f = 0;
    if (c >= 0xC2 && c <= 0xDF) {
        if (i + 1 < n && (s[i + 1] & 0xC0) == 0x80) {
            r.cp = ((uint32_t)(c & 0x1F) << 6) | (s[i + 1] & 0x3F); r.len = 2;
        }
    } else if (c >= 0xE0 && c <= 0xEF) {
        uint8_t lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
        if (i + 2 < n && s[i + 1] >= lo && s[i + 1] <= hi && (s[i + 2] & 0xC0) == 0x80) {
            r.cp = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
            r.len = 3;
        }
    } else if (c >= 0xF0 && c <= 0xF4) {
        uint8_t lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
        if (i + 3 < n && s[i + 1] >= lo && s[i + 1] <= hi && (s[i + 2] & 0xC0) == 0x80 &&
            (s[i + 3] & 0xC0) == 0x80) {
            r.cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[i + 1] & 0x3F) << 12) |
                   ((uint32_t)(s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
            r.len = 4;
        }
    }
    if (r.cp < 0x110000) r.f = UCLASS[r.cp];
    return r;
}

#define IS_OTHER(f) (((f) & (F_L | F_N | F_WS)) == 0)

/* End of the maximal run starting at i of characters whose bits intersect `mask` (or, with mask 0, of
 * "other" characters: none of L, N, whitespace). */
static size_t run_end(const uint8_t *s, size_t n, size_t i, int mask) {
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) { /* ASCII fast path */
            uint8_t f = UCLASS[c];
            if (mask ? !(f & mask) : !IS_OTHER(f)) break;
            i++;
            continue;
        }
        Ch ch = ch_at(s, n, i);
        if (mask ? !(ch.f & mask) : !IS_OTHER(ch.f)) break;
        i += ch.len;
    }
    return i;
}

static inline int lower_ascii(uint32_t cp) { return (cp >= 'A' && cp <= 'Z') ? (int)(cp + 32) : (int)cp; }

/* Length of a contraction ('s 't 're 've 'm 'll 'd) at i, or 0. Case-insensitive matching follows
 * Unicode simple case folding, under which U+017F (long s) also matches 's'. */
static size_t contraction(const uint8_t *s, size_t n, size_t i, int icase) {
    if (i >= n || s[i] != '\'' || i + 1 >= n) return 0;
    Ch a = ch_at(s, n, i + 1);
    int la = icase ? lower_ascii(a.cp) : (int)a.cp;
    if (icase && a.cp == 0x17F) la = 's';
    if (la == 's' || la == 't' || la == 'm' || la == 'd') return 1 + a.len;
    if (i + 2 >= n) return 0;
    int lb = icase ? lower_ascii(s[i + 2]) : s[i + 2];
    if ((la == 'r' && lb == 'e') || (la == 'v' && lb == 'e') || (la == 'l' && lb == 'l')) return 3;
    return 0;
}

/* Whitespace run at i: its end, the end of its last \r or \n (0 if none), start of its last char, #chars. */
typedef struct { size_t end, nl_end, last_start, nchars; } WsRun;

static WsRun ws_run(const uint8_t *s, size_t n, size_t i) {
    WsRun w = {i, 0, i, 0};
    while (w.end < n) {
        Ch ch = ch_at(s, n, w.end);
        if (!(ch.f & F_WS)) break;
        w.last_start = w.end;
        w.end += ch.len;
        w.nchars++;
        if (ch.cp == '\r' || ch.cp == '\n') w.nl_end = w.end;
    }
    return w;
}

/* The shared tail of every pattern: \s*[\r\n]+ (optional), then \s+(?!\S), then \s+. */
static size_t ws_tail(const uint8_t *s, size_t n, size_t i, int newline_rule, int end_rule) {
    WsRun w = ws_run(s, n, i);
    if (end_rule && w.end == n) return w.end;           /* \s++$ */
    if (newline_rule && w.nl_end) return w.nl_end;       /* \s*[\r\n]+ */
    if (w.end == n || w.nchars < 2) return w.end;        /* \s+(?!\S) at the end, or \s+ */
    return w.last_start;                                 /* \s+(?!\S): leave the last one */
}

static size_t scan_gpt2(const uint8_t *s, size_t n, size_t i) {
    size_t c = contraction(s, n, i, 0);
    if (c) return i + c;
    Ch c0 = ch_at(s, n, i);
    if (c0.cp == ' ' && i + 1 < n) {
        Ch c1 = ch_at(s, n, i + 1);
        if (c1.f & F_L) return run_end(s, n, i + 1, F_L);
        if (c1.f & F_N) return run_end(s, n, i + 1, F_N);
        if (IS_OTHER(c1.f)) return run_end(s, n, i + 1, 0);
    }
    if (c0.f & F_L) return run_end(s, n, i, F_L);
    if (c0.f & F_N) return run_end(s, n, i, F_N);
    if (IS_OTHER(c0.f)) return run_end(s, n, i, 0);
    return ws_tail(s, n, i, 0, 0);
}

static size_t crlf_run(const uint8_t *s, size_t n, size_t i, int slash) {
    while (i < n && (s[i] == '\r' || s[i] == '\n' || (slash && s[i] == '/'))) i++;
    return i;
}

static size_t digits3(const uint8_t *s, size_t n, size_t i) {
    for (int k = 0; k < 3 && i < n; k++) {
        Ch ch = ch_at(s, n, i);
        if (!(ch.f & F_N)) break;
        i += ch.len;
    }
    return i;
}

static size_t scan_gpt4(const uint8_t *s, size_t n, size_t i, int end_rule) {
    size_t c = contraction(s, n, i, 1);
    if (c) return i + c;
    Ch c0 = ch_at(s, n, i);
    if (c0.f & F_L) return run_end(s, n, i, F_L);
    int prefix_ok = c0.cp != '\r' && c0.cp != '\n' && !(c0.f & (F_L | F_N));
    if (prefix_ok && i + c0.len < n) {
        Ch c1 = ch_at(s, n, i + c0.len);
        if (c1.f & F_L) return run_end(s, n, i + c0.len, F_L);
    }
    if (c0.f & F_N) return digits3(s, n, i);
    if (c0.cp == ' ' && i + 1 < n && IS_OTHER(ch_at(s, n, i + 1).f))
        return crlf_run(s, n, run_end(s, n, i + 1, 0), 0);
    if (IS_OTHER(c0.f)) return crlf_run(s, n, run_end(s, n, i, 0), 0);
    return ws_tail(s, n, i, 1, end_rule);
}

/* o200k, alternative 1 at start p: [U]*[LW]+ where U = Lu|Lt|Lm|Lo|M and LW = Ll|Lm|Lo|M, with regex
 * backtracking: take the longest U run, then give characters back until one of them can start LW+. */
static size_t o200k_alt1(const uint8_t *s, size_t n, size_t p) {
    size_t u_end = run_end(s, n, p, F_U);
    size_t k = u_end;
    for (;;) {
        if (k < n && (ch_at(s, n, k).f & F_LW)) return run_end(s, n, k, F_LW);
        if (k == p) return 0;
        do { k--; } while (k > p && (s[k] & 0xC0) == 0x80); /* chars in a U run are valid UTF-8 */
    }
}

static size_t o200k_alt2(const uint8_t *s, size_t n, size_t p) {
    size_t u_end = run_end(s, n, p, F_U);
    if (u_end == p) return 0;
    return run_end(s, n, u_end, F_LW);
}

static size_t scan_o200k(const uint8_t *s, size_t n, size_t i) {
    Ch c0 = ch_at(s, n, i);
    int prefix_ok = c0.cp != '\r' && c0.cp != '\n' && !(c0.f & (F_L | F_N));
    size_t starts[2];
    int ns = 0;
    if (prefix_ok && i + c0.len < n) starts[ns++] = i + c0.len;
    starts[ns++] = i;
    for (int alt = 1; alt <= 2; alt++) {
        for (int k = 0; k < ns; k++) {
            size_t e = alt == 1 ? o200k_alt1(s, n, starts[k]) : o200k_alt2(s, n, starts[k]);
            if (e) return e + contraction(s, n, e, 1);
        }
    }
    if (c0.f & F_N) return digits3(s, n, i);
    if (c0.cp == ' ' && i + 1 < n && IS_OTHER(ch_at(s, n, i + 1).f))
        return crlf_run(s, n, run_end(s, n, i + 1, 0), 1);
    if (IS_OTHER(c0.f)) return crlf_run(s, n, run_end(s, n, i, 0), 1);
    return ws_tail(s, n, i, 1, 0);
}

static inline size_t scan_next(int kind, const uint8_t *s, size_t n, size_t i) {
    switch (kind) {
    case 1: return scan_gpt2(s, n, i);
    case 2: return scan_gpt4(s, n, i, 0);
    case 3: return scan_gpt4(s, n, i, 1);
    default: return scan_o200k(s, n, i);
    }
}

/* ------------------------------------------------------------------ hashing */

static inline uint64_t hash_bytes(const uint8_t *p, size_t n) { /* FNV-1a, then a final mix */
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    h ^= h >> 29; h *= 0xbf58476d1ce4e5b9ULL; h ^= h >> 32;
    return h;
}

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return x;
}

/* Pair table: (left id, right id) -> (rank, merged id). Open addressing, power-of-two capacity. */
typedef struct { uint64_t key; uint32_t rank, merged; } PairSlot;
typedef struct { PairSlot *slots; size_t cap, len; } PairMap;
#define EMPTY_KEY UINT64_MAX
#define NO_RANK UINT32_MAX

static int pairmap_init(PairMap *m, size_t want) {
    m->cap = 16;
    while (m->cap < want * 2) m->cap <<= 1;
    m->len = 0;
    m->slots = malloc(m->cap * sizeof(PairSlot));
    if (!m->slots) return -1;
    for (size_t i = 0; i < m->cap; i++) m->slots[i].key = EMPTY_KEY;
    return 0;
}

/* Insert unless present (the first rank given for a pair wins, as in a merges list). */
static void pairmap_put(PairMap *m, uint32_t a, uint32_t b, uint32_t rank, uint32_t merged) {
    uint64_t key = ((uint64_t)a << 32) | b;
    size_t i = mix64(key) & (m->cap - 1);
    while (m->slots[i].key != EMPTY_KEY) {
        if (m->slots[i].key == key) {
            if (rank < m->slots[i].rank) { m->slots[i].rank = rank; m->slots[i].merged = merged; }
            return;
        }
        i = (i + 1) & (m->cap - 1);
    }
    m->slots[i].key = key; m->slots[i].rank = rank; m->slots[i].merged = merged;
    m->len++;
}

static inline const PairSlot *pairmap_get(const PairMap *m, uint32_t a, uint32_t b) {
    uint64_t key = ((uint64_t)a << 32) | b;
    size_t i = mix64(key) & (m->cap - 1);
    for (;;) {
        const PairSlot *sl = &m->slots[i];
        if (sl->key == key) return sl;
        if (sl->key == EMPTY_KEY) return NULL;
        i = (i + 1) & (m->cap - 1);
    }
}

/* ------------------------------------------------------------------ the Encoder object */

typedef struct {
    uint32_t id; /* UINT32_MAX = empty */
    uint32_t len;
    uint64_t hash;
    const uint8_t *bytes; /* into Encoder.blob */
} TokSlot;

#define CACHE_SLOTS 65536
#define CACHE_MAXB 32
#define CACHE_MAXIDS 8
typedef struct {
    uint64_t hash;
    uint16_t len;
    uint8_t nids;
    uint8_t bytes[CACHE_MAXB];
    uint32_t ids[CACHE_MAXIDS];
} CacheSlot;

typedef struct {
    PyObject_HEAD
    int kind;                /* scanner id, 0 = caller pre-tokenizes */
    int ignore_merges;       /* a piece that is a whole token encodes to it directly */
    uint32_t n_ids;          /* ids are < n_ids */
    uint8_t *blob;           /* all token bytes */
    uint64_t *tok_off;       /* id -> offset in blob */
    int64_t *tok_len;        /* id -> length, -1 = no such id */
    uint32_t byte_id[256];
    PairMap pairs;
    TokSlot *toks;           /* bytes -> id for mergeable tokens */
    size_t toks_cap;
    CacheSlot *cache;        /* piece -> ids, shared by calls that win cache_lock */
    pthread_mutex_t cache_lock;
} Encoder;

static int64_t tok_lookup(const Encoder *e, const uint8_t *p, size_t n, uint64_t h) {
    size_t i = h & (e->toks_cap - 1);
    for (;;) {
        const TokSlot *t = &e->toks[i];
        if (t->id == UINT32_MAX) return -1;
        if (t->hash == h && t->len == n && memcmp(t->bytes, p, n) == 0) return t->id;
        i = (i + 1) & (e->toks_cap - 1);
    }
}

/* Output buffer of ids that grows. */
typedef struct { uint32_t *v; size_t len, cap; int oom; } IdBuf;

static inline void idbuf_push(IdBuf *b, uint32_t x) {
    if (b->len == b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 256;
        uint32_t *nv = realloc(b->v, nc * sizeof(uint32_t));
        if (!nv) { b->oom = 1; return; }
        b->v = nv; b->cap = nc;
    }
    b->v[b->len++] = x;
}

/* Scratch space for merging one piece. */
typedef struct { uint32_t *ids, *ranks; int32_t *nxt, *prv; size_t cap; } Scratch;

static int scratch_reserve(Scratch *sc, size_t n) {
    if (n <= sc->cap) return 0;
    size_t c = sc->cap ? sc->cap : 64;
    while (c < n) c *= 2;
    uint32_t *a = realloc(sc->ids, c * 4), *b = a ? realloc(sc->ranks, c * 4) : NULL;
    if (a) sc->ids = a;
    if (b) sc->ranks = b;
    int32_t *d = b ? realloc(sc->nxt, c * 4) : NULL;
    if (d) sc->nxt = d;
    int32_t *f = d ? realloc(sc->prv, c * 4) : NULL;
    if (f) sc->prv = f;
    if (!f) return -1;
    sc->cap = c;
    return 0;
}

static void scratch_free(Scratch *sc) { free(sc->ids); free(sc->ranks); free(sc->nxt); free(sc->prv); }

static inline uint32_t pair_rank(const Encoder *e, uint32_t a, uint32_t b, uint32_t *merged) {
    const PairSlot *sl = pairmap_get(&e->pairs, a, b);
    if (!sl) return NO_RANK;
    *merged = sl->merged;
    return sl->rank;
}

/* Merge: repeatedly join the adjacent pair with the lowest rank, leftmost first (HF and tiktoken agree).
 * Short pieces use a linear scan; long ones a binary heap over a linked list (O(n log n)). */
static size_t merge_linear(const Encoder *e, uint32_t *ids, uint32_t *ranks, size_t m) {
    uint32_t tmp;
    for (size_t k = 0; k + 1 < m; k++) ranks[k] = pair_rank(e, ids[k], ids[k + 1], &tmp);
    while (m > 1) {
        size_t best = 0;
        for (size_t k = 1; k + 1 < m; k++) if (ranks[k] < ranks[best]) best = k;
        if (ranks[best] == NO_RANK) break;
        uint32_t merged;
        pair_rank(e, ids[best], ids[best + 1], &merged);
        ids[best] = merged;
        memmove(ids + best + 1, ids + best + 2, (m - best - 2) * 4);
        memmove(ranks + best, ranks + best + 1, (m - best - 2) * 4);
        m--;
        if (best + 1 < m) ranks[best] = pair_rank(e, ids[best], ids[best + 1], &tmp);
        if (best > 0) ranks[best - 1] = pair_rank(e, ids[best - 1], ids[best], &tmp);
    }
    return m;
}

typedef struct { uint32_t rank; int32_t pos; uint32_t left, right; } HeapItem;

static inline int heap_less(const HeapItem *a, const HeapItem *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(HeapItem *h, size_t *n, HeapItem x) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&x, &h[p])) break;
        h[i] = h[p]; i = p;
    }
    h[i] = x;
}

static HeapItem heap_pop(HeapItem *h, size_t *n) {
    HeapItem top = h[0], x = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const HeapItem *best = &x;
        if (l < *n && heap_less(&h[l], best)) { m = l; best = &h[l]; }
        if (r < *n && heap_less(&h[r], best)) { m = r; }
        if (m == i) break;
        h[i] = h[m]; i = m;
    }
    if (*n) h[i] = x;
    return top;
}

static size_t merge_heap(const Encoder *e, uint32_t *ids, int32_t *nxt, int32_t *prv, size_t m) {
    HeapItem *heap = malloc(sizeof(HeapItem) * (2 * m + 1));
    if (!heap) return (size_t)-1;
    size_t hn = 0;
    uint32_t merged;
    for (size_t k = 0; k < m; k++) { nxt[k] = k + 1 < m ? (int32_t)k + 1 : -1; prv[k] = (int32_t)k - 1; }
    for (size_t k = 0; k + 1 < m; k++) {
        uint32_t r = pair_rank(e, ids[k], ids[k + 1], &merged);
        if (r != NO_RANK) heap_push(heap, &hn, (HeapItem){r, (int32_t)k, ids[k], ids[k + 1]});
    }
    while (hn) {
        HeapItem it = heap_pop(heap, &hn);
        int32_t p = it.pos, q = nxt[p];
        /* stale if p was absorbed (prv link broken), or its pair changed */
        if (ids[p] == UINT32_MAX || q < 0 || ids[p] != it.left || ids[q] != it.right) continue;
        pair_rank(e, it.left, it.right, &merged);
        ids[p] = merged;
        ids[q] = UINT32_MAX;
        nxt[p] = nxt[q];
        if (nxt[q] >= 0) prv[nxt[q]] = p;
        if (prv[p] >= 0) {
            int32_t a = prv[p];
            uint32_t r = pair_rank(e, ids[a], ids[p], &merged);
            if (r != NO_RANK) heap_push(heap, &hn, (HeapItem){r, a, ids[a], ids[p]});
        }
        if (nxt[p] >= 0) {
            int32_t b = nxt[p];
            uint32_t r = pair_rank(e, ids[p], ids[b], &merged);
            if (r != NO_RANK) heap_push(heap, &hn, (HeapItem){r, p, ids[p], ids[b]});
        }
    }
    free(heap);
    size_t out = 0;
    for (int32_t k = 0; k >= 0; k = nxt[k]) ids[out++] = ids[k];
    return out;
}

#define LINEAR_MAX 128
#define NO_BYTE 0xFFFFFFFFu /* byte_id of a byte the vocabulary has no token for */

/* Encode one pre-tokenized piece, appending ids. */
static void encode_piece(const Encoder *e, const uint8_t *p, size_t n, IdBuf *out, Scratch *sc,
                         CacheSlot *cache) {
    if (n == 1) {
        if (e->byte_id[p[0]] != NO_BYTE) idbuf_push(out, e->byte_id[p[0]]);
        return;
    }
    uint64_t h = 0;
    if (e->ignore_merges || (cache && n <= CACHE_MAXB)) h = hash_bytes(p, n);
    if (e->ignore_merges) {
        int64_t id = tok_lookup(e, p, n, h);
        if (id >= 0) { idbuf_push(out, (uint32_t)id); return; }
    }
    CacheSlot *slot = NULL;
    if (cache && n <= CACHE_MAXB) {
        slot = &cache[h & (CACHE_SLOTS - 1)];
        if (slot->hash == h && slot->len == n && memcmp(slot->bytes, p, n) == 0) {
            for (int k = 0; k < slot->nids; k++) idbuf_push(out, slot->ids[k]);
            return;
        }
    }
    if (scratch_reserve(sc, n) < 0) { out->oom = 1; return; }
    size_t kept = 0; /* bytes without a token are dropped (vocabularies that lack a few bytes), as in HF */
    for (size_t k = 0; k < n; k++)
        if (e->byte_id[p[k]] != NO_BYTE) sc->ids[kept++] = e->byte_id[p[k]];
    size_t m = kept < 2 ? kept
             : kept <= LINEAR_MAX ? merge_linear(e, sc->ids, sc->ranks, kept)
                                  : merge_heap(e, sc->ids, sc->nxt, sc->prv, kept);
    if (m == (size_t)-1) { out->oom = 1; return; }
    for (size_t k = 0; k < m; k++) idbuf_push(out, sc->ids[k]);
    if (slot && m <= CACHE_MAXIDS) {
        slot->hash = h; slot->len = (uint16_t)n; slot->nids = (uint8_t)m;
        memcpy(slot->bytes, p, n);
        memcpy(slot->ids, sc->ids, m * 4);
    }
}

static void encode_text(const Encoder *e, const uint8_t *s, size_t n, IdBuf *out, Scratch *sc, CacheSlot *cache) {
    size_t i = 0;
    while (i < n) {
        size_t j = scan_next(e->kind, s, n, i);
        encode_piece(e, s + i, j - i, out, sc, cache);
        i = j;
    }
}

static PyObject *ids_to_list(const IdBuf *b) {
    PyObject *list = PyList_New((Py_ssize_t)b->len);
    if (!list) return NULL;
    for (size_t k = 0; k < b->len; k++) {
        PyObject *x = PyLong_FromUnsignedLong(b->v[k]);
        if (!x) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, (Py_ssize_t)k, x);
    }
    return list;
}

/* Encode a buffer with the GIL released, using the shared cache when no other thread holds it. */
static PyObject *encode_buffer(Encoder *e, const uint8_t *s, size_t n) {
    IdBuf out = {0};
    Scratch sc = {0};
    Py_BEGIN_ALLOW_THREADS
    int locked = pthread_mutex_trylock(&e->cache_lock) == 0;
    encode_text(e, s, n, &out, &sc, locked ? e->cache : NULL);
    if (locked) pthread_mutex_unlock(&e->cache_lock);
    Py_END_ALLOW_THREADS
    scratch_free(&sc);
    if (out.oom) { free(out.v); return PyErr_NoMemory(); }
    PyObject *r = ids_to_list(&out);
    free(out.v);
    return r;
}

static int require_kind(Encoder *e) {
    if (e->kind == 0) {
        PyErr_SetString(PyExc_ValueError, "this encoder has no compiled pre-tokenizer; pass pieces");
        return -1;
    }
    return 0;
}

static PyObject *Encoder_encode(Encoder *e, PyObject *arg) {
    if (require_kind(e) < 0) return NULL;
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(arg, &n); /* raises UnicodeEncodeError on lone surrogates */
    if (!s) return NULL;
    return encode_buffer(e, (const uint8_t *)s, (size_t)n);
}

static PyObject *Encoder_encode_bytes(Encoder *e, PyObject *arg) {
    if (require_kind(e) < 0) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *r = encode_buffer(e, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return r;
}

/* encode_pieces(list[bytes]) -> ids: BPE on pieces split by the caller (custom patterns). */
static PyObject *Encoder_encode_pieces(Encoder *e, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "expected a list of bytes");
    if (!seq) return NULL;
    IdBuf out = {0};
    Scratch sc = {0};
    Py_ssize_t np = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t k = 0; k < np && !out.oom; k++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, k);
        if (!PyBytes_Check(it)) { PyErr_SetString(PyExc_TypeError, "pieces must be bytes"); goto fail; }
        Py_ssize_t len = PyBytes_GET_SIZE(it);
        if (len) encode_piece(e, (const uint8_t *)PyBytes_AS_STRING(it), (size_t)len, &out, &sc, NULL);
    }
    Py_DECREF(seq);
    scratch_free(&sc);
    if (out.oom) { free(out.v); return PyErr_NoMemory(); }
    PyObject *r = ids_to_list(&out);
    free(out.v);
    return r;
fail:
    Py_DECREF(seq);
    scratch_free(&sc);
    free(out.v);
    return NULL;
}

/* split(bytes) -> list[bytes]: the compiled pre-tokenizer on its own (tests compare it to `regex`). */
static PyObject *Encoder_split(Encoder *e, PyObject *arg) {
    if (require_kind(e) < 0) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    const uint8_t *s = view.buf;
    size_t n = (size_t)view.len, i = 0;
    PyObject *list = PyList_New(0);
    while (list && i < n) {
        size_t j = scan_next(e->kind, s, n, i);
        PyObject *b = PyBytes_FromStringAndSize((const char *)s + i, (Py_ssize_t)(j - i));
        if (!b || PyList_Append(list, b) < 0) { Py_XDECREF(b); Py_CLEAR(list); break; }
        Py_DECREF(b);
        i = j;
    }
    PyBuffer_Release(&view);
    return list;
}

typedef struct {
    const Encoder *e;
    const uint8_t **bufs;
    size_t *lens;
    IdBuf *outs;
    size_t lo, hi;
} BatchJob;

static void *batch_worker(void *arg) {
    BatchJob *job = arg;
    Scratch sc = {0};
    CacheSlot *cache = calloc(CACHE_SLOTS, sizeof(CacheSlot)); /* NULL just means no cache */
    for (size_t k = job->lo; k < job->hi; k++) encode_text(job->e, job->bufs[k], job->lens[k], &job->outs[k], &sc, cache);
    free(cache);
    scratch_free(&sc);
    return NULL;
}

/* encode_batch(list[str | bytes], num_threads) -> list[list[int]], texts split across threads by bytes. */
static PyObject *Encoder_encode_batch(Encoder *e, PyObject *args) {
    PyObject *texts;
    int nthreads = 1;
    if (!PyArg_ParseTuple(args, "O|i", &texts, &nthreads)) return NULL;
    if (require_kind(e) < 0) return NULL;
    PyObject *seq = PySequence_Fast(texts, "expected a list of str");
    if (!seq) return NULL;
    size_t nt = (size_t)PySequence_Fast_GET_SIZE(seq);
    const uint8_t **bufs = calloc(nt + 1, sizeof(*bufs));
    size_t *lens = calloc(nt + 1, sizeof(size_t));
    IdBuf *outs = calloc(nt + 1, sizeof(IdBuf));
    PyObject *result = NULL;
    if (!bufs || !lens || !outs) { PyErr_NoMemory(); goto done; }
    size_t total = 0;
    for (size_t k = 0; k < nt; k++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, k);
        Py_ssize_t n;
        const char *s;
        if (PyBytes_Check(it)) { s = PyBytes_AS_STRING(it); n = PyBytes_GET_SIZE(it); }
        else if (!(s = PyUnicode_AsUTF8AndSize(it, &n))) goto done;
        bufs[k] = (const uint8_t *)s; lens[k] = (size_t)n; total += (size_t)n;
    }
    if (nthreads < 1) nthreads = 1;
    if ((size_t)nthreads > nt) nthreads = nt ? (int)nt : 1;
    BatchJob jobs[256];
    pthread_t tids[256];
    if (nthreads > 256) nthreads = 256;
    size_t k = 0, acc = 0;
    for (int t = 0; t < nthreads; t++) { /* contiguous ranges of about total/nthreads bytes each */
        jobs[t] = (BatchJob){e, bufs, lens, outs, k, k};
        size_t goal = total * (size_t)(t + 1) / (size_t)nthreads;
        while (k < nt && (acc < goal || t == nthreads - 1)) acc += lens[k++];
        jobs[t].hi = k;
    }
    int started[256] = {0};
    Py_BEGIN_ALLOW_THREADS
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&tids[t], NULL, batch_worker, &jobs[t]) == 0;
    batch_worker(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        else batch_worker(&jobs[t]);
    }
    Py_END_ALLOW_THREADS
    result = PyList_New((Py_ssize_t)nt);
    for (size_t j = 0; result && j < nt; j++) {
        if (outs[j].oom) { Py_CLEAR(result); PyErr_NoMemory(); break; }
        PyObject *l = ids_to_list(&outs[j]);
        if (!l) { Py_CLEAR(result); break; }
        PyList_SET_ITEM(result, (Py_ssize_t)j, l);
    }
done:
    if (outs) for (size_t j = 0; j < nt; j++) free(outs[j].v);
    free(bufs); free(lens); free(outs);
    Py_DECREF(seq);
    return result;
}

/* decode_bytes(list[int]) -> bytes; ValueError naming the first id out of range. */
static PyObject *Encoder_decode_bytes(Encoder *e, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "expected a sequence of ints");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    size_t total = 0;
    uint32_t *ids = malloc(sizeof(uint32_t) * (size_t)(n + 1));
    if (!ids) { Py_DECREF(seq); return PyErr_NoMemory(); }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, k);
        long long v = PyLong_AsLongLong(it);
        if (v == -1 && PyErr_Occurred()) {
            int overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, overflow ? "token id at position %zd is out of range"
                                                    : "token id at position %zd is not an integer", k);
            goto fail;
        }
        if (v < 0 || v >= e->n_ids || e->tok_len[v] < 0) {
            PyErr_Format(PyExc_ValueError, "token id %lld is out of range (vocabulary has %u ids)", v, e->n_ids);
            goto fail;
        }
        ids[k] = (uint32_t)v;
        total += (size_t)e->tok_len[v];
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (out) {
        char *w = PyBytes_AS_STRING(out);
        for (Py_ssize_t k = 0; k < n; k++) {
            memcpy(w, e->blob + e->tok_off[ids[k]], (size_t)e->tok_len[ids[k]]);
            w += e->tok_len[ids[k]];
        }
    }
    free(ids);
    Py_DECREF(seq);
    return out;
fail:
    free(ids);
    Py_DECREF(seq);
    return NULL;
}

static void Encoder_dealloc(Encoder *e) {
    free(e->blob); free(e->tok_off); free(e->tok_len); free(e->pairs.slots); free(e->toks); free(e->cache);
    pthread_mutex_destroy(&e->cache_lock);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

/* Encoder(tokens, pairs, kind, ignore_merges, specials)
 *   tokens: list indexed by id of bytes (mergeable tokens) or None (no mergeable token at that id)
 *   pairs: list of (left, right, rank, merged) or None = derive tiktoken-style (every split of a
 *          token into two tokens, ranked by the token's id: "merge the pair whose join ranks lowest")
 *   specials: list of (id, bytes) for decoding only; they never take part in merges. */
static int Encoder_init(Encoder *e, PyObject *args, PyObject *kw) {
    PyObject *tokens, *pairs, *specials;
    int kind, ignore;
    static char *kwlist[] = {"tokens", "pairs", "kind", "ignore_merges", "specials", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOipO", kwlist, &tokens, &pairs, &kind, &ignore, &specials)) return -1;
    if (kind < 0 || kind > 4) { PyErr_SetString(PyExc_ValueError, "unknown scanner kind"); return -1; }
    if (e->blob) { PyErr_SetString(PyExc_RuntimeError, "Encoder is already initialised"); return -1; }
    PyObject *tseq = PySequence_Fast(tokens, "tokens must be a list");
    PyObject *sseq = tseq ? PySequence_Fast(specials, "specials must be a list") : NULL;
    if (!sseq) { Py_XDECREF(tseq); return -1; }
    Py_ssize_t nt = PySequence_Fast_GET_SIZE(tseq), ns = PySequence_Fast_GET_SIZE(sseq);
    uint32_t n_ids = (uint32_t)nt;
    size_t blob_len = 0;
    for (Py_ssize_t k = 0; k < ns; k++) {
        long long id;
        PyObject *b;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sseq, k), "LS", &id, &b)) goto fail0;
        if (id < 0 || id >= UINT32_MAX) { PyErr_SetString(PyExc_ValueError, "special id out of range"); goto fail0; }
        if ((uint32_t)id + 1 > n_ids) n_ids = (uint32_t)id + 1;
        blob_len += (size_t)PyBytes_GET_SIZE(b);
    }
    for (Py_ssize_t k = 0; k < nt; k++) {
        PyObject *b = PySequence_Fast_GET_ITEM(tseq, k);
        if (b == Py_None) continue;
        if (!PyBytes_Check(b) || PyBytes_GET_SIZE(b) == 0) { PyErr_Format(PyExc_ValueError, "token %zd must be non-empty bytes", k); goto fail0; }
        blob_len += (size_t)PyBytes_GET_SIZE(b);
    }
    e->kind = kind; e->ignore_merges = ignore; e->n_ids = n_ids;
    e->blob = malloc(blob_len + 1);
    e->tok_off = calloc(n_ids + 1, sizeof(uint64_t));
    e->tok_len = malloc((n_ids + 1) * sizeof(int64_t));
    e->toks_cap = 16;
    while (e->toks_cap < (size_t)nt * 2) e->toks_cap <<= 1;
    e->toks = malloc(e->toks_cap * sizeof(TokSlot));
    e->cache = calloc(CACHE_SLOTS, sizeof(CacheSlot));
    if (!e->blob || !e->tok_off || !e->tok_len || !e->toks || !e->cache) { PyErr_NoMemory(); goto fail0; }
    for (uint32_t k = 0; k <= n_ids; k++) e->tok_len[k] = -1;
    for (size_t k = 0; k < e->toks_cap; k++) e->toks[k].id = UINT32_MAX;
    size_t off = 0;
    for (Py_ssize_t k = 0; k < nt; k++) {
        PyObject *b = PySequence_Fast_GET_ITEM(tseq, k);
        if (b == Py_None) continue;
        size_t len = (size_t)PyBytes_GET_SIZE(b);
        memcpy(e->blob + off, PyBytes_AS_STRING(b), len);
        e->tok_off[k] = off; e->tok_len[k] = (int64_t)len;
        uint64_t h = hash_bytes(e->blob + off, len);
        if (tok_lookup(e, e->blob + off, len, h) >= 0) { PyErr_Format(PyExc_ValueError, "token %zd duplicates an earlier token", k); goto fail0; }
        size_t i = h & (e->toks_cap - 1);
        while (e->toks[i].id != UINT32_MAX) i = (i + 1) & (e->toks_cap - 1);
        e->toks[i] = (TokSlot){(uint32_t)k, (uint32_t)len, h, e->blob + off};
        off += len;
    }
    for (Py_ssize_t k = 0; k < ns; k++) {
        PyObject *item = PySequence_Fast_GET_ITEM(sseq, k);
        long long id = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 0));
        PyObject *b = PyTuple_GET_ITEM(item, 1);
        size_t len = (size_t)PyBytes_GET_SIZE(b);
        memcpy(e->blob + off, PyBytes_AS_STRING(b), len);
        e->tok_off[id] = off; e->tok_len[id] = (int64_t)len;
        off += len;
    }
    for (int b = 0; b < 256; b++) {
        uint8_t c = (uint8_t)b;
        int64_t id = tok_lookup(e, &c, 1, hash_bytes(&c, 1));
        e->byte_id[b] = id < 0 ? NO_BYTE : (uint32_t)id; /* a byte with no token is dropped, as HF tokenizers do */
    }
    if (pairs == Py_None) { /* tiktoken: every split (a, b) of token t with a and b tokens ranks as t */
        if (pairmap_init(&e->pairs, (size_t)nt * 4) < 0) { PyErr_NoMemory(); goto fail0; }
        for (Py_ssize_t k = 0; k < nt; k++) {
            int64_t len = e->tok_len[k];
            if (len < 2 || (size_t)k >= nt) continue;
            const uint8_t *p = e->blob + e->tok_off[k];
            for (int64_t cut = 1; cut < len; cut++) {
                int64_t a = tok_lookup(e, p, (size_t)cut, hash_bytes(p, (size_t)cut));
                if (a < 0) continue;
                int64_t b = tok_lookup(e, p + cut, (size_t)(len - cut), hash_bytes(p + cut, (size_t)(len - cut)));
                if (b < 0) continue;
                if (e->pairs.len * 2 >= e->pairs.cap) { PyErr_SetString(PyExc_MemoryError, "pair table full"); goto fail0; }
                pairmap_put(&e->pairs, (uint32_t)a, (uint32_t)b, (uint32_t)k, (uint32_t)k);
            }
        }
    } else {
        PyObject *pseq = PySequence_Fast(pairs, "pairs must be a list or None");
        if (!pseq) goto fail0;
        Py_ssize_t np = PySequence_Fast_GET_SIZE(pseq);
        if (pairmap_init(&e->pairs, (size_t)np + 1) < 0) { Py_DECREF(pseq); PyErr_NoMemory(); goto fail0; }
        for (Py_ssize_t k = 0; k < np; k++) {
            unsigned int a, b, r, m;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(pseq, k), "IIII", &a, &b, &r, &m)) { Py_DECREF(pseq); goto fail0; }
            if (a >= (unsigned)nt || b >= (unsigned)nt || m >= (unsigned)nt || e->tok_len[m] < 0) {
                Py_DECREF(pseq);
                PyErr_Format(PyExc_ValueError, "merge %zd refers to a token id that does not exist", k);
                goto fail0;
            }
            pairmap_put(&e->pairs, a, b, r, m);
        }
        Py_DECREF(pseq);
    }
    Py_DECREF(tseq); Py_DECREF(sseq);
    return 0;
fail0:
    Py_DECREF(tseq); Py_DECREF(sseq);
    return -1;
}

static PyObject *Encoder_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Encoder *e = (Encoder *)type->tp_alloc(type, 0); /* zeroed: dealloc after a failed init is safe */
    if (e) pthread_mutex_init(&e->cache_lock, NULL);
    return (PyObject *)e;
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)Encoder_encode, METH_O, "encode(str) -> list[int]"},
    {"encode_bytes", (PyCFunction)Encoder_encode_bytes, METH_O, "encode_bytes(bytes) -> list[int]"},
    {"encode_pieces", (PyCFunction)Encoder_encode_pieces, METH_O, "encode_pieces(list[bytes]) -> list[int]"},
    {"encode_batch", (PyCFunction)Encoder_encode_batch, METH_VARARGS, "encode_batch(list[str], num_threads) -> list[list[int]]"},
    {"decode_bytes", (PyCFunction)Encoder_decode_bytes, METH_O, "decode_bytes(ids) -> bytes"},
    {"split", (PyCFunction)Encoder_split, METH_O, "split(bytes) -> list[bytes]"},
    {NULL}
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lmforge.tokenizer._bpe.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Compiled byte-level BPE encoder (see bpe.py for the reference).",
    .tp_new = Encoder_new,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
};

/* ------------------------------------------------------------------ training: word counting */

typedef struct { const uint8_t *p; uint32_t len; uint64_t hash; int64_t count; } WordSlot;
typedef struct { WordSlot *slots; size_t cap, len; int oom; } WordMap;

static int wordmap_init(WordMap *m, size_t cap) {
    m->cap = cap; m->len = 0; m->oom = 0;
    m->slots = calloc(cap, sizeof(WordSlot));
    return m->slots ? 0 : -1;
}

static void wordmap_add(WordMap *m, const uint8_t *p, size_t n, uint64_t h, int64_t count) {
    if ((m->len + 1) * 2 > m->cap) { /* grow */
        WordMap g;
        if (wordmap_init(&g, m->cap * 2) < 0) { m->oom = 1; return; }
        for (size_t i = 0; i < m->cap; i++) {
            WordSlot *s = &m->slots[i];
            if (!s->p) continue;
            size_t j = s->hash & (g.cap - 1);
            while (g.slots[j].p) j = (j + 1) & (g.cap - 1);
            g.slots[j] = *s;
        }
        g.len = m->len;
        free(m->slots);
        *m = g;
    }
    size_t i = h & (m->cap - 1);
    for (;;) {
        WordSlot *s = &m->slots[i];
        if (!s->p) { *s = (WordSlot){p, (uint32_t)n, h, count}; m->len++; return; }
        if (s->hash == h && s->len == n && memcmp(s->p, p, n) == 0) { s->count += count; return; }
        i = (i + 1) & (m->cap - 1);
    }
}

typedef struct { int kind; const uint8_t **bufs; size_t *lens; size_t lo, hi; WordMap map; } CountJob;

static void *count_worker(void *arg) {
    CountJob *job = arg;
    for (size_t k = job->lo; k < job->hi && !job->map.oom; k++) {
        const uint8_t *s = job->bufs[k];
        size_t n = job->lens[k], i = 0;
        while (i < n) {
            size_t j = scan_next(job->kind, s, n, i);
            wordmap_add(&job->map, s + i, j - i, hash_bytes(s + i, j - i), 1);
            i = j;
        }
    }
    return NULL;
}

/* count_words(list[str | bytes], kind, num_threads) -> dict[bytes, int]: piece frequencies for training. */
static PyObject *count_words(PyObject *self, PyObject *args) {
    PyObject *texts;
    int kind, nthreads;
    if (!PyArg_ParseTuple(args, "Oii", &texts, &kind, &nthreads)) return NULL;
    if (kind < 1 || kind > 4) { PyErr_SetString(PyExc_ValueError, "unknown scanner kind"); return NULL; }
    PyObject *seq = PySequence_Fast(texts, "expected a list of str");
    if (!seq) return NULL;
    size_t nt = (size_t)PySequence_Fast_GET_SIZE(seq), total = 0;
    const uint8_t **bufs = calloc(nt + 1, sizeof(*bufs));
    size_t *lens = calloc(nt + 1, sizeof(size_t));
    PyObject *result = NULL;
    CountJob jobs[64];
    pthread_t tids[64];
    int started[64] = {0};
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    memset(jobs, 0, sizeof(jobs));
    if (!bufs || !lens) { PyErr_NoMemory(); goto done; }
    for (size_t k = 0; k < nt; k++) {
        Py_ssize_t n;
        const char *s;
        PyObject *it = PySequence_Fast_GET_ITEM(seq, k);
        if (PyBytes_Check(it)) { s = PyBytes_AS_STRING(it); n = PyBytes_GET_SIZE(it); }
        else if (!(s = PyUnicode_AsUTF8AndSize(it, &n))) goto done;
        bufs[k] = (const uint8_t *)s; lens[k] = (size_t)n; total += (size_t)n;
    }
    size_t k = 0, acc = 0;
    for (int t = 0; t < nthreads; t++) {
        jobs[t].kind = kind; jobs[t].bufs = bufs; jobs[t].lens = lens; jobs[t].lo = k;
        size_t goal = total * (size_t)(t + 1) / (size_t)nthreads;
        while (k < nt && (acc < goal || t == nthreads - 1)) acc += lens[k++];
        jobs[t].hi = k;
        if (wordmap_init(&jobs[t].map, 1 << 16) < 0) { PyErr_NoMemory(); goto done; }
    }
    Py_BEGIN_ALLOW_THREADS
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&tids[t], NULL, count_worker, &jobs[t]) == 0;
    count_worker(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        else count_worker(&jobs[t]);
    }
    for (int t = 1; t < nthreads; t++) /* fold every map into the first */
        for (size_t i = 0; i < jobs[t].map.cap && !jobs[0].map.oom; i++) {
            WordSlot *s = &jobs[t].map.slots[i];
            if (s->p) wordmap_add(&jobs[0].map, s->p, s->len, s->hash, s->count);
        }
    Py_END_ALLOW_THREADS
    for (int t = 0; t < nthreads; t++) if (jobs[t].map.oom) { PyErr_NoMemory(); goto done; }
    result = PyDict_New();
    for (size_t i = 0; result && i < jobs[0].map.cap; i++) {
        WordSlot *s = &jobs[0].map.slots[i];
        if (!s->p) continue;
        PyObject *key = PyBytes_FromStringAndSize((const char *)s->p, s->len);
        PyObject *val = PyLong_FromLongLong(s->count);
        if (!key || !val || PyDict_SetItem(result, key, val) < 0) Py_CLEAR(result);
        Py_XDECREF(key); Py_XDECREF(val);
    }
done:
    for (int t = 0; t < nthreads; t++) free(jobs[t].map.slots);
    free(bufs); free(lens);
    Py_DECREF(seq);
    return result;
}

/* ------------------------------------------------------------------ training: merges */
/* Incremental BPE (as in HF tokenizers and SentencePiece): pair counts, an inverted index pair -> words,
 * and a max-heap with lazy invalidation. Choice: highest count; ties -> smallest (left id, right id). */

typedef struct {
    int64_t count;
    int32_t *where;          /* words that may hold the pair (stale entries are skipped) */
    uint32_t nwhere, capwhere;
    uint64_t key;
    int64_t queued_round;    /* 1 + the merge round in which it was last pushed, to push once a round */
} PairStat;
typedef struct { int64_t count; uint64_t key; } TrainItem;

typedef struct {
    uint64_t *keys; uint32_t *idx; size_t cap, len; /* pair -> index into stats */
    PairStat *stats; size_t nstats, capstats;
    TrainItem *heap; size_t hn, hcap;
    int oom;
} Trainer;

static inline int train_before(const TrainItem *a, const TrainItem *b) { /* a pops before b */
    return a->count > b->count || (a->count == b->count && a->key < b->key);
}

static void th_push(Trainer *T, TrainItem x) {
    if (T->hn == T->hcap) {
        size_t nc = T->hcap ? T->hcap * 2 : 1024;
        TrainItem *nh = realloc(T->heap, nc * sizeof(TrainItem));
        if (!nh) { T->oom = 1; return; }
        T->heap = nh; T->hcap = nc;
    }
    size_t i = T->hn++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!train_before(&x, &T->heap[p])) break;
        T->heap[i] = T->heap[p]; i = p;
    }
    T->heap[i] = x;
}

static TrainItem th_pop(Trainer *T) {
    TrainItem top = T->heap[0], x = T->heap[--T->hn];
    size_t i = 0, n = T->hn;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const TrainItem *best = &x;
        if (l < n && train_before(&T->heap[l], best)) { m = l; best = &T->heap[l]; }
        if (r < n && train_before(&T->heap[r], best)) m = r;
        if (m == i) break;
        T->heap[i] = T->heap[m]; i = m;
    }
    if (n) T->heap[i] = x;
    return top;
}

static PairStat *pair_stat(Trainer *T, uint64_t key, int create) {
    if (create && (T->len + 1) * 2 > T->cap) {
        size_t nc = T->cap ? T->cap * 2 : 1 << 16;
        uint64_t *nk = malloc(nc * 8);
        uint32_t *ni = malloc(nc * 4);
        if (!nk || !ni) { free(nk); free(ni); T->oom = 1; return NULL; }
        for (size_t i = 0; i < nc; i++) nk[i] = EMPTY_KEY;
        for (size_t i = 0; i < T->cap; i++) {
            if (T->keys[i] == EMPTY_KEY) continue;
            size_t j = mix64(T->keys[i]) & (nc - 1);
            while (nk[j] != EMPTY_KEY) j = (j + 1) & (nc - 1);
            nk[j] = T->keys[i]; ni[j] = T->idx[i];
        }
        free(T->keys); free(T->idx);
        T->keys = nk; T->idx = ni; T->cap = nc;
    }
    if (!T->cap) return NULL;
    size_t i = mix64(key) & (T->cap - 1);
    for (;;) {
        if (T->keys[i] == key) return &T->stats[T->idx[i]];
        if (T->keys[i] == EMPTY_KEY) break;
        i = (i + 1) & (T->cap - 1);
    }
    if (!create) return NULL;
    if (T->nstats == T->capstats) {
        size_t nc = T->capstats ? T->capstats * 2 : 1 << 16;
        PairStat *ns = realloc(T->stats, nc * sizeof(PairStat));
        if (!ns) { T->oom = 1; return NULL; }
        T->stats = ns; T->capstats = nc;
    }
    T->keys[i] = key; T->idx[i] = (uint32_t)T->nstats; T->len++;
    PairStat *s = &T->stats[T->nstats++];
    memset(s, 0, sizeof(*s));
    s->key = key;
    return s;
}

static void stat_add_word(Trainer *T, PairStat *s, int32_t w) {
    if (s->nwhere && s->where[s->nwhere - 1] == w) return;
    if (s->nwhere == s->capwhere) {
        uint32_t nc = s->capwhere ? s->capwhere * 2 : 4;
        int32_t *nw = realloc(s->where, nc * sizeof(int32_t));
        if (!nw) { T->oom = 1; return; }
        s->where = nw; s->capwhere = nc;
    }
    s->where[s->nwhere++] = w;
}

#define PKEY(a, b) (((uint64_t)(uint32_t)(a) << 32) | (uint32_t)(b))

/* train_merges(words: list[bytes], counts: list[int], n_merges, min_frequency, callback) -> list[(a, b)]
 * Symbols start as byte values 0..255; merge k creates symbol 256 + k. `callback(done)` is called about
 * every 64 merges (for progress bars); it may raise to abort. */
static PyObject *train_merges(PyObject *self, PyObject *args) {
    PyObject *words, *counts, *callback;
    Py_ssize_t n_merges;
    long long min_freq;
    if (!PyArg_ParseTuple(args, "OOnLO", &words, &counts, &n_merges, &min_freq, &callback)) return NULL;
    PyObject *wseq = PySequence_Fast(words, "words must be a list of bytes");
    if (!wseq) return NULL;
    PyObject *cseq = PySequence_Fast(counts, "counts must be a list of ints");
    if (!cseq) { Py_DECREF(wseq); return NULL; }
    Py_ssize_t nw = PySequence_Fast_GET_SIZE(wseq);
    if (PySequence_Fast_GET_SIZE(cseq) != nw) {
        PyErr_SetString(PyExc_ValueError, "words and counts differ in length");
        Py_DECREF(wseq); Py_DECREF(cseq); return NULL;
    }
    size_t total = 0;
    for (Py_ssize_t k = 0; k < nw; k++) {
        PyObject *b = PySequence_Fast_GET_ITEM(wseq, k);
        if (!PyBytes_Check(b)) { PyErr_SetString(PyExc_TypeError, "words must be bytes"); Py_DECREF(wseq); Py_DECREF(cseq); return NULL; }
        total += (size_t)PyBytes_GET_SIZE(b);
    }
    int32_t *sym = malloc((total + 1) * sizeof(int32_t));
    size_t *off = malloc((nw + 1) * sizeof(size_t));
    uint32_t *len = malloc((nw + 1) * sizeof(uint32_t));
    int64_t *cnt = malloc((nw + 1) * sizeof(int64_t));
    int32_t *stamp = malloc((nw + 1) * sizeof(int32_t));
    Trainer T = {0};
    PyObject *result = NULL;
    if (!sym || !off || !len || !cnt || !stamp) { PyErr_NoMemory(); goto done; }
    size_t o = 0;
    for (Py_ssize_t k = 0; k < nw; k++) {
        PyObject *b = PySequence_Fast_GET_ITEM(wseq, k);
        const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(b);
        Py_ssize_t n = PyBytes_GET_SIZE(b);
        off[k] = o; len[k] = (uint32_t)n; stamp[k] = -1;
        for (Py_ssize_t j = 0; j < n; j++) sym[o++] = p[j];
        cnt[k] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(cseq, k));
        if (cnt[k] == -1 && PyErr_Occurred()) goto done;
    }
    result = PyList_New(0);
    if (!result) goto done;
    Py_ssize_t done_merges = 0;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t w = 0; w < nw && !T.oom; w++) /* initial pair counts and inverted index */
        for (uint32_t j = 0; j + 1 < len[w]; j++) {
            PairStat *s = pair_stat(&T, PKEY(sym[off[w] + j], sym[off[w] + j + 1]), 1);
            if (!s) break;
            s->count += cnt[w];
            stat_add_word(&T, s, (int32_t)w);
        }
    for (size_t i = 0; i < T.nstats && !T.oom; i++)
        if (T.stats[i].count > 0) th_push(&T, (TrainItem){T.stats[i].count, T.stats[i].key});
    Py_END_ALLOW_THREADS
    int32_t *touched = NULL;
    size_t ntouched = 0, captouched = 0;
    while (done_merges < n_merges && !T.oom && !failed) {
        PairStat *best = NULL;
        Py_BEGIN_ALLOW_THREADS
        while (T.hn) {
            TrainItem top = th_pop(&T);
            PairStat *s = pair_stat(&T, top.key, 0);
            if (s->count == top.count) { best = s; break; }
            if (s->count > 0) th_push(&T, (TrainItem){s->count, top.key}); /* stale: re-queue */
        }
        if (best && best->count >= min_freq) {
            int32_t a = (int32_t)(best->key >> 32), b = (int32_t)(best->key & 0xFFFFFFFF);
            int32_t c = 256 + (int32_t)done_merges;
            int32_t *where = best->where;
            uint32_t nwhere = best->nwhere;
            best->where = NULL; best->nwhere = best->capwhere = 0;
            ntouched = 0;
            for (uint32_t q = 0; q < nwhere && !T.oom; q++) {
                int32_t w = where[q];
                if (stamp[w] == (int32_t)done_merges) continue;
                stamp[w] = (int32_t)done_merges;
                int32_t *ws = sym + off[w];
                uint32_t L = len[w], j;
                for (j = 0; j + 1 < L; j++) if (ws[j] == a && ws[j + 1] == b) break;
                if (j + 1 >= L) continue; /* stale entry */
                for (j = 0; j + 1 < L; j++) pair_stat(&T, PKEY(ws[j], ws[j + 1]), 0)->count -= cnt[w];
                uint32_t r = 0;
                for (j = 0; j < L;) {
                    if (j + 1 < L && ws[j] == a && ws[j + 1] == b) { ws[r++] = c; j += 2; }
                    else ws[r++] = ws[j++];
                }
                len[w] = L = r;
                for (j = 0; j + 1 < L; j++) {
                    uint64_t key = PKEY(ws[j], ws[j + 1]);
                    PairStat *s = pair_stat(&T, key, 1);
                    if (!s) break;
                    s->count += cnt[w];
                    if (ws[j] == c || ws[j + 1] == c) {
                        stat_add_word(&T, s, w);
                        if (ntouched == captouched) {
                            size_t nc = captouched ? captouched * 2 : 256;
                            int32_t *nt2 = realloc(touched, nc * sizeof(int32_t));
                            if (!nt2) { T.oom = 1; break; }
                            touched = nt2; captouched = nc;
                        }
                        touched[ntouched++] = (int32_t)(s - T.stats);
                    }
                }
            }
            free(where);
            for (size_t q = 0; q < ntouched && !T.oom; q++) { /* pairs with c only grew: queue them once */
                PairStat *s = &T.stats[touched[q]];
                if (s->count > 0 && s->queued_round != done_merges + 1) {
                    th_push(&T, (TrainItem){s->count, s->key});
                    s->queued_round = done_merges + 1;
                }
            }
        } else {
            best = NULL;
        }
        Py_END_ALLOW_THREADS
        if (!best) break;
        PyObject *pair = Py_BuildValue("(ii)", (int)(best->key >> 32), (int)(best->key & 0xFFFFFFFF));
        if (!pair || PyList_Append(result, pair) < 0) { Py_XDECREF(pair); failed = 1; break; }
        Py_DECREF(pair);
        done_merges++;
        if (callback != Py_None && (done_merges % 64 == 0 || done_merges == n_merges)) {
            PyObject *r = PyObject_CallFunction(callback, "n", done_merges);
            if (!r) { failed = 1; break; }
            Py_DECREF(r);
        }
    }
    free(touched);
    if (T.oom) { PyErr_NoMemory(); failed = 1; }
    if (failed) Py_CLEAR(result);
done:
    for (size_t i = 0; i < T.nstats; i++) free(T.stats[i].where);
    free(T.stats); free(T.keys); free(T.idx); free(T.heap);
    free(sym); free(off); free(len); free(cnt); free(stamp);
    Py_DECREF(wseq); Py_DECREF(cseq);
    return result;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef module_methods[] = {
    {"count_words", count_words, METH_VARARGS, "count_words(list[str | bytes], kind, num_threads) -> dict[bytes, int]"},
    {"train_merges", train_merges, METH_VARARGS, "train_merges(words, counts, n_merges, min_frequency, callback) -> list[(a, b)]"},
    {NULL}
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_bpe", "Compiled byte-level BPE core.", -1, module_methods};

PyMODINIT_FUNC PyInit__bpe(void) {
    UCLASS = calloc(0x110000, 1);
    if (!UCLASS) return PyErr_NoMemory();
    for (int k = 0; k < UC_NRANGES; k++)
        for (unsigned int c = UC_RANGES[k][0]; c < UC_RANGES[k][1]; c++) UCLASS[c] = (uint8_t)UC_RANGES[k][2];
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0) { Py_DECREF(&EncoderType); Py_DECREF(m); return NULL; }
    return m;
}
