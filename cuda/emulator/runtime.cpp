// The emulated GPU's runtime: runs one block of a kernel on the calling host thread, each GPU
// thread a fiber with its own stack, and checks what the kernel does.
//
// Built once into a shared library (loaded with RTLD_GLOBAL) whose symbols every emulated kernel
// library binds to at load time. It provides:
// - the builtins emulate.h maps CUDA onto: thread/block indices, __syncthreads (a real barrier:
//   a thread waits until every thread of its block arrives), warp shuffles and votes over their
//   masks, atomics, the tensor-core mma, dynamic shared memory;
// - the `__tsan_*` entry points that `-fsanitize=thread` instrumentation calls before every load
//   and store of a kernel: they check each access against the buffers the launch was given (an
//   out-of-bounds access stops the kernel with an error before it happens), and record shared
//   memory accesses per byte to find races between two barriers;
// - deadlock detection: a thread that exits or waits elsewhere while the rest of its block (or
//   warp) waits at a barrier is an error naming the kernel, block and threads, not a hang.
//
// Blocks run one at a time per host thread; the Rust side may run several host threads at once.
// Static __shared__ variables are `static thread_local` in the kernel library, so each host
// thread's copy (the module's TLS block) is the shared memory of the block it runs.

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__)
#error "the emulator's fibers switch stacks with x86-64 assembly"
#endif

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

typedef uint64_t u64;
typedef uint32_t u32;

struct Dim {
    u32 x, y, z;
};

// One buffer a kernel may touch: a pointer argument's whole buffer.
struct Extent {
    u64 lo;
    u64 len;
    int32_t arg;
    int32_t pad;
};

// What the Rust side passes for a launch (src/emulator/launch.rs mirrors it).
struct Launch {
    void (*entry)(void **);
    void **params;
    const char *kernel;
    Dim grid;
    Dim block;
    u64 dynamic_shared;
    const Extent *extents;
    u64 n_extents;
    int32_t race_check;
    int32_t pad;
    void *(*tls_touch)();
};

constexpr u32 MAX_THREADS = 1024;
constexpr size_t STACK_BYTES = 256 << 10;
constexpr u32 POISON = 0x7fc07fc0u;
// Dynamic shared memory is kept this large at least, so that an access past a launch's size
// lands in it and is reported as such.
constexpr size_t DYNAMIC_CAP = 48 << 10; // an f32 NaN whose halves are bf16 and f16 NaNs

enum State : uint8_t { READY, AT_BLOCK, AT_WARP, DONE };
enum Coll : uint8_t { C_SYNC, C_SHFL, C_VOTE, C_MMA };

const char *coll_name(Coll c) {
    switch (c) {
    case C_SYNC: return "__syncwarp";
    case C_SHFL: return "a warp shuffle";
    case C_VOTE: return "a warp vote";
    default: return "mma.sync";
    }
}

struct Fiber {
    void *sp;
    u32 linear;
    Dim tid;
    State state;
    Coll coll;
    u32 mask;
    u32 src;   // shuffle source lane, or the vote kind
    u64 value; // shuffle value, or the vote predicate
    u64 result;
    float *mma_d;
    const u32 *mma_a;     // bf16 fragments, or null when the operands come widened to f32:
    const u32 *mma_b;
    const float *mma_af;  // the A fragment's 8 values (a[0] lo, a[0] hi, a[1] lo, ...)
    const float *mma_bf;  // the B fragment's 4 values
    char *stack_lo;
};

// Per byte of shared memory: the last writer and reader in the current barrier interval.
struct Shadow {
    u32 w_epoch, w_sync, r_epoch, r_sync;
    uint16_t writer, reader;
    uint8_t many_readers, pad[3];
};

// What a host thread keeps between blocks: fibers, their stacks, the shadow, dynamic shared
// memory. Stacks are mapped once (untouched pages cost nothing), with a guard page under each.
struct Workspace {
    Fiber fibers[MAX_THREADS];
    char *stacks = nullptr;
    Shadow *shadow = nullptr;
    size_t shadow_len = 0;
    char *dynamic = nullptr;
    size_t dynamic_len = 0;
    u32 epoch = 0;
    ~Workspace() {
        if (stacks) munmap(stacks, (size_t)MAX_THREADS * STACK_BYTES);
        free(shadow);
        free(dynamic);
    }
};

// The block a host thread is running.
struct Block {
    const Launch *launch;
    Dim bid;
    u32 nthreads;
    Fiber *fibers;
    Fiber *cur;
    void *sched_sp;
    char *arena;   // static shared memory (the kernel library's TLS block)
    size_t arena_len;
    char *dyn;     // dynamic shared memory: dyn_len bytes of the launch's in dyn_cap mapped
    size_t dyn_len;
    size_t dyn_cap;
    Shadow *shadow;
    u32 epoch;
    u32 warp_sync[MAX_THREADS / 32];
    u32 warp_arrived[MAX_THREADS / 32]; // lanes waiting at a warp collective
    bool failed;
    char *err;
    size_t err_len;
};

// Read on every memory access of a kernel: initial-exec TLS (a fixed offset from the thread
// pointer, from the static TLS space glibc keeps for libraries opened later) instead of a call.
__attribute__((tls_model("initial-exec"))) thread_local Workspace *tl_ws = nullptr;
__attribute__((tls_model("initial-exec"))) thread_local Block *tl_block = nullptr;

// ---- context switching ---------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void emu_ctx_switch(void **save, void *to);
asm(R"(
.text
.p2align 4
.type emu_ctx_switch,@function
.hidden emu_ctx_switch
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_ctx_switch, .-emu_ctx_switch
)");

void fiber_main();

// A fresh fiber's saved state: emu_ctx_switch "returns" into fiber_main with an aligned stack.
void *fiber_init(char *lo) {
    u64 *top = (u64 *)(((uintptr_t)(lo + STACK_BYTES)) & ~(uintptr_t)15);
    u64 *sp = top - 9;
    u32 csr[2];
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(csr[1]));
    memcpy(&sp[0], csr, 8);
    for (int i = 1; i <= 6; ++i) sp[i] = 0; // r15 r14 r13 r12 rbx rbp
    sp[7] = (u64)(uintptr_t)&fiber_main;   // return address
    sp[8] = 0;                              // fiber_main's (never used) return address
    return sp;
}
void switch_to(void **save, void *to) { emu_ctx_switch(save, to); }
#endif

// ---- errors ----------------------------------------------------------------------------------
void fail(Block *b, const char *fmt, ...) {
    if (b->failed) return;
    b->failed = true;
    int n = snprintf(b->err, b->err_len, "block (%u, %u, %u): ", b->bid.x, b->bid.y, b->bid.z);
    if (n < 0) n = 0;
    if ((size_t)n < b->err_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(b->err + n, b->err_len - n, fmt, ap);
        va_end(ap);
    }
}

// Leaves the running fiber for good after an error: back to the scheduler, never resumed.
[[noreturn]] void abort_fiber(Block *b) {
    void *dead;
    switch_to(&dead, b->sched_sp);
    __builtin_unreachable();
}

[[noreturn]] void fail_here(Block *b, const char *fmt, ...) {
    if (!b->failed) {
        char msg[512];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        const Dim t = b->cur->tid;
        fail(b, "thread (%u, %u, %u): %s", t.x, t.y, t.z, msg);
    }
    abort_fiber(b);
}

void fiber_main() {
    Block *b = tl_block;
    b->launch->entry(b->launch->params);
    b = tl_block;
    b->cur->state = DONE;
    abort_fiber(b);
}

// Yields the running fiber to the scheduler until it is made READY again.
void yield(Block *b) {
    Fiber *f = b->cur;
    switch_to(&f->sp, b->sched_sp);
}

Block *current() {
    Block *b = tl_block;
    if (!b) {
        fprintf(stderr, "emma-rs emulator: a kernel builtin ran outside a launch\n");
        abort();
    }
    return b;
}

// ---- memory checks ---------------------------------------------------------------------------
enum Access { READ, WRITE, ATOMIC };
const char *access_name(Access k) { return k == READ ? "read" : k == WRITE ? "write" : "atomic"; }

void record_shared(Block *b, size_t off, size_t size, Access kind) {
    if (!b->launch->race_check || kind == ATOMIC) return;
    const Fiber *f = b->cur;
    const u32 me = f->linear, warp = me / 32, sync = b->warp_sync[warp];
    for (size_t i = off; i < off + size; ++i) {
        Shadow &s = b->shadow[i];
        // Another thread's access in this interval conflicts unless a warp-level sync of the
        // same warp has passed since.
        auto conflicts = [&](u32 other, u32 other_sync) {
            return other != me && !(other / 32 == warp && other_sync != sync);
        };
        const bool written = s.w_epoch == b->epoch;
        if (written && conflicts(s.writer, s.w_sync)) {
            fail_here(b, "shared-memory race at byte offset %zu: thread %u wrote it and thread %u %s it with no "
                         "barrier between",
                      i, (u32)s.writer, me, kind == WRITE ? "wrote" : "read");
        }
        if (kind == WRITE) {
            if (s.r_epoch == b->epoch && (s.many_readers || conflicts(s.reader, s.r_sync))) {
                fail_here(b, "shared-memory race at byte offset %zu: thread %u read it and thread %u wrote it with "
                             "no barrier between",
                          i, (u32)s.reader, me);
            }
            s.w_epoch = b->epoch;
            s.w_sync = sync;
            s.writer = (uint16_t)me;
        } else if (s.r_epoch != b->epoch) {
            s.r_epoch = b->epoch;
            s.r_sync = sync;
            s.reader = (uint16_t)me;
            s.many_readers = 0;
        } else if (conflicts(s.reader, s.r_sync)) {
            s.many_readers = 1;
        }
    }
}

void check_access(const void *p, size_t size, Access kind) {
    Block *b = tl_block;
    if (!b) return;
    const uintptr_t a = (uintptr_t)p;
    const Fiber *f = b->cur;
    if (a - (uintptr_t)f->stack_lo < STACK_BYTES) return;
    if (a - (uintptr_t)b->arena < b->arena_len) {
        const size_t off = a - (uintptr_t)b->arena;
        if (off + size > b->arena_len)
            fail_here(b, "out-of-bounds shared-memory %s of %zu bytes at offset %zu (%zu bytes of static shared "
                         "memory)",
                      access_name(kind), size, off, b->arena_len);
        record_shared(b, off, size, kind);
        return;
    }
    if (a - (uintptr_t)b->dyn < b->dyn_cap) {
        const size_t off = a - (uintptr_t)b->dyn;
        if (off + size > b->dyn_len)
            fail_here(b, "out-of-bounds dynamic shared-memory %s of %zu bytes at offset %zu (%zu bytes)",
                      access_name(kind), size, off, b->dyn_len);
        record_shared(b, b->arena_len + off, size, kind);
        return;
    }
    const Launch *l = b->launch;
    for (u64 i = 0; i < l->n_extents; ++i) {
        const Extent &e = l->extents[i];
        if (a - e.lo < e.len) {
            if (a + size <= e.lo + e.len) return;
            fail_here(b, "out-of-bounds global %s of %zu bytes at byte %llu of the %llu-byte buffer of argument %d",
                      access_name(kind), size, (unsigned long long)(a - e.lo), (unsigned long long)e.len, e.arg);
        }
    }
    // Not in any buffer: name the nearest one.
    const Extent *near = nullptr;
    long long dist = 0;
    for (u64 i = 0; i < l->n_extents; ++i) {
        const Extent &e = l->extents[i];
        const long long d = a >= e.lo + e.len ? (long long)(a - (e.lo + e.len)) : -(long long)(e.lo - a);
        if (!near || llabs(d) < llabs(dist)) {
            near = &e;
            dist = d;
        }
    }
    if (near && llabs(dist) < (1ll << 20)) {
        if (dist >= 0)
            fail_here(b, "out-of-bounds global %s of %zu bytes, %lld bytes past the end of the %llu-byte buffer of "
                         "argument %d",
                      access_name(kind), size, dist, (unsigned long long)near->len, near->arg);
        fail_here(b, "out-of-bounds global %s of %zu bytes, %lld bytes before the %llu-byte buffer of argument %d",
                  access_name(kind), size, -dist, (unsigned long long)near->len, near->arg);
    }
    fail_here(b, "%s of %zu bytes at address %#llx, which is in no buffer passed to the kernel", access_name(kind), size,
              (unsigned long long)a);
}

// ---- the module's static shared memory --------------------------------------------------------
struct TlsQuery {
    uintptr_t code;
    char *data;
    size_t len;
    bool found;
};

int find_tls(struct dl_phdr_info *info, size_t, void *arg) {
    TlsQuery *q = (TlsQuery *)arg;
    bool mine = false;
    size_t tls = 0;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr) &p = info->dlpi_phdr[i];
        const uintptr_t lo = info->dlpi_addr + p.p_vaddr;
        if (p.p_type == PT_LOAD && q->code - lo < p.p_memsz) mine = true;
        if (p.p_type == PT_TLS) tls = p.p_memsz;
    }
    if (!mine) return 0;
    q->found = true;
    q->data = (char *)info->dlpi_tls_data;
    q->len = tls;
    return 1;
}

// This thread's copy of the kernel library's TLS block: its static shared memory.
bool module_arena(const Launch *l, char **data, size_t *len) {
    l->tls_touch(); // allocates the block for this thread
    TlsQuery q{(uintptr_t)l->entry, nullptr, 0, false};
    dl_iterate_phdr(find_tls, &q);
    if (!q.found || (q.len && !q.data)) return false;
    *data = q.data;
    *len = q.len;
    return true;
}

void fill_poison(char *p, size_t n) {
    for (size_t i = 0; i < n; ++i) p[i] = (char)(POISON >> (8 * (i & 3)));
}

Workspace *workspace() {
    if (!tl_ws) {
        Workspace *ws = new Workspace();
        const size_t bytes = (size_t)MAX_THREADS * STACK_BYTES;
        void *m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            delete ws;
            return nullptr;
        }
        ws->stacks = (char *)m;
        const long page = sysconf(_SC_PAGESIZE);
        for (u32 i = 0; i < MAX_THREADS; ++i) mprotect(ws->stacks + (size_t)i * STACK_BYTES, page, PROT_NONE);
        tl_ws = ws;
        static thread_local struct Reaper {
            ~Reaper() {
                delete tl_ws;
                tl_ws = nullptr;
            }
        } reaper;
        (void)reaper;
    }
    return tl_ws;
}

// Grows `buf` to at least `want` zeroed elements (a new thread's memory may hold an old
// thread's shadow, whose epochs would look current).
template <typename T> bool grow(T *&buf, size_t &len, size_t want) {
    if (len >= want) return true;
    T *n = (T *)calloc(want, sizeof(T));
    if (!n) return false;
    free(buf);
    buf = n;
    len = want;
    return true;
}

// ---- the scheduler ---------------------------------------------------------------------------
// Lanes of `warp` as a bit mask of the threads that exist (a partial last warp has fewer).
u32 existing_lanes(const Block *b, u32 warp) {
    const u32 first = warp * 32, n = b->nthreads - first;
    return n >= 32 ? 0xffffffffu : ((1u << n) - 1);
}

// Completes the warp collective whose last participant just arrived, if all have.
void try_release(Block *b, u32 warp, Fiber *arrived) {
    Fiber *lanes = b->fibers + warp * 32;
    const u32 mask = arrived->mask;
    b->warp_arrived[warp] |= 1u << (arrived->linear % 32);
    if ((b->warp_arrived[warp] & mask) != mask) return;
    for (u32 l = 0; l < 32; ++l) {
        if (!(mask >> l & 1)) continue;
        const Fiber &f = lanes[l];
        if (f.coll != arrived->coll || f.mask != mask)
            fail_here(b, "lanes of warp %u meet at different warp operations (%s over %#x and %s over %#x)", warp,
                      coll_name(f.coll), f.mask, coll_name(arrived->coll), mask);
    }
    b->warp_arrived[warp] &= ~mask;
    // Everyone is here.
    switch (arrived->coll) {
    case C_SHFL:
        for (u32 l = 0; l < 32; ++l)
            if (mask >> l & 1) {
                Fiber &f = lanes[l];
                if (!(mask >> f.src & 1))
                    fail_here(b, "lane %u of warp %u shuffles from lane %u, which is not in the mask %#x", l, warp,
                              f.src, mask);
                f.result = lanes[f.src].value;
            }
        break;
    case C_VOTE: {
        u32 ballot = 0;
        for (u32 l = 0; l < 32; ++l)
            if ((mask >> l & 1) && lanes[l].value) ballot |= 1u << l;
        for (u32 l = 0; l < 32; ++l)
            if (mask >> l & 1) {
                Fiber &f = lanes[l];
                f.result = f.src == 0 ? ballot : f.src == 1 ? (ballot != 0) : (ballot == mask);
            }
        break;
    }
    case C_MMA: {
        // mma.sync.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, fragments as the PTX ISA lays
        // them out (see mma_bf16_16816 in common.cuh); f16 operands arrive widened to f32.
        float A[16][16], Bm[16][8], D[16][8];
        auto lo = [](u32 w) { u32 x = w << 16; float f; memcpy(&f, &x, 4); return f; };
        auto hi = [](u32 w) { u32 x = w & 0xffff0000u; float f; memcpy(&f, &x, 4); return f; };
        for (u32 l = 0; l < 32; ++l) {
            const u32 g = l >> 2, t = l & 3;
            const u32 *a = lanes[l].mma_a, *bb = lanes[l].mma_b;
            const float *d = lanes[l].mma_d;
            float av[8], bv[4];
            for (int i = 0; i < 8; ++i) av[i] = a ? (i & 1 ? hi(a[i / 2]) : lo(a[i / 2])) : lanes[l].mma_af[i];
            for (int i = 0; i < 4; ++i) bv[i] = a ? (i & 1 ? hi(bb[i / 2]) : lo(bb[i / 2])) : lanes[l].mma_bf[i];
            A[g][2 * t] = av[0], A[g][2 * t + 1] = av[1];
            A[g + 8][2 * t] = av[2], A[g + 8][2 * t + 1] = av[3];
            A[g][2 * t + 8] = av[4], A[g][2 * t + 9] = av[5];
            A[g + 8][2 * t + 8] = av[6], A[g + 8][2 * t + 9] = av[7];
            Bm[2 * t][g] = bv[0], Bm[2 * t + 1][g] = bv[1];
            Bm[2 * t + 8][g] = bv[2], Bm[2 * t + 9][g] = bv[3];
            D[g][2 * t] = d[0], D[g][2 * t + 1] = d[1];
            D[g + 8][2 * t] = d[2], D[g + 8][2 * t + 1] = d[3];
        }
        for (int r = 0; r < 16; ++r)
            for (int c = 0; c < 8; ++c) {
                float acc = D[r][c];
                for (int k = 0; k < 16; ++k) acc += A[r][k] * Bm[k][c];
                D[r][c] = acc;
            }
        for (u32 l = 0; l < 32; ++l) {
            const u32 g = l >> 2, t = l & 3;
            float *d = lanes[l].mma_d;
            d[0] = D[g][2 * t], d[1] = D[g][2 * t + 1], d[2] = D[g + 8][2 * t], d[3] = D[g + 8][2 * t + 1];
        }
        break;
    }
    case C_SYNC: break;
    }
    b->warp_sync[warp]++;
    for (u32 l = 0; l < 32; ++l)
        if (mask >> l & 1) lanes[l].state = READY;
}

// Joins a warp collective and waits for the rest of its mask.
void warp_collective(Block *b, Coll coll, u32 mask) {
    Fiber *f = b->cur;
    const u32 warp = f->linear / 32, lane = f->linear % 32;
    if (!(mask >> lane & 1)) fail_here(b, "%s with mask %#x, which does not include the calling lane %u", coll_name(coll), mask, lane);
    const u32 exist = existing_lanes(b, warp);
    if (mask & ~exist)
        fail_here(b, "%s with mask %#x names lanes that do not exist (the block's last warp has lanes %#x)",
                  coll_name(coll), mask, exist);
    f->coll = coll;
    f->mask = mask;
    f->state = AT_WARP;
    try_release(b, warp, f);
    if (f->state != READY) yield(b);
}

void describe_stuck(Block *b) {
    // Who waits where: the first thread at each kind of wait, and the first that exited.
    int at_block = -1, at_warp = -1, done = -1, n_block = 0, n_done = 0;
    for (u32 i = 0; i < b->nthreads; ++i) {
        const Fiber &f = b->fibers[i];
        if (f.state == AT_BLOCK) n_block++, at_block = at_block < 0 ? (int)i : at_block;
        if (f.state == AT_WARP && at_warp < 0) at_warp = (int)i;
        if (f.state == DONE) n_done++, done = done < 0 ? (int)i : done;
    }
    if (at_warp >= 0) {
        const Fiber &f = b->fibers[at_warp];
        const u32 warp = f.linear / 32;
        const Fiber *lanes = b->fibers + warp * 32;
        for (u32 l = 0; l < 32; ++l)
            if ((f.mask >> l & 1) && lanes[l].state != AT_WARP) {
                fail(b, "deadlock: thread %u waits at %s over mask %#x, but lane %u of its warp %s", f.linear,
                     coll_name(f.coll), f.mask, l,
                     lanes[l].state == AT_BLOCK ? "waits at __syncthreads" : "has exited");
                return;
            }
        fail(b, "deadlock: thread %u waits at %s over mask %#x", f.linear, coll_name(f.coll), f.mask);
        return;
    }
    fail(b, "thread %d exited without reaching the __syncthreads that %d other threads (thread %d first) wait at "
            "(%d threads exited)",
         done, n_block, at_block, n_done);
}

int run_block(const Launch *l, Dim bid, char *err, size_t err_len) {
    Workspace *ws = workspace();
    if (!ws) {
        snprintf(err, err_len, "could not map fiber stacks");
        return 1;
    }
    const u32 n = l->block.x * l->block.y * l->block.z;
    Block b{};
    b.launch = l;
    b.bid = bid;
    b.nthreads = n;
    b.fibers = ws->fibers;
    b.err = err;
    b.err_len = err_len;
    if (n == 0 || n > MAX_THREADS) {
        snprintf(err, err_len, "%u threads per block (1 to %u allowed)", n, MAX_THREADS);
        return 1;
    }
    if (!module_arena(l, &b.arena, &b.arena_len)) {
        snprintf(err, err_len, "the kernel library's shared memory could not be found");
        return 1;
    }
    if (!grow(ws->dynamic, ws->dynamic_len, l->dynamic_shared > DYNAMIC_CAP ? l->dynamic_shared : DYNAMIC_CAP) ||
        !grow(ws->shadow, ws->shadow_len, b.arena_len + l->dynamic_shared + 1)) {
        snprintf(err, err_len, "out of host memory for shared memory");
        return 1;
    }
    b.dyn = ws->dynamic;
    b.dyn_len = l->dynamic_shared;
    b.dyn_cap = ws->dynamic_len;
    b.shadow = ws->shadow;
    fill_poison(b.arena, b.arena_len);
    fill_poison(b.dyn, b.dyn_len);
    if (++ws->epoch == 0) { // wrapped: old shadow entries could look current
        memset(ws->shadow, 0, ws->shadow_len * sizeof(Shadow));
        ws->epoch = 1;
    }
    b.epoch = ws->epoch;
    for (u32 i = 0; i < n; ++i) {
        Fiber &f = b.fibers[i];
        f = Fiber{};
        f.linear = i;
        f.tid = Dim{i % l->block.x, (i / l->block.x) % l->block.y, i / (l->block.x * l->block.y)};
        f.state = READY;
        f.stack_lo = ws->stacks + (size_t)i * STACK_BYTES;
        f.sp = fiber_init(f.stack_lo);
    }
    tl_block = &b;
    for (;;) {
        bool ran = false;
        for (u32 i = 0; i < n && !b.failed; ++i) {
            Fiber &f = b.fibers[i];
            if (f.state != READY) continue;
            ran = true;
            b.cur = &f;
            switch_to(&b.sched_sp, f.sp);
        }
        if (b.failed) break;
        if (ran) continue;
        u32 done = 0, at_block = 0;
        for (u32 i = 0; i < n; ++i) {
            done += b.fibers[i].state == DONE;
            at_block += b.fibers[i].state == AT_BLOCK;
        }
        if (done == n) break;
        if (at_block == n) { // everyone reached the barrier
            b.epoch = ++ws->epoch;
            for (u32 i = 0; i < n; ++i) b.fibers[i].state = READY;
            continue;
        }
        describe_stuck(&b);
        break;
    }
    ws->epoch = b.epoch;
    tl_block = nullptr;
    return b.failed ? 1 : 0;
}

} // namespace

// ---- builtins called by kernels ------------------------------------------------------------------
EMU_EXPORT Dim emu_thread_idx() { return current()->cur->tid; }
EMU_EXPORT Dim emu_block_idx() { return current()->bid; }
EMU_EXPORT Dim emu_block_dim() { return current()->launch->block; }
EMU_EXPORT Dim emu_grid_dim() { return current()->launch->grid; }

EMU_EXPORT void emu_syncthreads() {
    Block *b = current();
    b->cur->state = AT_BLOCK;
    yield(b);
}

EMU_EXPORT void emu_syncwarp(u32 mask) { warp_collective(current(), C_SYNC, mask); }

// kind: 0 idx, 1 xor, 2 up, 3 down; `width` a power of two up to 32, lanes grouped by it.
EMU_EXPORT u64 emu_shfl(u32 mask, u64 value, int kind, int arg, int width) {
    Block *b = current();
    Fiber *f = b->cur;
    if (width <= 0 || width > 32 || (width & (width - 1)))
        fail_here(b, "warp shuffle width %d is not a power of two up to 32", width);
    const int lane = (int)(f->linear % 32), base = lane & ~(width - 1), sub = lane - base;
    int src = lane;
    switch (kind) {
    case 0: src = base + (arg & (width - 1)); break;
    case 1: src = (sub ^ arg) < width ? base + (sub ^ arg) : lane; break;
    case 2: src = sub - arg >= 0 ? lane - arg : lane; break;
    default: src = sub + arg < width ? lane + arg : lane; break;
    }
    f->value = value;
    f->src = (u32)src;
    warp_collective(b, C_SHFL, mask);
    return f->result;
}

// kind: 0 ballot, 1 any, 2 all.
EMU_EXPORT u32 emu_vote(u32 mask, int kind, int pred) {
    Block *b = current();
    b->cur->value = pred != 0;
    b->cur->src = (u32)kind;
    warp_collective(b, C_VOTE, mask);
    return (u32)b->cur->result;
}

EMU_EXPORT void emu_mma_bf16_16816(float *d, const u32 *a, const u32 *bfrag) {
    Block *b = current();
    b->cur->mma_d = d;
    b->cur->mma_a = a;
    b->cur->mma_b = bfrag;
    warp_collective(b, C_MMA, 0xffffffffu);
}

// The same product with operands already widened to f32 (the f16 mma: the header widens them).
EMU_EXPORT void emu_mma_f32frag_16816(float *d, const float *a, const float *bfrag) {
    Block *b = current();
    b->cur->mma_d = d;
    b->cur->mma_a = nullptr;
    b->cur->mma_b = nullptr;
    b->cur->mma_af = a;
    b->cur->mma_bf = bfrag;
    warp_collective(b, C_MMA, 0xffffffffu);
}

EMU_EXPORT void *emu_dynamic_shared() { return current()->dyn; }

EMU_EXPORT void emu_trap(const char *what) { fail_here(current(), "%s", what); }

// Atomics: checked like any access, then done with the host's atomics (blocks may run on several
// host threads at once).
#define EMU_ATOMIC_RMW(NAME, T, OP)                                                                            \
    EMU_EXPORT T NAME(T *p, T v) {                                                                             \
        check_access(p, sizeof(T), ATOMIC);                                                                    \
        return __atomic_fetch_##OP(p, v, __ATOMIC_RELAXED);                                                    \
    }
EMU_ATOMIC_RMW(emu_atomic_add_u32, u32, add)
EMU_ATOMIC_RMW(emu_atomic_add_i32, int32_t, add)
EMU_ATOMIC_RMW(emu_atomic_add_u64, u64, add)
EMU_ATOMIC_RMW(emu_atomic_and_u32, u32, and)
EMU_ATOMIC_RMW(emu_atomic_or_u32, u32, or)

#define EMU_ATOMIC_CAS_LOOP(NAME, T, EXPR)                                                                     \
    EMU_EXPORT T NAME(T *p, T v) {                                                                             \
        check_access(p, sizeof(T), ATOMIC);                                                                    \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                                          \
        for (;;) {                                                                                             \
            const T next = EXPR;                                                                               \
            if (__atomic_compare_exchange_n(p, &old, next, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))        \
                return old;                                                                                    \
        }                                                                                                      \
    }
EMU_ATOMIC_CAS_LOOP(emu_atomic_min_u32, u32, v < old ? v : old)
EMU_ATOMIC_CAS_LOOP(emu_atomic_max_u32, u32, v > old ? v : old)
EMU_ATOMIC_CAS_LOOP(emu_atomic_min_i32, int32_t, v < old ? v : old)
EMU_ATOMIC_CAS_LOOP(emu_atomic_max_i32, int32_t, v > old ? v : old)
EMU_ATOMIC_CAS_LOOP(emu_atomic_min_u64, u64, v < old ? v : old)
EMU_ATOMIC_CAS_LOOP(emu_atomic_max_u64, u64, v > old ? v : old)
EMU_ATOMIC_CAS_LOOP(emu_atomic_exch_u32, u32, v)
EMU_ATOMIC_CAS_LOOP(emu_atomic_exch_u64, u64, v)

// A floating-point add as a compare-and-swap loop on the bits (U: the unsigned type of F's size).
template <typename F, typename U> F atomic_add_float(F *p, F v) {
    check_access(p, sizeof(F), ATOMIC);
    U *w = (U *)p;
    U old = __atomic_load_n(w, __ATOMIC_RELAXED);
    for (;;) {
        F f;
        memcpy(&f, &old, sizeof(F));
        f += v;
        U next;
        memcpy(&next, &f, sizeof(F));
        if (__atomic_compare_exchange_n(w, &old, next, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            memcpy(&f, &old, sizeof(F));
            return f;
        }
    }
}

EMU_EXPORT float emu_atomic_add_f32(float *p, float v) { return atomic_add_float<float, u32>(p, v); }
EMU_EXPORT double emu_atomic_add_f64(double *p, double v) { return atomic_add_float<double, u64>(p, v); }

EMU_EXPORT u32 emu_atomic_cas_u32(u32 *p, u32 expected, u32 v) {
    check_access(p, 4, ATOMIC);
    __atomic_compare_exchange_n(p, &expected, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return expected;
}

EMU_EXPORT u64 emu_atomic_cas_u64(u64 *p, u64 expected, u64 v) {
    check_access(p, 8, ATOMIC);
    __atomic_compare_exchange_n(p, &expected, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return expected;
}

// ---- the instrumentation's entry points (-fsanitize=thread) -----------------------------------
#define EMU_TSAN_ACCESS(N)                                                                                      \
    EMU_EXPORT void __tsan_read##N(void *p) { check_access(p, N, READ); }                                       \
    EMU_EXPORT void __tsan_write##N(void *p) { check_access(p, N, WRITE); }                                     \
    EMU_EXPORT void __tsan_unaligned_read##N(void *p) { check_access(p, N, READ); }                             \
    EMU_EXPORT void __tsan_unaligned_write##N(void *p) { check_access(p, N, WRITE); }                           \
    EMU_EXPORT void __tsan_volatile_read##N(void *p) { check_access(p, N, READ); }                              \
    EMU_EXPORT void __tsan_volatile_write##N(void *p) { check_access(p, N, WRITE); }
EMU_TSAN_ACCESS(1)
EMU_TSAN_ACCESS(2)
EMU_TSAN_ACCESS(4)
EMU_TSAN_ACCESS(8)
EMU_TSAN_ACCESS(16)

EMU_EXPORT void __tsan_read_range(void *p, unsigned long n) { if (n) check_access(p, n, READ); }
EMU_EXPORT void __tsan_write_range(void *p, unsigned long n) { if (n) check_access(p, n, WRITE); }
EMU_EXPORT void __tsan_func_entry(void *) {}
EMU_EXPORT void __tsan_func_exit() {}
EMU_EXPORT void __tsan_init() {}
EMU_EXPORT void __tsan_vptr_update(void **, void *) {}
EMU_EXPORT void __tsan_vptr_read(void **) {}
EMU_EXPORT void *__tsan_memcpy(void *d, const void *s, unsigned long n) {
    if (n) {
        check_access(s, n, READ);
        check_access(d, n, WRITE);
    }
    return memcpy(d, s, n);
}
EMU_EXPORT void *__tsan_memmove(void *d, const void *s, unsigned long n) {
    if (n) {
        check_access(s, n, READ);
        check_access(d, n, WRITE);
    }
    return memmove(d, s, n);
}
EMU_EXPORT void *__tsan_memset(void *d, int c, unsigned long n) {
    if (n) check_access(d, n, WRITE);
    return memset(d, c, n);
}

// ---- the entry point of the Rust side ------------------------------------------------------------
// Runs block `bid` of launch `l`; 0 on success, else 1 with a message in `err`.
EMU_EXPORT int emma_emu_run_block(const Launch *l, u32 bx, u32 by, u32 bz, char *err, u64 err_len) {
    return run_block(l, Dim{bx, by, bz}, err, (size_t)err_len);
}

// The layout version the Rust side checks before its first launch.
EMU_EXPORT u32 emma_emu_abi() { return (u32)(sizeof(Launch) * 1000 + sizeof(Extent)); }

