/* pmm.c -- physical memory manager with the accounting the Dynamic Memory VSC reports.
 *
 * Memory is kept in 2 MiB blocks. A block is whole (one state for all 512 pages: free, allocated or
 * ballooned, one bit in a bitmap) or split (a descriptor with per-page present/free/balloon bits).
 * Whole blocks cost O(1) to hand out, free or balloon; per-page bits are only touched at the edges of
 * a range. Nothing is ever zeroed: host memory is zero on first touch, and the CPL0 emulator here
 * makes every instruction count.
 *
 * Counters, in 4 KiB pages: visible (RAM the guest knows: boot RAM + hot-added), free, committed
 * (promised to allocations, touched or not; may exceed free), ballooned, hot_added. */
#include "kernel.h"

#define NBLOCKS (MAX_PHYS / BLOCK_SIZE)
#define NWORDS (NBLOCKS / 64)
#define NSPLIT 1024
#define BLOCK_WORDS (BLOCK_PAGES / 64)

enum { ALLOC, FREE, BALLOON };

static u64 ram_bm[NWORDS];     /* block holds RAM known to the pmm (whole or split) */
static u64 free_bm[NWORDS];    /* whole block, free */
static u64 balloon_bm[NWORDS]; /* whole block, ballooned */
static u64 partial_bm[NWORDS]; /* split block with at least one free page */
static u64 split_bm[NWORDS];   /* block has a split descriptor */
static u64 hinted_bm[NWORDS];  /* whole free block the host was told of (free-page hint) since it was freed */
static u64 free_gen;           /* counts frees: a hint pass has nothing new to find while it stays */
static u64 n_hinting;          /* free pages out of the allocator while the host discards them */
static u64 free_hint, partial_hint; /* lowest words of free_bm / partial_bm that may be non-zero */

struct split {
    u64 present[BLOCK_WORDS], free[BLOCK_WORDS], balloon[BLOCK_WORDS];
    u32 block, in_use;
    u32 npresent, nfree, nballoon;
};
/* not zeroed at boot: a descriptor index is valid only below split_hwm and if it points back */
static struct split splits[NSPLIT] __attribute__((section(".bss.noinit")));
static u16 split_of[NBLOCKS] __attribute__((section(".bss.noinit")));
static u16 split_stack[NSPLIT] __attribute__((section(".bss.noinit")));
static u32 split_hwm, split_nstack;

static u64 n_visible, n_free, n_committed, n_ballooned, n_hot_added, n_free_blocks;

/* ---------------------------------------------------------------- bit ranges, a word at a time */
static u64 word_mask(u64 w, u64 from, u64 to)
{
    u64 lo = from > w * 64 ? from - w * 64 : 0;
    u64 hi = to < w * 64 + 64 ? to - w * 64 : 64;
    u64 m = hi == 64 ? ~0UL : (1UL << hi) - 1;
    return m & ~((1UL << lo) - 1);
}
static int bm_any(const u64 *bm, u64 from, u64 to)
{
    for (u64 w = from / 64; w * 64 < to; w++)
        if (bm[w] & word_mask(w, from, to))
            return 1;
    return 0;
}
static int bm_all(const u64 *bm, u64 from, u64 to)
{
    for (u64 w = from / 64; w * 64 < to; w++) {
        u64 m = word_mask(w, from, to);
        if ((bm[w] & m) != m)
            return 0;
    }
    return 1;
}
static void bm_set(u64 *bm, u64 from, u64 to)
{
    for (u64 w = from / 64; w * 64 < to; w++)
        bm[w] |= word_mask(w, from, to);
}
static void bm_clear(u64 *bm, u64 from, u64 to)
{
    for (u64 w = from / 64; w * 64 < to; w++)
        bm[w] &= ~word_mask(w, from, to);
}
static int test(const u64 *bm, u64 b) { return (bm[b / 64] >> (b % 64)) & 1; }
static void set1(u64 *bm, u64 b, u64 *hint)
{
    bm[b / 64] |= 1UL << (b % 64);
    if (hint && b / 64 < *hint)
        *hint = b / 64;
}
static void clear1(u64 *bm, u64 b) { bm[b / 64] &= ~(1UL << (b % 64)); }
static s64 find_first(const u64 *bm, u64 *hint)
{
    for (u64 w = *hint; w < NWORDS; w++) {
        if (bm[w]) {
            *hint = w;
            return (s64)(w * 64 + lowest_bit(bm[w]));
        }
    }
    *hint = NWORDS;
    return -1;
}

/* ---------------------------------------------------------------- split descriptors */
static struct split *split_get(u64 b)
{
    u32 i = split_of[b];
    if (i < split_hwm && splits[i].in_use && splits[i].block == b)
        return &splits[i];
    return NULL;
}

static int split_available(void) { return split_nstack > 0 || split_hwm < NSPLIT; }

/* turn block b into a split descriptor; a whole block's state becomes every page's state */
static struct split *split_make(u64 b)
{
    u32 i;
    if (split_nstack)
        i = split_stack[--split_nstack];
    else if (split_hwm < NSPLIT)
        i = split_hwm++;
    else
        return NULL;
    struct split *s = &splits[i];
    s->block = (u32)b;
    s->in_use = 1;
    int ram = test(ram_bm, b), fr = ram && test(free_bm, b), bal = ram && test(balloon_bm, b);
    for (int w = 0; w < (int)BLOCK_WORDS; w++) {
        s->present[w] = ram ? ~0UL : 0;
        s->free[w] = fr ? ~0UL : 0;
        s->balloon[w] = bal ? ~0UL : 0;
    }
    s->npresent = ram ? BLOCK_PAGES : 0;
    s->nfree = fr ? BLOCK_PAGES : 0;
    s->nballoon = bal ? BLOCK_PAGES : 0;
    if (fr) {
        clear1(free_bm, b);
        clear1(hinted_bm, b);
        n_free_blocks--;
        set1(partial_bm, b, &partial_hint);
    }
    clear1(balloon_bm, b);
    set1(ram_bm, b, NULL);
    set1(split_bm, b, NULL);
    split_of[b] = (u16)i;
    return s;
}

/* a split block whose 512 pages share one state goes back to a whole block */
static void split_maybe_merge(struct split *s)
{
    u64 b = s->block;
    if (s->npresent != BLOCK_PAGES)
        return;
    int st;
    if (s->nfree == BLOCK_PAGES)
        st = FREE;
    else if (s->nballoon == BLOCK_PAGES)
        st = BALLOON;
    else if (s->nfree == 0 && s->nballoon == 0)
        st = ALLOC;
    else
        return;
    s->in_use = 0;
    clear1(split_bm, b);
    split_stack[split_nstack++] = (u16)(s - splits);
    clear1(partial_bm, b);
    if (st == FREE) {
        set1(free_bm, b, &free_hint);
        n_free_blocks++;
    } else if (st == BALLOON) {
        set1(balloon_bm, b, NULL);
    }
}

/* ---------------------------------------------------------------- state changes over page ranges */
static int block_state(u64 b) /* of a whole (not split) RAM block */
{
    return test(free_bm, b) ? FREE : test(balloon_bm, b) ? BALLOON : ALLOC;
}

static int split_pages_in_state(const struct split *s, u64 from, u64 to, int st)
{
    if (!bm_all(s->present, from, to))
        return 0;
    if (st == FREE)
        return bm_all(s->free, from, to);
    if (st == BALLOON)
        return bm_all(s->balloon, from, to);
    return !bm_any(s->free, from, to) && !bm_any(s->balloon, from, to);
}

/* Move pages [pfn, pfn + n) from state `from` to state `to`. Checks the whole range first and
 * changes nothing if any page is not RAM or not in `from`. */
/* 64 whole, unsplit RAM blocks (one bitmap word) all in state st */
static int word_in_state(u64 w, int st)
{
    if (ram_bm[w] != ~0UL || split_bm[w])
        return 0;
    if (st == FREE)
        return free_bm[w] == ~0UL;
    if (st == BALLOON)
        return balloon_bm[w] == ~0UL;
    return !free_bm[w] && !balloon_bm[w];
}

/* [p, end) starts on a 64-block boundary and covers the next 64 blocks whole */
static int covers_word(u64 p, u64 end) { return p % (64 * BLOCK_PAGES) == 0 && end - p >= 64 * BLOCK_PAGES; }

static int change(u64 pfn, u64 n, int from, int to)
{
    if (n == 0 || pfn >= MAX_PHYS / PAGE_SIZE || n > MAX_PHYS / PAGE_SIZE - pfn)
        return -1;
    u64 end = pfn + n, need_splits = 0;
    for (u64 p = pfn; p < end;) {
        if (covers_word(p, end) && word_in_state(p / BLOCK_PAGES / 64, from)) {
            p += 64 * BLOCK_PAGES; /* 128 MiB checked with a few instructions */
            continue;
        }
        u64 b = p / BLOCK_PAGES, lo = p % BLOCK_PAGES;
        u64 hi = end - b * BLOCK_PAGES < BLOCK_PAGES ? end - b * BLOCK_PAGES : BLOCK_PAGES;
        struct split *s = split_get(b);
        if (s) {
            if (!split_pages_in_state(s, lo, hi, from))
                return -1;
        } else {
            if (!test(ram_bm, b) || block_state(b) != from)
                return -1;
            if (hi - lo != BLOCK_PAGES)
                need_splits++;
        }
        p = b * BLOCK_PAGES + hi;
    }
    if (need_splits > NSPLIT - split_hwm + split_nstack)
        return -1;
    for (u64 p = pfn; p < end;) {
        if (covers_word(p, end) && word_in_state(p / BLOCK_PAGES / 64, from)) {
            u64 w = p / BLOCK_PAGES / 64;
            if (from == FREE) {
                free_bm[w] = 0;
                hinted_bm[w] = 0;
                n_free_blocks -= 64;
            } else if (from == BALLOON) {
                balloon_bm[w] = 0;
            }
            if (to == FREE) {
                free_bm[w] = ~0UL;
                n_free_blocks += 64;
                if (w < free_hint)
                    free_hint = w;
            } else if (to == BALLOON) {
                balloon_bm[w] = ~0UL;
            }
            p += 64 * BLOCK_PAGES;
            continue;
        }
        u64 b = p / BLOCK_PAGES, lo = p % BLOCK_PAGES;
        u64 hi = end - b * BLOCK_PAGES < BLOCK_PAGES ? end - b * BLOCK_PAGES : BLOCK_PAGES;
        struct split *s = split_get(b);
        if (!s && hi - lo == BLOCK_PAGES) {
            if (from == FREE) {
                clear1(free_bm, b);
                clear1(hinted_bm, b);
                n_free_blocks--;
            } else if (from == BALLOON) {
                clear1(balloon_bm, b);
            }
            if (to == FREE) {
                set1(free_bm, b, &free_hint);
                n_free_blocks++;
            } else if (to == BALLOON) {
                set1(balloon_bm, b, NULL);
            }
        } else {
            if (!s)
                s = split_make(b);
            u32 cnt = (u32)(hi - lo);
            if (from == FREE) {
                bm_clear(s->free, lo, hi);
                s->nfree -= cnt;
                if (!s->nfree)
                    clear1(partial_bm, b);
            } else if (from == BALLOON) {
                bm_clear(s->balloon, lo, hi);
                s->nballoon -= cnt;
            }
            if (to == FREE) {
                bm_set(s->free, lo, hi);
                s->nfree += cnt;
                set1(partial_bm, b, &partial_hint);
            } else if (to == BALLOON) {
                bm_set(s->balloon, lo, hi);
                s->nballoon += cnt;
            }
            split_maybe_merge(s);
        }
        p = b * BLOCK_PAGES + hi;
    }
    if (from == FREE)
        n_free -= n;
    if (to == FREE) {
        n_free += n;
        free_gen++;
    }
    return 0;
}

/* add RAM [pfn, pfn + n) as free pages; refuses overlap with RAM already known */
static int add_ram(u64 pfn, u64 n)
{
    u64 end = pfn + n, need_splits = 0;
    for (u64 p = pfn; p < end;) {
        u64 b = p / BLOCK_PAGES, lo = p % BLOCK_PAGES;
        u64 hi = end - b * BLOCK_PAGES < BLOCK_PAGES ? end - b * BLOCK_PAGES : BLOCK_PAGES;
        if (hi - lo == BLOCK_PAGES && lo == 0 && !test(ram_bm, b)) {
            /* a run of whole blocks: check and skip a word at a time */
            u64 bend = end / BLOCK_PAGES;
            if (bm_any(ram_bm, b, bend))
                return -1;
            p = bend * BLOCK_PAGES;
            continue;
        }
        struct split *s = split_get(b);
        if (s ? bm_any(s->present, lo, hi) : test(ram_bm, b))
            return -1;
        if (!s)
            need_splits++;
        p = b * BLOCK_PAGES + hi;
    }
    if (need_splits > NSPLIT - split_hwm + split_nstack)
        return -1;
    for (u64 p = pfn; p < end;) {
        u64 b = p / BLOCK_PAGES, lo = p % BLOCK_PAGES;
        u64 hi = end - b * BLOCK_PAGES < BLOCK_PAGES ? end - b * BLOCK_PAGES : BLOCK_PAGES;
        if (hi - lo == BLOCK_PAGES && !split_get(b)) {
            u64 bend = end / BLOCK_PAGES;
            bm_set(ram_bm, b, bend);
            bm_set(free_bm, b, bend);
            if (b / 64 < free_hint)
                free_hint = b / 64;
            n_free_blocks += bend - b;
            p = bend * BLOCK_PAGES;
            continue;
        }
        struct split *s = split_get(b);
        if (!s)
            s = split_make(b); /* not RAM yet: a descriptor with nothing present */
        bm_set(s->present, lo, hi);
        bm_set(s->free, lo, hi);
        s->npresent += (u32)(hi - lo);
        s->nfree += (u32)(hi - lo);
        set1(partial_bm, b, &partial_hint);
        split_maybe_merge(s);
        p = b * BLOCK_PAGES + hi;
    }
    n_visible += n;
    n_free += n;
    return 0;
}

void pmm_init(u64 free_from)
{
    free_from = (free_from + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
    for (u32 i = 0; i < boot.nr_memmap; i++) {
        const struct memmap_entry *e = &boot.memmap[i];
        if (e->type != 1 || e->size == 0 || e->base >= MAX_PHYS)
            continue;
        u64 base = (e->base + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
        u64 end = e->size > MAX_PHYS - e->base ? MAX_PHYS : (e->base + e->size) & ~(PAGE_SIZE - 1);
        if (end <= base)
            continue;
        if (add_ram(base / PAGE_SIZE, (end - base) / PAGE_SIZE)) {
            printf("pmm: memory map entry %u [%lx, %lx) overlaps another: ignored\n", i, base, end);
            continue;
        }
        /* RAM under the image and boot structures is the kernel's: allocated and committed */
        u64 kernel_end = end < free_from ? end : free_from;
        if (kernel_end > base) {
            change(base / PAGE_SIZE, (kernel_end - base) / PAGE_SIZE, FREE, ALLOC);
            n_committed += (kernel_end - base) / PAGE_SIZE;
        }
    }
}

/* Every public function below takes pmm_lock: CPUs allocate for their tasks while CPU 0 runs the
 * shell and the Dynamic Memory VSC. pmm_init runs before the other CPUs start. */
static spinlock_t pmm_lock;

void pmm_stats(struct pmm_stats *s)
{
    u64 f = spin_lock(&pmm_lock);
    s->visible = n_visible;
    s->free = n_free + n_hinting; /* free all the same: back in the allocator in a moment */
    s->committed = n_committed;
    s->ballooned = n_ballooned;
    s->hot_added = n_hot_added;
    spin_unlock(&pmm_lock, f);
}

void pmm_commit(u64 pages)
{
    u64 f = spin_lock(&pmm_lock);
    n_committed += pages;
    spin_unlock(&pmm_lock, f);
}

void pmm_uncommit(u64 pages)
{
    u64 f = spin_lock(&pmm_lock);
    n_committed -= pages < n_committed ? pages : n_committed;
    spin_unlock(&pmm_lock, f);
}

static int append(struct pmm_range *out, u32 max_out, u32 *nout, u64 pfn, u64 n)
{
    if (*nout && out[*nout - 1].base + out[*nout - 1].pages * PAGE_SIZE == pfn * PAGE_SIZE) {
        out[*nout - 1].pages += n;
        return 0;
    }
    if (*nout == max_out)
        return -1;
    out[*nout].base = pfn * PAGE_SIZE;
    out[*nout].pages = n;
    (*nout)++;
    return 0;
}

/* one run of free pages, at most `want` and within one block: a whole block when want >= 512 */
static u64 take_run(u64 want, u64 *pfn)
{
    s64 b;
    if (want >= BLOCK_PAGES && (b = find_first(free_bm, &free_hint)) >= 0) {
        /* a run of consecutive free blocks, a word at a time where it can */
        u64 first = (u64)b, last = first + 1, max = first + want / BLOCK_PAGES;
        if (max > NBLOCKS)
            max = NBLOCKS;
        while (last < max) {
            if (last % 64 == 0 && last + 64 <= max && free_bm[last / 64] == ~0UL)
                last += 64;
            else if (test(free_bm, last))
                last++;
            else
                break;
        }
        *pfn = first * BLOCK_PAGES;
        return (last - first) * BLOCK_PAGES;
    }
    b = find_first(partial_bm, &partial_hint);
    if (b >= 0) {
        struct split *s = split_get((u64)b);
        if (!s) { /* cannot happen: partial_bm marks split blocks only; do not trust it blindly */
            clear1(partial_bm, (u64)b);
            return 0;
        }
        u64 w = 0;
        while (!s->free[w])
            w++;
        u64 first = w * 64 + lowest_bit(s->free[w]), last = first + 1;
        while (last < BLOCK_PAGES && last - first < want) {
            u64 bits = s->free[last / 64] >> (last % 64);
            if (last % 64 == 0 && bits == ~0UL && last - first + 64 <= want) {
                last += 64;
                continue;
            }
            if (!(bits & 1))
                break;
            last++;
        }
        *pfn = (u64)b * BLOCK_PAGES + first;
        return last - first;
    }
    if (!split_available())
        return 0;
    b = find_first(free_bm, &free_hint); /* split a whole free block for a small request */
    if (b < 0)
        return 0;
    *pfn = (u64)b * BLOCK_PAGES;
    return want < BLOCK_PAGES ? want : BLOCK_PAGES;
}

/* Allocate up to `pages` pages, 2 MiB blocks first, as at most max_out ranges. Returns the number of
 * pages allocated (less than asked when memory or ranges ran out). Commit is the caller's business. */
static u64 alloc(u64 pages, struct pmm_range *out, u32 max_out, u32 *nout)
{
    u64 got = 0, pfn;
    *nout = 0;
    while (got < pages) {
        u64 n = take_run(pages - got, &pfn);
        if (!n || change(pfn, n, FREE, ALLOC))
            break;
        if (append(out, max_out, nout, pfn, n)) {
            change(pfn, n, ALLOC, FREE);
            break;
        }
        got += n;
    }
    return got;
}

u64 pmm_alloc(u64 pages, struct pmm_range *out, u32 max_out, u32 *nout)
{
    u64 f = spin_lock(&pmm_lock);
    u64 got = alloc(pages, out, max_out, nout);
    spin_unlock(&pmm_lock, f);
    return got;
}

int pmm_free(u64 base, u64 pages)
{
    if (base % PAGE_SIZE)
        return -1;
    u64 f = spin_lock(&pmm_lock);
    int r = change(base / PAGE_SIZE, pages, ALLOC, FREE);
    spin_unlock(&pmm_lock, f);
    return r;
}

int pmm_hot_add(u64 base, u64 pages)
{
    if (base % PAGE_SIZE || pages == 0 || base >= MAX_PHYS || pages > (MAX_PHYS - base) / PAGE_SIZE) {
        printf("pmm: hot-add [%lx, +%lu pages) is not page-aligned or not below 64 GiB\n", base, pages);
        return -1;
    }
    u64 f = spin_lock(&pmm_lock);
    int r = add_ram(base / PAGE_SIZE, pages);
    if (!r)
        n_hot_added += pages;
    spin_unlock(&pmm_lock, f);
    if (r)
        printf("pmm: hot-add [%lx, +%lu pages) overlaps RAM the guest already has\n", base, pages);
    return r ? -1 : 0;
}

/* Linux hv_balloon's compute_balloon_floor(): never balloon the guest below this many pages.
 * Linux sizes it by totalram_pages, which hot-added memory raises; the floor is also part of the
 * committed memory the DM status reports, so each hot-add would raise the demand it answered
 * (by 1/8 of the add between 512 MiB and 2 GiB: the host adds again, smaller and smaller, and
 * with a buffer of (slope^-1 - 1) or more, 700 % there, it runs to the VM's maximum). Here the
 * RAM it is sized by is at most the boot RAM: memory the host adds does not raise the demand,
 * and ballooning lowers the floor as in Linux (ballooned pages leave totalram_pages). */
static u64 balloon_floor(void)
{
    u64 ram = n_visible - n_ballooned, mb = 256; /* pages per MiB */
    if (ram > n_visible - n_hot_added)
        ram = n_visible - n_hot_added; /* the boot RAM: docs/guest-vsc.md, "the floor" */
    if (ram < 128 * mb)
        return 8 * mb + ram / 2;
    if (ram < 512 * mb)
        return 40 * mb + ram / 4;
    if (ram < 2048 * mb)
        return 104 * mb + ram / 8;
    if (ram < 8192 * mb)
        return 232 * mb + ram / 16;
    return 488 * mb + ram / 32;
}

u64 pmm_balloon_floor(void)
{
    u64 f = spin_lock(&pmm_lock);
    u64 r = balloon_floor();
    spin_unlock(&pmm_lock, f);
    return r;
}

/* Take up to max_pages free pages out of the guest (2 MiB runs first), leaving floor_pages free.
 * Returns the pages taken; their ranges are in out[0..*nout). */
u64 (*pmm_reclaim_hook)(u64 pages);

/* With a page file, pages of tasks are paged out first for what the free pages above the floor
 * lack (a guest under pressure pages, then balloons), at most RECLAIM_MAX pages per call. */
#define RECLAIM_MAX 4096
u64 pmm_balloon_take(u64 max_pages, u64 floor_pages, struct pmm_range *out, u32 max_out, u32 *nout)
{
    if (pmm_reclaim_hook) {
        u64 f = spin_lock(&pmm_lock);
        u64 avail = n_free > floor_pages ? n_free - floor_pages : 0;
        spin_unlock(&pmm_lock, f);
        if (avail < max_pages)
            pmm_reclaim_hook(max_pages - avail < RECLAIM_MAX ? max_pages - avail : RECLAIM_MAX);
    }
    u64 f = spin_lock(&pmm_lock);
    u64 avail = n_free > floor_pages ? n_free - floor_pages : 0;
    u64 got = alloc(max_pages < avail ? max_pages : avail, out, max_out, nout);
    for (u32 i = 0; i < *nout; i++)
        change(out[i].base / PAGE_SIZE, out[i].pages, ALLOC, BALLOON);
    n_ballooned += got;
    spin_unlock(&pmm_lock, f);
    return got;
}

/* Give back a range the host returns; every page must have been ballooned. */
int pmm_balloon_give(u64 base, u64 pages)
{
    u64 f = spin_lock(&pmm_lock);
    int r = base % PAGE_SIZE || change(base / PAGE_SIZE, pages, BALLOON, FREE);
    if (!r)
        n_ballooned -= pages;
    spin_unlock(&pmm_lock, f);
    if (r) {
        printf("pmm: unballoon [%lx, +%lu pages): not all of it is ballooned\n", base, pages);
        return -1;
    }
    return 0;
}

/* Give back up to max_pages ballooned pages, lowest first: the DM VSC starts over and the host's
 * balloon is gone with its channel. Returns the pages given back. */
u64 pmm_balloon_return(u64 max_pages)
{
    u64 f = spin_lock(&pmm_lock), done = 0;
    for (u64 b = 0; b < NBLOCKS && done < max_pages;) {
        u64 lo = 0, n = 0;
        if (!test(ram_bm, b)) {
            b++;
            continue;
        }
        const struct split *s = split_get(b);
        if (!s) {
            n = test(balloon_bm, b) ? BLOCK_PAGES : 0;
        } else { /* the first ballooned run of the block */
            while (lo < BLOCK_PAGES && !((s->balloon[lo / 64] >> (lo % 64)) & 1))
                lo++;
            while (lo + n < BLOCK_PAGES && ((s->balloon[(lo + n) / 64] >> ((lo + n) % 64)) & 1))
                n++;
        }
        if (!n) {
            b++;
            continue;
        }
        if (n > max_pages - done)
            n = max_pages - done;
        if (change(b * BLOCK_PAGES + lo, n, BALLOON, FREE))
            break; /* no split descriptor left: keep the rest */
        n_ballooned -= n;
        done += n; /* and look at the same block again */
    }
    spin_unlock(&pmm_lock, f);
    return done;
}

/* ---------------------------------------------------------------- free-page hints */
u64 pmm_free_gen(void) { return free_gen; }

/* Take whole free blocks the host has not been told of, as runs (at most max_out ranges): they
 * leave the free pool until pmm_hint_done, so nothing is written to them while the host discards
 * them. Returns the pages taken. */
u64 pmm_hint_take(struct pmm_range *out, u32 max_out, u32 *nout)
{
    u64 f = spin_lock(&pmm_lock), got = 0;
    *nout = 0;
    for (u64 w = free_hint; w < NWORDS; w++) {
        u64 cand = free_bm[w] & ~hinted_bm[w];
        while (cand) {
            u64 lo = lowest_bit(cand), hi = lo;
            while (hi < 64 && ((cand >> hi) & 1))
                hi++;
            u64 pfn = (w * 64 + lo) * BLOCK_PAGES, n = (hi - lo) * BLOCK_PAGES;
            if (change(pfn, n, FREE, ALLOC))
                goto out;
            if (append(out, max_out, nout, pfn, n)) {
                change(pfn, n, ALLOC, FREE); /* no room for another range: the next pass */
                goto out;
            }
            got += n;
            cand = hi == 64 ? 0 : cand & ~((1UL << hi) - 1);
        }
    }
out:
    n_hinting += got;
    spin_unlock(&pmm_lock, f);
    return got;
}

/* the first whole ballooned block as a dm_mem_page_range (for a hostile hint); -1 if none */
int pmm_first_ballooned_block(u64 *range)
{
    u64 f = spin_lock(&pmm_lock), hint = 0;
    s64 b = find_first(balloon_bm, &hint);
    spin_unlock(&pmm_lock, f);
    if (b < 0)
        return -1;
    *range = ((u64)b * BLOCK_PAGES) | ((u64)BLOCK_PAGES << 40);
    return 0;
}

/* The host has discarded them (or refused): the blocks are free again, and told of. */
void pmm_hint_done(const struct pmm_range *r, u32 n)
{
    u64 f = spin_lock(&pmm_lock), gen = free_gen;
    for (u32 i = 0; i < n; i++) {
        u64 b = r[i].base / BLOCK_SIZE, nb = r[i].pages / BLOCK_PAGES;
        if (change(r[i].base / PAGE_SIZE, r[i].pages, ALLOC, FREE))
            continue;
        n_hinting -= r[i].pages;
        for (u64 k = 0; k < nb; k++)
            set1(hinted_bm, b + k, NULL);
    }
    free_gen = gen; /* these frees are no news for the next hint pass */
    spin_unlock(&pmm_lock, f);
}

/* A misbehaving guest, for the host's tests: write one word to each of up to max_pages pages
 * the host holds ballooned (the host punched them out; a well-behaved guest never touches
 * them). Returns the pages written. */
u64 pmm_balloon_touch(u64 max_pages)
{
    u64 done = 0;
    for (u64 b = 0; b < NBLOCKS && done < max_pages; b++) {
        if (!test(ram_bm, b))
            continue;
        const struct split *s = test(split_bm, b) ? split_get(b) : 0;
        if (!s && !test(balloon_bm, b))
            continue;
        for (u64 i = 0; i < BLOCK_PAGES && done < max_pages; i++) {
            if (s && !((s->balloon[i / 64] >> (i % 64)) & 1))
                continue;
            *(volatile u64 *)((b * BLOCK_PAGES + i) * PAGE_SIZE) = 0x7e7e7e7e7e7e7e7eUL;
            done++;
        }
    }
    return done;
}

/* recount free and ballooned pages from the bitmaps and compare with the counters */
static int check(void)
{
    u64 fr = 0, bal = 0, present = 0, free_blocks = 0;
    for (u64 b = 0; b < NBLOCKS; b++) {
        if (!ram_bm[b / 64]) {
            b |= 63;
            continue;
        }
        if (!test(ram_bm, b))
            continue;
        struct split *s = split_get(b);
        if (s) {
            fr += s->nfree;
            bal += s->nballoon;
            present += s->npresent;
            if (!!test(partial_bm, b) != !!s->nfree || !test(split_bm, b))
                return -1;
        } else {
            present += BLOCK_PAGES;
            free_blocks += test(free_bm, b);
            fr += test(free_bm, b) ? BLOCK_PAGES : 0;
            if (test(free_bm, b) && test(balloon_bm, b))
                return -1;
            bal += test(balloon_bm, b) ? BLOCK_PAGES : 0;
        }
    }
    if (fr != n_free || bal != n_ballooned || present != n_visible || free_blocks != n_free_blocks)
        return -1;
    return 0;
}

int pmm_check(void)
{
    u64 f = spin_lock(&pmm_lock);
    int r = check();
    spin_unlock(&pmm_lock, f);
    return r;
}

/* ---------------------------------------------------------------- hot-remove */
/* Drop pages [pfn, pfn + n), all allocated just now by the caller, from the RAM the pmm knows:
 * offline, never handed out again until the host adds them again. A block partly dropped must
 * have a descriptor already (the tail of a region: hot-added regions start on a block). */
static void drop_ram(u64 pfn, u64 n)
{
    u64 end = pfn + n;
    for (u64 p = pfn; p < end;) {
        u64 b = p / BLOCK_PAGES, lo = p % BLOCK_PAGES;
        u64 hi = end - b * BLOCK_PAGES < BLOCK_PAGES ? end - b * BLOCK_PAGES : BLOCK_PAGES;
        struct split *s = split_get(b);
        if (!s) {
            clear1(ram_bm, b); /* a whole block (the caller checked) */
        } else {
            bm_clear(s->present, lo, hi);
            s->npresent -= (u32)(hi - lo);
            if (!s->npresent) { /* nothing of it is RAM any more: the descriptor goes */
                s->in_use = 0;
                split_stack[split_nstack++] = (u16)(s - splits);
                clear1(split_bm, b);
                clear1(ram_bm, b);
                clear1(partial_bm, b);
            }
        }
        p = b * BLOCK_PAGES + hi;
    }
    n_visible -= n;
    n_hot_added -= n < n_hot_added ? n : n_hot_added;
}

/* Take a whole hot-added region offline if every page of it is free and at least floor_pages stay
 * free. 0, or -1 (nothing changed). */
int pmm_hot_remove_region(u64 base, u64 pages, u64 floor_pages)
{
    if (base % BLOCK_SIZE || !pages || base >= MAX_PHYS || pages > (MAX_PHYS - base) / PAGE_SIZE)
        return -1;
    u64 f = spin_lock(&pmm_lock), pfn = base / PAGE_SIZE, tail = (pfn + pages) / BLOCK_PAGES;
    int r = -1;
    if (n_free >= floor_pages + pages && ((pfn + pages) % BLOCK_PAGES == 0 || split_get(tail)) &&
        !change(pfn, pages, FREE, ALLOC)) {
        drop_ram(pfn, pages);
        r = 0;
    }
    spin_unlock(&pmm_lock, f);
    return r;
}

/* Take up to max_pages of whole free 2 MiB blocks of a hot-added region offline, highest first,
 * leaving floor_pages free; their ranges go to out[0..*nout). Returns the pages taken. */
u64 pmm_hot_remove_blocks(u64 base, u64 pages, u64 max_pages, u64 floor_pages, struct pmm_range *out, u32 max_out,
                          u32 *nout)
{
    u64 f = spin_lock(&pmm_lock), got = 0;
    u64 first = (base / PAGE_SIZE + BLOCK_PAGES - 1) / BLOCK_PAGES, end = (base / PAGE_SIZE + pages) / BLOCK_PAGES;
    if (end > NBLOCKS)
        end = NBLOCKS;
    *nout = 0;
    for (u64 b = end; b-- > first && got + BLOCK_PAGES <= max_pages && n_free >= floor_pages + BLOCK_PAGES;) {
        if (!test(free_bm, b) || test(split_bm, b))
            continue;
        int merge = *nout && out[*nout - 1].base == (b + 1) * BLOCK_SIZE;
        if (!merge && *nout == max_out)
            break;
        if (change(b * BLOCK_PAGES, BLOCK_PAGES, FREE, ALLOC))
            continue;
        drop_ram(b * BLOCK_PAGES, BLOCK_PAGES);
        if (merge) {
            out[*nout - 1].base -= BLOCK_SIZE;
            out[*nout - 1].pages += BLOCK_PAGES;
        } else {
            out[*nout].base = b * BLOCK_SIZE;
            out[*nout].pages = BLOCK_PAGES;
            (*nout)++;
        }
        got += BLOCK_PAGES;
    }
    spin_unlock(&pmm_lock, f);
    return got;
}
