/* task.c -- background tasks: memory workloads that run at CPL3, where this KVM executes natively.
 * The kernel (the shell) takes the CPU back on every interrupt; when it has nothing to do it resumes
 * the next runnable task instead of halting. A task asks the kernel for things by executing the ud2
 * at user_sys (the only way from CPL3 to CPL0 here is an exception or an interrupt).
 * Every CPU schedules from the one task table (task_lock): a runnable task no other CPU runs, or one
 * pinned to this CPU. A task killed while another CPU runs it is released once that CPU has it back
 * (at its next timer tick). */
#include "kernel.h"

#define MIN_TASKS 4 /* slots; two per CPU beyond that (a `dirty -p` and a `testlimit -p`) */
#define MAX_TASKS 128
#define TASK_RANGES 4096
#define USER_STACK 16384
#define SYS_SLEEP 1 /* rsi = tick to wake at */
#define SYS_EXIT 2
#define USER_CS 0x33
#define USER_DS 0x2B

enum { T_FREE, T_RUNNABLE, T_SLEEPING, T_KILLED /* waits until no CPU runs it */ };
enum { K_TESTLIMIT, K_DIRTY, K_FAULT, K_READ };
static const char *const kind_names[] = {"testlimit", "dirty", "fault", "read"};

struct task {
    struct frame frame; /* user registers while the task is off the CPU */
    u32 state, kind;
    s32 pin;              /* the only CPU it runs on, or -1 */
    volatile s32 on_cpu;  /* the CPU running it now, or -1 */
    u32 last_cpu;
    u64 wake_tick;
    /* testlimit: ticks from its start until all it committed was allocated (0: not yet), and the
     * longest time it waited for memory (it had touched all it had and wanted more) */
    u64 start_tick, full_ticks, wait_since, max_wait;
    u64 pages_want; /* committed for the task */
    u64 pages_have; /* allocated so far; may lag behind commit until memory arrives */
    u64 pps;        /* dirty: pages per second, 0 = as fast as possible */
    volatile u64 nranges;
    volatile u64 touched; /* pages written by the task, counting rewrites */
    volatile u64 passes;
    /* testlimit with a page file: its pages in a paging window (paging.c) at va, -1 without */
    s32 win;
    u64 va, seed;
    volatile u64 filled;                     /* pages written with their pattern so far */
    volatile u64 verify_gen, verified_gen;   /* `verify` asks, the task answers */
    volatile u64 verify_pages, verify_bad;   /* what its last check found */
    struct pmm_range ranges[TASK_RANGES];
    u8 stack[USER_STACK] __attribute__((aligned(16)));
};

static struct task *tasks; /* carved from RAM after the image at boot (kernel RAM: task_init) */
static s32 ntasks;
static spinlock_t task_lock; /* task states, on_cpu, and the allocation of slots */
extern const char *exception_name(u64 vec);

/* ---------------------------------------------------------------- CPL3 side: no privileged instructions */
static inline void user_call(u64 op, u64 arg)
{
    __asm__ volatile("call user_sys" ::"D"(op), "S"(arg) : "memory");
}

static void user_testlimit(struct task *t)
{
    u64 r = 0;
    for (;;) {
        for (; r < t->nranges; r++) {
            u64 a = t->ranges[r].base, n = t->ranges[r].pages;
            for (u64 i = 0; i < n; i++, a += PAGE_SIZE) {
                *(volatile u64 *)a = a; /* one word per page makes the host back it */
                t->touched++;
            }
        }
        user_call(SYS_SLEEP, t->pages_have >= t->pages_want ? ~0UL : ticks + 1);
    }
}

/* testlimit in a paging window: every page written whole with a pattern of its own (its address
 * and the task's seed) on first touch; on `verify`, every page read back and checked (the ones paged
 * out come back through the page fault path). Native at CPL3. */
static void user_testlimit_paged(struct task *t)
{
    for (;;) {
        for (; t->filled < t->pages_want; t->filled++) {
            u64 *p = (u64 *)(t->va + t->filled * PAGE_SIZE), v = (u64)p ^ t->seed;
            for (u32 k = 0; k < PAGE_SIZE / 8; k++)
                p[k] = v + k;
            t->touched++;
        }
        u64 gen = t->verify_gen;
        if (gen != t->verified_gen) {
            u64 bad = 0;
            for (u64 i = 0; i < t->filled; i++) {
                const u64 *p = (const u64 *)(t->va + i * PAGE_SIZE);
                u64 v = (u64)p ^ t->seed;
                for (u32 k = 0; k < PAGE_SIZE / 8; k++)
                    if (p[k] != v + k) {
                        bad++;
                        break;
                    }
            }
            t->verify_bad = bad;
            t->verify_pages = t->filled;
            t->verified_gen = gen;
            t->passes++;
        }
        user_call(SYS_SLEEP, ~0UL);
    }
}

static void user_dirty(struct task *t)
{
    u64 start = ticks, written = 0, value = 1;
    for (;;) {
        if (!t->nranges)
            user_call(SYS_SLEEP, ticks + 1);
        for (u64 r = 0; r < t->nranges; r++) {
            u64 a = t->ranges[r].base, n = t->ranges[r].pages;
            for (u64 i = 0; i < n; i++, a += PAGE_SIZE) {
                while (t->pps && written >= (ticks - start + 1) * t->pps / HZ)
                    user_call(SYS_SLEEP, ticks + 1);
                *(volatile u64 *)a = value;
                written++;
                t->touched++;
            }
        }
        t->passes++;
        value++;
    }
}

/* read: one word of every page of its memory, again and again; its only writes are its own
 * counters (one page), so a dirty limit must never slow it */
static void user_read(struct task *t)
{
    u64 sum = 0;
    for (;;) {
        if (!t->nranges)
            user_call(SYS_SLEEP, ticks + 1);
        u64 got = 0;
        for (u64 r = 0; r < t->nranges; r++) {
            u64 a = t->ranges[r].base, n = t->ranges[r].pages;
            for (u64 i = 0; i < n; i++, a += PAGE_SIZE)
                sum += *(volatile const u64 *)a;
            got += n;
        }
        t->touched += got; /* pages read */
        t->passes++;
        t->seed = sum; /* keeps the reads (and is never read back) */
    }
}

static void user_fault(struct task *t)
{
    (void)t;
    (void)*(volatile u64 *)FAULT_ADDRESS;
}

static void user_task_exit(void) { user_call(SYS_EXIT, 0); }

/* ---------------------------------------------------------------- kernel side */
void task_init(u32 cpus, u64 budget)
{
    ntasks = 2 * cpus < MIN_TASKS ? MIN_TASKS : 2 * cpus > MAX_TASKS ? MAX_TASKS : (s32)(2 * cpus);
    while (ntasks > MIN_TASKS && ntasks * sizeof(struct task) > budget)
        ntasks--;
    tasks = boot_alloc(ntasks * sizeof(struct task));
    for (int i = 0; i < ntasks; i++)
        tasks[i].state = T_FREE;
}

/* allocate what the task has committed, as far as free memory goes */
static void task_fill(struct task *t)
{
    struct pmm_stats s;
    pmm_stats(&s);
    if (t->win >= 0)
        return; /* a window is backed at its start and then on demand (paging_fault) */
    if (t->pages_have >= t->pages_want || !s.free || t->nranges >= TASK_RANGES)
        return;
    u32 n;
    struct pmm_range *r = &t->ranges[t->nranges];
    u64 got = pmm_alloc(t->pages_want - t->pages_have, r, (u32)(TASK_RANGES - t->nranges), &n);
    for (u32 i = 0; i < n; i++) /* user access to just the memory the task was given */
        paging_allow_user(r[i].base, r[i].base + r[i].pages * PAGE_SIZE);
    t->nranges += n;
    t->pages_have += got;
}

/* a testlimit task's waits for memory, on the guest's clock (with task_lock held) */
static void track_wait(struct task *t)
{
    if (t->kind != K_TESTLIMIT || t->full_ticks)
        return;
    int full = t->pages_have >= t->pages_want, waiting = !full && t->touched >= t->pages_have;
    if (waiting && !t->wait_since)
        t->wait_since = ticks;
    if (!waiting && t->wait_since) {
        if (ticks - t->wait_since > t->max_wait)
            t->max_wait = ticks - t->wait_since;
        t->wait_since = 0;
    }
    if (full)
        t->full_ticks = ticks - t->start_tick + 1; /* +1: 0 means not yet */
}

static void task_release(struct task *t)
{
    if (t->win >= 0) {
        paging_release((u32)t->win);
        t->win = -1;
        t->nranges = 0;
    }
    for (u64 r = 0; r < t->nranges; r++)
        if (pmm_free(t->ranges[r].base, t->ranges[r].pages))
            printf("task: could not free [%lx, +%lu pages): pmm state is inconsistent\n",
                   t->ranges[r].base, t->ranges[r].pages);
    pmm_uncommit(t->pages_want);
    t->state = T_FREE;
}

/* with task_lock held */
static int task_new(u32 kind, u64 pages, u64 pps, s32 pin, void (*entry)(struct task *))
{
    int id;
    for (id = 0; id < ntasks; id++)
        if (tasks[id].state == T_FREE)
            break;
    if (id == ntasks) {
        printf("%s: all %d task slots are busy: kill one first\n", kind_names[kind], ntasks);
        return -1;
    }
    struct task *t = &tasks[id];
    memset(&t->frame, 0, sizeof(t->frame));
    u64 *sp = (u64 *)(t->stack + USER_STACK) - 2;
    sp[0] = (u64)user_task_exit; /* where the entry function would return to */
    t->frame.rip = (u64)entry;
    t->frame.rdi = (u64)t;
    t->frame.rsp = (u64)sp;
    t->frame.cs = USER_CS;
    t->frame.ss = USER_DS;
    t->frame.rflags = 0x202;
    t->kind = kind;
    t->pages_want = pages;
    t->pages_have = 0;
    t->pps = pps;
    t->nranges = 0;
    t->touched = 0;
    t->passes = 0;
    t->wake_tick = 0;
    t->start_tick = ticks;
    t->full_ticks = t->wait_since = t->max_wait = 0;
    t->pin = pin;
    t->on_cpu = -1;
    t->last_cpu = pin >= 0 ? (u32)pin : 0;
    t->win = -1;
    t->filled = t->verify_gen = t->verified_gen = t->verify_pages = t->verify_bad = 0;
    pmm_commit(pages);
    if (kind == K_TESTLIMIT && paging_active() && (u32)id < PAGING_WINDOWS &&
        (t->va = paging_window((u32)id, pages)) != 0) {
        /* back what is free now; the rest comes on demand, paging out when memory runs out */
        t->win = id;
        t->seed = 0x9E3779B97F4A7C15UL * (ticks + 1);
        t->frame.rip = (u64)user_testlimit_paged;
        u32 n;
        u64 got = pmm_alloc(pages, t->ranges, TASK_RANGES, &n), vpn = 0;
        for (u32 i = 0; i < n; i++) {
            paging_map((u32)id, vpn, t->ranges[i].base, t->ranges[i].pages);
            vpn += t->ranges[i].pages;
        }
        t->pages_have = got;
    }
    task_fill(t);
    t->state = T_RUNNABLE;
    return id;
}

static void say_cpu(s32 pin)
{
    if (pin >= 0)
        printf(" on cpu %d", pin);
}

int task_start_testlimit(u64 mb, u64 count, s32 pin)
{
    u64 f = spin_lock(&task_lock);
    int id = task_new(K_TESTLIMIT, mb * count * 256, 0, pin, user_testlimit);
    u64 have = id >= 0 ? tasks[id].pages_have : 0;
    spin_unlock(&task_lock, f);
    if (id >= 0) {
        int held = console_hold();
        printf("testlimit: task %d committed %lu MiB (%lu x %lu MiB), %lu MiB allocated now", id,
               mb * count, count, mb, have / 256);
        say_cpu(pin);
        putc('\n');
        console_release(held);
    }
    return id;
}

int task_start_dirty(u64 mb, u64 pps, s32 pin)
{
    u64 f = spin_lock(&task_lock);
    int id = task_new(K_DIRTY, mb * 256, pps, pin, user_dirty);
    spin_unlock(&task_lock, f);
    if (id >= 0) {
        int held = console_hold();
        printf("dirty: task %d rewrites %lu MiB ", id, mb);
        if (pps)
            printf("at %lu pages/s", pps);
        else
            puts("as fast as it can");
        say_cpu(pin);
        putc('\n');
        console_release(held);
    }
    return id;
}

int task_start_read(u64 mb, s32 pin)
{
    u64 f = spin_lock(&task_lock);
    int id = task_new(K_READ, mb * 256, 0, pin, user_read);
    spin_unlock(&task_lock, f);
    if (id >= 0) {
        int held = console_hold();
        printf("read: task %d reads %lu MiB", id, mb);
        say_cpu(pin);
        putc('\n');
        console_release(held);
    }
    return id;
}

int task_start_fault(s32 pin)
{
    u64 f = spin_lock(&task_lock);
    int id = task_new(K_FAULT, 0, 0, pin, user_fault);
    spin_unlock(&task_lock, f);
    if (id >= 0) {
        int held = console_hold();
        printf("fault: task %d reads %lx at CPL3", id, FAULT_ADDRESS);
        say_cpu(pin);
        putc('\n');
        console_release(held);
    }
    return id;
}

/* Kill task id (or all, id < 0), from the shell on CPU 0: a task another CPU runs is taken off the
 * schedule at once and released when that CPU has it back (its next tick, at most 1/HZ s). */
int task_kill(int id)
{
    int n = 0;
    u64 f = spin_lock(&task_lock);
    for (int i = 0; i < ntasks; i++) {
        struct task *t = &tasks[i];
        if (t->state == T_FREE || t->state == T_KILLED || (id >= 0 && id != i))
            continue;
        t->state = T_KILLED;
        while (t->on_cpu >= 0) {
            spin_unlock(&task_lock, f);
            sti_hlt(); /* until this CPU's next interrupt */
            f = spin_lock(&task_lock);
        }
        printf("task %d (%s) killed: %lu MiB released\n", i, kind_names[t->kind], t->pages_want / 256);
        task_release(t);
        n++;
    }
    spin_unlock(&task_lock, f);
    return n;
}

int task_kill_kind_testlimit(void)
{
    int n = 0;
    for (int i = 0; i < ntasks; i++)
        if (tasks[i].state != T_FREE && tasks[i].kind == K_TESTLIMIT)
            n += task_kill(i);
    return n;
}

void task_list(void)
{
    int any = 0;
    for (int i = 0; i < ntasks; i++) {
        struct task *t = &tasks[i];
        if (t->state == T_FREE)
            continue;
        any = 1;
        u64 have = t->pages_have, out = 0;
        if (t->win >= 0)
            paging_window_counts((u32)t->win, &have, &out);
        printf("task %d: %s committed %lu MiB, allocated %lu MiB, touched %lu pages, passes %lu, cpu %u%s\n",
               i, kind_names[t->kind], t->pages_want / 256, have / 256, t->touched, t->passes,
               t->last_cpu, t->pin >= 0 ? " (pinned)" : "");
        if (t->kind == K_READ) /* its own rate on the guest's clock: pages read per tick */
            printf("task %d: read %lu pages by tick %lu\n", i, t->touched, ticks);
        if (t->win >= 0)
            printf("task %d: paged out %lu pages, filled %lu, verify %lu of %lu: %lu pages checked, %lu bad\n", i,
                   out, t->filled, t->verified_gen, t->verify_gen, t->verify_pages, t->verify_bad);
    }
    for (int i = 0; i < ntasks; i++) { /* testlimit's waits for memory, on the guest's clock */
        struct task *t = &tasks[i];
        if (t->state == T_FREE || t->kind != K_TESTLIMIT)
            continue;
        u64 wait = t->wait_since && ticks - t->wait_since > t->max_wait ? ticks - t->wait_since : t->max_wait;
        printf("task %d: longest wait for memory %lu ms", i, wait * (1000 / HZ));
        if (t->full_ticks)
            printf(", all allocated after %lu ms", (t->full_ticks - 1) * (1000 / HZ));
        putc('\n');
    }
    if (!any)
        puts("no tasks\n");
}

int task_name(s32 id, const char **kind)
{
    if (id < 0 || id >= ntasks || tasks[id].state == T_FREE)
        return -1;
    *kind = kind_names[tasks[id].kind];
    return 0;
}

/* called with interrupts off from a CPU's idle path */
void task_schedule(void)
{
    struct cpu *c = this_cpu();
    u64 f = spin_lock(&task_lock);
    for (u32 k = 1; k <= (u32)ntasks; k++) {
        u32 i = (c->last_run + k) % (u32)ntasks;
        struct task *t = &tasks[i];
        if (t->state == T_SLEEPING && ticks >= t->wake_tick)
            t->state = T_RUNNABLE;
        if (t->state != T_RUNNABLE || t->on_cpu >= 0 || (t->pin >= 0 && (u32)t->pin != c->index))
            continue;
        task_fill(t);
        track_wait(t);
        t->on_cpu = (s32)c->index;
        t->last_cpu = c->index;
        c->last_run = i;
        c->task = (s32)i;
        c->task_runs++;
        spin_unlock(&task_lock, f);
        if (c->paging_gen != paging_gen) { /* another CPU gave user access to more memory */
            c->paging_gen = paging_gen;
            write_cr3(read_cr3());
        }
        run_user(&t->frame, &c->kctx_rsp); /* back here, interrupts off, after the next trap */
        f = spin_lock(&task_lock);
        c->task = -1;
        if (t->on_cpu == (s32)c->index) /* unless the slot was freed and reused meanwhile */
            t->on_cpu = -1;
        spin_unlock(&task_lock, f);
        return;
    }
    spin_unlock(&task_lock, f);
    sti_hlt();
    cli();
}

/* an interrupt or exception while a task ran (on this CPU, interrupts off): save its state and give
 * the CPU to the kernel */
void task_user_trap(struct frame *f)
{
    struct cpu *c = this_cpu();
    if (c->task < 0) {
        printf("trap %lu from CPL3 with no current task on cpu %u at rip %lx\n", f->vec, c->index, f->rip);
        halt_forever();
    }
    struct task *t = &tasks[c->task];
    u64 fl = spin_lock(&task_lock);
    if (t->state == T_KILLED) { /* the shell releases it once we let go */
        spin_unlock(&task_lock, fl);
        back_to_kernel(1, &c->kctx_rsp);
    }
    if (f->vec == 6 && f->rip == (u64)user_sys) {
        f->rip += 2; /* past the ud2 */
        if (f->rdi == SYS_SLEEP) {
            t->wake_tick = f->rsi;
            t->state = T_SLEEPING;
        } else if (f->rdi == SYS_EXIT) {
            task_release(t);
            spin_unlock(&task_lock, fl);
            back_to_kernel(1, &c->kctx_rsp);
        }
    } else if (f->vec == 14 && t->win >= 0 && (f->err & 1) == 0 && !paging_fault((u32)t->win, read_cr2())) {
        /* a page of its window paged in or backed: the task runs the access again */
    } else if (f->vec < 32) {
        printf("\ntask %d (%s) on cpu %u: exception %lu (%s) at rip %lx: cr2 %lx, error code %lx: task "
               "killed\n",
               (int)(t - tasks), kind_names[t->kind], c->index, f->vec, exception_name(f->vec), f->rip,
               read_cr2(), f->err);
        task_release(t);
        spin_unlock(&task_lock, fl);
        back_to_kernel(1, &c->kctx_rsp);
    }
    t->frame = *f;
    spin_unlock(&task_lock, fl);
    back_to_kernel(0, &c->kctx_rsp);
}

/* ---------------------------------------------------------------- paging's side of the task table */
int task_window_evictable(u32 w)
{
    struct task *t = &tasks[w];
    return (s32)w < ntasks && t->win == (s32)w && (t->on_cpu < 0 || t->on_cpu == (s32)this_cpu()->index);
}

u64 task_reclaim(u64 pages)
{
    u64 f = spin_lock(&task_lock);
    u64 got = paging_reclaim(pages);
    spin_unlock(&task_lock, f);
    return got;
}

int task_verify(void)
{
    int n = 0;
    u64 f = spin_lock(&task_lock);
    for (int i = 0; i < ntasks; i++) {
        struct task *t = &tasks[i];
        if (t->state == T_FREE || t->state == T_KILLED || t->win < 0)
            continue;
        t->verify_gen++;
        if (t->state == T_SLEEPING)
            t->wake_tick = 0;
        n++;
    }
    spin_unlock(&task_lock, f);
    return n;
}
