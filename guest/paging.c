/* paging.c -- the guest pages: a testlimit task's memory lives in a window of 4 KiB pages of its own
 * above the identity map (64 GiB + 8 GiB x task slot); when free memory runs out (a balloon request
 * the free pages cannot meet, or a fault with no free page), the least recently used pages of the
 * windows go to the page file, the storage VSC's disk, and come back when the task touches them.
 *
 * A page table entry says it all: present (a frame), or not present with PG_SWAP and the page file
 * slot in bits 12.. (paged out), or 0 (not touched yet: zero-fill on demand; the task writes each page
 * whole before it reads it). The clock walks the windows' entries with a second chance per page table
 * (the accessed bit of the directory entry above 512 pages); a batch of up to 16 victims goes out in one WRITE to 16 consecutive slots. Page-in is one
 * READ of the slot into a free frame. Everything here runs at CPL0, which this machine's KVM
 * emulates: per page only a few instructions; the data moves host-side (the VSP writes the frames).
 *
 * Locking: callers hold task_lock (the fault path and task.c's reclaim entry), so no task is
 * scheduled while its entries change; a window whose task runs on another CPU is skipped, and every
 * CPU flushes its TLB before it next enters a task (paging_gen). */
#include "kernel.h"

#define WIN_BASE (64UL << 30)
#define WIN_GIB 8
#define WIN_PAGES ((u64)WIN_GIB << 18)
#define PDPT_FIRST 64 /* PDPT entry of WIN_BASE */
#define PG_P 1UL
#define PG_W 2UL
#define PG_U 4UL
#define PG_A 0x20UL
#define PG_SWAP 0x200UL
#define ADDR 0x000FFFFFFFFFF000UL
#define BATCH 16
#define SLOT_SECTORS (PAGE_SIZE / 512)

struct window {
    u64 *pd[WIN_GIB]; /* page directories, one per GiB of the window in use */
    u64 pages;        /* the task's virtual pages [0, pages) */
    u64 resident, swapped, tables;
    u32 used;
};

static struct window win[PAGING_WINDOWS];
static u64 *slot_bm, nslots, slot_words, slot_hint;
static u32 clock_w;
static u64 clock_vpn;
static struct paging_stats st;
static int active;

static inline void invlpg_all(void)
{
    paging_gen++;
    write_cr3(read_cr3());
}

static u64 window_va(const struct window *w, u64 vpn)
{
    return WIN_BASE + (u64)(w - win) * (WIN_PAGES * PAGE_SIZE) + vpn * PAGE_SIZE;
}

static inline void invlpg(const struct window *w, u64 vpn)
{
    __asm__ volatile("invlpg (%0)" ::"r"(window_va(w, vpn)) : "memory");
}

static void zero_page(void *p)
{
    u64 n = PAGE_SIZE / 8;
    __asm__ volatile("rep stosq" : "+D"(p), "+c"(n) : "a"(0UL) : "memory");
}

/* one page of kernel memory (committed), zeroed; 0 if none */
static u64 table_page(void)
{
    struct pmm_range r;
    u32 n;
    if (pmm_alloc(1, &r, 1, &n) != 1)
        return 0;
    pmm_commit(1);
    zero_page((void *)r.base);
    return r.base;
}

static void free_table_page(u64 pa)
{
    pmm_free(pa, 1);
    pmm_uncommit(1);
}

static u64 *pte(const struct window *w, u64 vpn)
{
    u64 *pt = (u64 *)(w->pd[vpn >> 18][(vpn >> 9) & 511] & ADDR);
    return &pt[vpn & 511];
}

/* ---------------------------------------------------------------- page file slots */
static s64 slots_take(u32 n) /* n <= 16 consecutive free slots */
{
    for (u64 k = 0; k < slot_words; k++) {
        u64 wi = (slot_hint + k) % slot_words, word = slot_bm[wi];
        for (u32 q = 0; q < 64; q += 16)
            if (!((word >> q) & 0xFFFF)) {
                slot_bm[wi] |= ((1UL << n) - 1) << q;
                slot_hint = wi;
                st.slots_used += n;
                return (s64)(wi * 64 + q);
            }
    }
    return -1;
}

static void slot_free(u64 s)
{
    slot_bm[s / 64] &= ~(1UL << (s % 64));
    st.slots_used--;
}

/* freed slots, told to the host in runs (UNMAP: it punches them out of its file, and a live
 * migration does not carry them) */
static u64 unmap_base, unmap_n;
static void unmap_flush(void)
{
    if (unmap_n && storvsc_unmap(unmap_base * SLOT_SECTORS, (u32)(unmap_n * SLOT_SECTORS)))
        st.failures++;
    unmap_n = 0;
}
static void unmap_add(u64 s)
{
    if (unmap_n && s == unmap_base + unmap_n && unmap_n < 8192) {
        unmap_n++;
        return;
    }
    unmap_flush();
    unmap_base = s;
    unmap_n = 1;
}

/* ---------------------------------------------------------------- set-up */
void paging_init(void)
{
    u64 sectors = storvsc_sectors();
    if (!sectors)
        return;
    nslots = sectors / SLOT_SECTORS / 64 * 64;
    slot_words = nslots / 64;
    u64 bytes = slot_words * 8, pages = (bytes + PAGE_SIZE - 1) / PAGE_SIZE;
    struct pmm_range r;
    u32 n;
    if (!nslots || pmm_alloc(pages, &r, 1, &n) != pages) {
        printf("paging: no memory for the page file's slot map (%lu pages)\n", pages);
        return;
    }
    pmm_commit(pages);
    slot_bm = (u64 *)r.base;
    for (u64 i = 0; i < pages; i++)
        zero_page((u8 *)slot_bm + i * PAGE_SIZE);
    st.file_pages = nslots;
    pmm_reclaim_hook = task_reclaim;
    active = 1;
    printf("paging: page file of %lu MiB\n", nslots / 256);
}

int paging_active(void) { return active; }

static void window_free_tables(struct window *w)
{
    u64 *pml4 = (u64 *)(read_cr3() & ADDR), *pdpt = (u64 *)(pml4[0] & ADDR);
    u32 idx = (u32)(w - win);
    for (u32 g = 0; g < WIN_GIB; g++) {
        if (!w->pd[g])
            continue;
        for (u32 k = 0; k < 512; k++)
            if (w->pd[g][k] & PG_P)
                free_table_page(w->pd[g][k] & ADDR);
        pdpt[PDPT_FIRST + idx * WIN_GIB + g] = 0;
        free_table_page((u64)w->pd[g]);
        w->pd[g] = NULL;
    }
    w->used = 0;
    invlpg_all();
}

u64 paging_window(u32 idx, u64 pages)
{
    if (!active || idx >= PAGING_WINDOWS || !pages || pages > WIN_PAGES)
        return 0;
    struct window *w = &win[idx];
    u64 *pml4 = (u64 *)(read_cr3() & ADDR);
    if (!(pml4[0] & PG_P))
        return 0;
    pml4[0] |= PG_U;
    u64 *pdpt = (u64 *)(pml4[0] & ADDR);
    w->pages = pages;
    w->resident = w->swapped = w->tables = 0;
    w->used = 1;
    for (u64 pt = 0; pt < (pages + 511) / 512; pt++) {
        u32 g = (u32)(pt / 512);
        if (!w->pd[g]) {
            u64 pd = table_page();
            if (!pd)
                goto fail;
            w->pd[g] = (u64 *)pd;
            w->tables++;
            pdpt[PDPT_FIRST + idx * WIN_GIB + g] = pd | PG_P | PG_W | PG_U;
        }
        u64 t = table_page();
        if (!t)
            goto fail;
        w->tables++;
        w->pd[g][pt % 512] = t | PG_P | PG_W | PG_U;
    }
    invlpg_all();
    return WIN_BASE + (u64)idx * (WIN_PAGES * PAGE_SIZE);
fail:
    window_free_tables(w);
    return 0;
}

void paging_map(u32 idx, u64 vpn, u64 pa, u64 pages)
{
    struct window *w = &win[idx];
    for (u64 i = 0; i < pages && vpn + i < w->pages; i++)
        *pte(w, vpn + i) = (pa + i * PAGE_SIZE) | PG_P | PG_W | PG_U;
    w->resident += pages;
}

/* free runs of consecutive frames at once: the pmm works in ranges */
static u64 run_base, run_pages;
static void run_flush(void)
{
    if (run_pages && pmm_free(run_base, run_pages))
        printf("paging: could not free [%lx, +%lu pages)\n", run_base, run_pages);
    run_pages = 0;
}
static void run_add(u64 pa)
{
    if (run_pages && pa == run_base + run_pages * PAGE_SIZE) {
        run_pages++;
        return;
    }
    run_flush();
    run_base = pa;
    run_pages = 1;
}

void paging_release(u32 idx)
{
    struct window *w = &win[idx];
    if (idx >= PAGING_WINDOWS || !w->used)
        return;
    for (u64 vpn = 0; vpn < w->pages; vpn++) {
        u64 e = *pte(w, vpn);
        if (e & PG_P)
            run_add(e & ADDR);
        else if (e & PG_SWAP) {
            slot_free(e >> 12);
            unmap_add(e >> 12);
        }
    }
    run_flush();
    unmap_flush();
    window_free_tables(w);
}

void paging_window_counts(u32 idx, u64 *resident, u64 *swapped)
{
    *resident = idx < PAGING_WINDOWS ? win[idx].resident : 0;
    *swapped = idx < PAGING_WINDOWS ? win[idx].swapped : 0;
}

/* ---------------------------------------------------------------- page out */
static u64 page_out(struct window **ws, const u64 *vpns, const u64 *frames, u32 n)
{
    s64 base = slots_take(n);
    if (base < 0) {
        st.failures++;
        return 0;
    }
    u64 pfns[BATCH];
    for (u32 i = 0; i < n; i++)
        pfns[i] = frames[i] / PAGE_SIZE;
    if (storvsc_io(1, (u64)base * SLOT_SECTORS, n * SLOT_SECTORS, pfns, n)) {
        for (u32 i = 0; i < n; i++)
            slot_free((u64)base + i);
        st.failures++;
        return 0;
    }
    for (u32 i = 0; i < n; i++) {
        *pte(ws[i], vpns[i]) = (((u64)base + i) << 12) | PG_SWAP;
        ws[i]->resident--;
        ws[i]->swapped++;
    }
    for (u32 i = 0; i < n; i++) /* no translation to a frame we free stays: here at once, */
        invlpg(ws[i], vpns[i]);
    paging_gen++; /* on other CPUs before they next enter a task (they run none of these now) */
    for (u32 i = 0; i < n; i++)
        run_add(frames[i]);
    run_flush();
    st.page_outs += n;
    return n;
}

u64 paging_reclaim(u64 want)
{
    if (!active)
        return 0;
    st.reclaims++;
    u64 freed = 0, budget = 0;
    u8 evictable[PAGING_WINDOWS]; /* asked once: it reads this CPU's LAPIC id (an exit) */
    for (u32 i = 0; i < PAGING_WINDOWS; i++) {
        evictable[i] = win[i].used && task_window_evictable(i);
        budget += evictable[i] ? 2 * win[i].pages : 0; /* two sweeps: clear, then take */
    }
    struct window *ws[BATCH];
    u64 vpns[BATCH], frames[BATCH];
    u32 n = 0, skipped = 0;
    while (freed + n < want && budget && skipped <= PAGING_WINDOWS) {
        struct window *w = &win[clock_w];
        if (!evictable[clock_w] || !w->resident || clock_vpn >= w->pages) {
            clock_w = (clock_w + 1) % PAGING_WINDOWS;
            clock_vpn = 0;
            skipped++; /* a whole turn of windows with nothing to look at: stop */
            continue;
        }
        skipped = 0;
        u64 vpn = clock_vpn;
        if (!(vpn & 511)) {
            /* The second chance is given per page table (2 MiB): the accessed bit of the entry
             * that points at it says whether any of its pages was used since the hand last
             * passed. One page-table write per 512 pages: on this KVM each write to a page table
             * costs a shadow page table update, and clearing every page's bit cost more than
             * the paging itself. */
            u64 *pde = &w->pd[vpn >> 18][(vpn >> 9) & 511];
            if (*pde & PG_A) {
                *pde &= ~PG_A;
                clock_vpn += 512;
                budget = budget > 512 ? budget - 512 : 0;
                continue;
            }
        }
        budget--;
        clock_vpn++;
        u64 *e = pte(w, vpn);
        if (!(*e & PG_P))
            continue;
        ws[n] = w;
        vpns[n] = vpn;
        frames[n] = *e & ADDR;
        if (++n == BATCH) {
            u64 got = page_out(ws, vpns, frames, n);
            n = 0;
            if (!got)
                break; /* the page file is full or the disk failed */
            freed += got;
        }
    }
    if (n)
        freed += page_out(ws, vpns, frames, n);
    return freed;
}

/* ---------------------------------------------------------------- page in */
static u64 frame(void)
{
    struct pmm_range r;
    u32 n;
    if (pmm_alloc(1, &r, 1, &n) == 1)
        return r.base;
    paging_reclaim(BATCH);
    return pmm_alloc(1, &r, 1, &n) == 1 ? r.base : 0;
}

int paging_fault(u32 idx, u64 va)
{
    struct window *w = &win[idx];
    u64 base = WIN_BASE + (u64)idx * (WIN_PAGES * PAGE_SIZE);
    if (idx >= PAGING_WINDOWS || !w->used || va < base || (va - base) / PAGE_SIZE >= w->pages)
        return -1;
    u64 vpn = (va - base) / PAGE_SIZE, *e = pte(w, vpn);
    st.faults++;
    if (*e & PG_P) /* another CPU mapped it meanwhile, or a stale translation */
        return 0;
    if (*e & PG_SWAP) {
        /* read ahead: the pages paged out with it (next pages, next slots) come in the same READ */
        u64 slot = *e >> 12, run = 1;
        while (run < BATCH && vpn + run < w->pages && *pte(w, vpn + run) == (((slot + run) << 12) | PG_SWAP))
            run++;
        struct pmm_range r[BATCH];
        u64 pfns[BATCH];
        u32 nr, k = 0;
        u64 got = pmm_alloc(run, r, BATCH, &nr);
        for (u32 i = 0; i < nr; i++)
            for (u64 j = 0; j < r[i].pages; j++)
                pfns[k++] = r[i].base / PAGE_SIZE + j;
        if (!got) {
            u64 pa = frame();
            if (!pa) {
                st.failures++;
                return -1;
            }
            pfns[0] = pa / PAGE_SIZE;
            got = 1;
        }
        if (storvsc_io(0, slot * SLOT_SECTORS, (u32)got * SLOT_SECTORS, pfns, (u32)got)) {
            for (u64 i = 0; i < got; i++)
                pmm_free(pfns[i] * PAGE_SIZE, 1);
            st.failures++;
            return -1;
        }
        for (u64 i = 0; i < got; i++) {
            *pte(w, vpn + i) = pfns[i] * PAGE_SIZE | PG_P | PG_W | PG_U;
            slot_free(slot + i);
        }
        if (storvsc_unmap(slot * SLOT_SECTORS, (u32)got * SLOT_SECTORS))
            st.failures++;
        w->swapped -= got;
        w->resident += got;
        st.page_ins += got;
        return 0;
    }
    /* never touched: back the untouched run up to the end of its page table at once */
    u64 end = (vpn | 511) + 1;
    if (end > w->pages)
        end = w->pages;
    u64 run = 1;
    while (vpn + run < end && !*pte(w, vpn + run))
        run++;
    struct pmm_range r[8];
    u32 nr;
    u64 got = pmm_alloc(run, r, 8, &nr);
    if (!got) { /* memory ran out: page out as many as this fault backs, in batches */
        paging_reclaim(run);
        got = pmm_alloc(run, r, 8, &nr);
    }
    if (!got) {
        u64 pa = frame();
        if (!pa) {
            st.failures++;
            return -1;
        }
        r[0].base = pa;
        r[0].pages = got = 1;
        nr = 1;
    }
    u64 v = vpn;
    for (u32 i = 0; i < nr; i++) {
        paging_map(idx, v, r[i].base, r[i].pages);
        v += r[i].pages;
    }
    st.zero_fills += got;
    return 0;
}

void paging_get_stats(struct paging_stats *s) { *s = st; }

void paging_show(void)
{
    if (!active) {
        puts("paging: off (no page file disk)\n");
        return;
    }
    printf("page-file: %lu pages (%lu MiB), %lu in use\n", st.file_pages, st.file_pages / 256, st.slots_used);
    printf("page-outs: %lu\npage-ins: %lu\nzero-fills: %lu\nfaults: %lu\nreclaims: %lu\nfailures: %lu\n",
           st.page_outs, st.page_ins, st.zero_fills, st.faults, st.reclaims, st.failures);
    for (u32 i = 0; i < PAGING_WINDOWS; i++)
        if (win[i].used)
            printf("window %u: %lu pages, %lu resident, %lu paged out, %lu table pages\n", i, win[i].pages,
                   win[i].resident, win[i].swapped, win[i].tables);
}
